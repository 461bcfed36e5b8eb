"""Opt-in end-to-end check: a `python -m engines triton-repo` repository in a real Triton Inference Server.

Uses the `tritonserver` (2.51, python backend only) that the `nvidia-pytriton` wheel bundles, in a separate venv
(PyTriton pins numpy < 2). On loopback ports it starts the server over a freshly generated repository and checks
that `POST /v2/models/gptmeg/generate_stream` (stream: true, joined) and `POST .../generate` give exactly the text of
`python -m engines generate` (greedy), that stop words cut the text, and that a bad request gets an error.

    # once (about 520 MB, outside the repository):
    python scripts/triton_check.py --venv /tmp/ptvenv --build-venv
    # then:
    python scripts/triton_check.py --venv /tmp/ptvenv [--export EXPORT_DIR]

Run it with the project's Python (it runs `python -m export` / `python -m engines`); the venv only runs the server.
Exit 0 and a last line "PASS" when every check holds. The pytest wrapper is `tests/test_triton_repo.py -m triton`
with GPTMEG_TRITON_VENV=/tmp/ptvenv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["nvidia-pytriton==0.7.0", "tritonclient[http]", "numpy<2", "onnx", "onnxruntime", "tokenizers"]
MODEL = "gptmeg"
PROMPTS = ["Once upon a time", "The meaning of life is", "a"]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(a) for a in argv), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(a) for a in argv], check=True, env=env, cwd=ROOT, text=True, **kwargs)


def build_venv(venv: Path) -> None:
    """A venv from a system Python 3.11 (its libpython is the one the python-backend stub links)."""
    base = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else shutil.which("python3.11")
    run([base or sys.executable, "-m", "venv", venv])
    run([venv / "bin" / "pip", "install", "--quiet", *PACKAGES])


def server_paths(venv: Path) -> tuple[Path, Path, str]:
    """(tritonserver binary, backends folder, the LIBDIR of the venv's Python for LD_LIBRARY_PATH)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{venv} is not a venv (no bin/python); build it with --build-venv.")
    out = subprocess.run([python, "-c", "import sys, sysconfig, pytriton; print(pytriton.__file__); "
                          "print(sysconfig.get_config_var('LIBDIR')); print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{venv} has no nvidia-pytriton ({out.stderr.strip().splitlines()[-1:]}); build it with "
                         "--build-venv.")
    pytriton, libdir, version = out.stdout.split()
    ts = Path(pytriton).parent / "tritonserver"
    stub = ts / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = ts / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists():  # PyTriton ships one stub per Python version; the server looks in the backend folder
        shutil.copy2(stub, target)
    return ts / "bin" / "tritonserver", ts / "backends", libdir


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def sse_events(payload: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in payload.decode().splitlines() if line.startswith("data:")]


def expected_text(export: Path, prompt: str, max_tokens: int) -> str:
    """The greedy text `python -m engines generate` prints after the prompt."""
    out = run([sys.executable, "-m", "engines", "generate", export, "--prompt", prompt, "--max-new-tokens",
               max_tokens, "--threads", "1"], capture_output=True)
    printed = out.stdout
    assert printed.startswith(prompt) and printed.endswith("\n"), printed
    return printed[len(prompt):-1]


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tritonserver exited ({process.returncode}) before it was ready:\n"
                             f"{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v2/models/{MODEL}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"tritonserver was not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def checks(base: str, export: Path) -> list[str]:
    failures = []

    def check(condition: bool, what: str) -> None:
        print(("ok   " if condition else "FAIL ") + what, flush=True)
        if not condition:
            failures.append(what)

    for prompt in PROMPTS:
        want = expected_text(export, prompt, 12)
        body = {"text_input": prompt, "max_tokens": 12, "temperature": 0}
        status, payload = post(f"{base}/v2/models/{MODEL}/generate_stream", {**body, "stream": True})
        events = sse_events(payload)
        streamed = "".join(e.get("text_output", "") for e in events)
        check(status == 200 and streamed == want, f"generate_stream {prompt!r}: {streamed!r} == {want!r} "
                                                  f"({len(events)} events)")
        check(len(events) >= 1 and events[-1].get("finish_reason") in ("stop", "length")
              and all("finish_reason" not in e for e in events[:-1]), "finish_reason only on the last event")
        status, payload = post(f"{base}/v2/models/{MODEL}/generate", body)
        answer = json.loads(payload)
        check(status == 200 and answer.get("text_output") == want, f"generate {prompt!r}: {answer!r}")
        # Triton's OpenAI frontend sends [[prompt]] and [[values]]: the config's [1, 1] dims
        status, payload = post(f"{base}/v2/models/{MODEL}/generate",
                               {"text_input": [[prompt]], "max_tokens": [[12]], "temperature": [[0.0]]})
        check(status == 200 and json.loads(payload).get("text_output") == want, f"generate with [[...]] inputs "
                                                                                f"{prompt!r}")

    prompt = PROMPTS[0]
    want = expected_text(export, prompt, 12)
    stop = want[3:5] if len(want) >= 5 else want[-1:]
    cut = want[: want.find(stop)] if stop else want
    status, payload = post(f"{base}/v2/models/{MODEL}/generate_stream",
                           {"text_input": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                            "stop_words": [stop]})
    events = sse_events(payload)
    check("".join(e.get("text_output", "") for e in events) == cut and events[-1].get("finish_reason") == "stop",
          f"stop word {stop!r}: {cut!r}")
    status, payload = post(f"{base}/v2/models/{MODEL}/generate",
                           {"text_input": prompt, "max_tokens": 100000, "temperature": 0})
    check("maximum context length" in json.loads(payload).get("error", ""), f"context overflow is an error "
                                                                            f"({status}: {payload[:120]!r})")
    status, payload = post(f"{base}/v2/models/{MODEL}/generate", {"text_input": prompt, "max_tokens": 4})
    check(status == 200 and "text_output" in json.loads(payload), "the next request after an error succeeds")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("GPTMEG_TRITON_VENV", "/tmp/ptvenv")))
    parser.add_argument("--build-venv", action="store_true", help="create the venv first when it is missing")
    parser.add_argument("--export", type=Path, default=None, help="export folder (default: the built-in tiny model, "
                                                                  "fp32, exported to a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (repository, server log)")
    args = parser.parse_args(argv)
    if args.build_venv and not (args.venv / "bin" / "python").exists():
        build_venv(args.venv)
    server, backends, libdir = server_paths(args.venv)
    work = Path(tempfile.mkdtemp(prefix="gptmeg-triton-"))
    process = None
    try:
        export = args.export
        if export is None:
            export = work / "export"
            run([sys.executable, "-m", "export", "--dtype", "fp32", "--out", export, "--external-data", "--quiet"])
        repo = work / "repo"
        run([sys.executable, "-m", "engines", "triton-repo", export, "--out", repo, "--model-name", MODEL,
             "--threads", "1", "--max-batch", "4"])
        http, grpc, metrics = free_ports(3)
        env = {**os.environ, "PATH": f"{args.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               "LD_LIBRARY_PATH": libdir}
        env.pop("PYTHONPATH", None)  # the model finds engines through its project_root parameter
        log = work / "tritonserver.log"
        argv = [server, f"--model-repository={repo}", f"--backend-directory={backends}",
                "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
                "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
                "--exit-timeout-secs=5"]
        print("+ PATH=VENV/bin:$PATH LD_LIBRARY_PATH=" + libdir, " ".join(map(str, argv)), flush=True)
        with open(log, "w") as sink:
            process = subprocess.Popen([str(a) for a in argv], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        base = f"http://127.0.0.1:{http}"
        wait_ready(base, process, log)
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5) as response:
            print(f"ok   /v2/health/ready {response.status}")
        failures = checks(base, export)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        counted = [line for line in text.splitlines() if line.startswith(("nv_inference_request_success",
                                                                          "gptmeg:num_requests"))]
        print("metrics:", *counted, sep="\n  ")
        if not any(line.startswith("gptmeg:num_requests_waiting{") for line in counted):
            failures.append("gptmeg:num_requests_waiting on /metrics")
            print("FAIL gptmeg:num_requests_waiting is not on /metrics")
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
