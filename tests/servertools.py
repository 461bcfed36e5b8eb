"""A real `python -m engines serve` process on an ephemeral loopback port, for the server tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

_READY = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")


class ServerProcess:
    """``with ServerProcess(export_dir, "--max-batch", "4") as server:`` - ``server.url`` is ``http://host:port``,
    ``server.base_url`` the ``/v1`` root for the openai client. The log is in ``server.log()``."""

    def __init__(self, export_dir, *options: str, threads: int = 1, timeout: float = 60.0, env: dict | None = None):
        self.argv = [sys.executable, "-m", "engines", "serve", str(export_dir), "--port", "0", "--threads",
                     str(threads), *options]
        self.timeout = timeout
        self.env = {**os.environ, **(env or {})}
        self._log = tempfile.NamedTemporaryFile(prefix="gptmeg-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                self.port = int(match.group(1))
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"the server did not start within {self.timeout} s:\n{self.log()}")
        self._wait_healthy(deadline)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server never answered /health:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value}."""
        samples = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
