"""Load, disconnect and shutdown tests of `python -m engines serve` (issue #11): a real server process on an
ephemeral loopback port over the tiny fp32 export, driven by benchmarks/serve_load.py and the official openai client.

Nothing here asserts a speed, except the issue's "exits within 10 s" after SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import LoadSpec, read_metrics, run_load_sync, settled_metrics  # noqa: E402
from servertools import ServerProcess  # noqa: E402

VOCAB = 287  # the tiny model's vocabulary (byte-level, 256 bytes + merges + <|endoftext|>); n_positions 256
LONG = 240  # max_tokens of a request that must still be generating when the test acts on it (8-token prompts)


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _outcome(after: dict, before: dict, outcome: str) -> float:
    return _delta(after, before, f'gptmeg:requests_total{{outcome="{outcome}"}}')


@pytest.fixture(scope="module")
def tiny_fp32(tiny_exports) -> Path:
    return tiny_exports("fp32").folder


@pytest.fixture(scope="module")
def server(tiny_fp32):
    with ServerProcess(tiny_fp32, "--max-batch", "8") as process:
        yield process


@pytest.mark.parametrize("kind", ["greedy ids", "sampled text"])
def test_load_nothing_lost(server, kind):
    """>= 64 requests at concurrency 8, a quarter of them plain, every sixth stream hung up after 2 chunks: every
    request answered exactly once, no 5xx, the server's counters agree, /health stays up, rows are batched."""
    common = dict(concurrency=8, max_tokens=24, ignore_eos=True, non_stream_every=4, hang_up_every=6,
                  hang_up_after=2, hang_up_max_tokens=LONG, vocab_size=VOCAB, timeout=60.0)
    if kind == "greedy ids":
        spec = LoadSpec(requests=96, prompt_tokens=8, temperature=0.0, **common)
    else:
        spec = LoadSpec(requests=64, prompt_text="The quick brown fox", temperature=0.8, seed=1000, **common)
    before = read_metrics(server.url)
    result = run_load_sync(server.url, spec)
    after = settled_metrics(server.url, before)
    summary = result.summary(before, after)

    failures = result.nothing_lost_failures(before, after)
    assert not failures, "\n".join(failures) + f"\n{summary}\n{server.log()[-2000:]}"
    streams = sum(r.stream for r in result.records)
    assert len(result.hung_up) == streams // 6 > 0
    assert len([r for r in result.ok if not r.stream]) == spec.requests // 4
    assert all(r.completion_tokens == spec.max_tokens for r in result.ok), "ignore_eos: usage must be max_tokens"
    assert all(r.ttft is not None for r in result.records if r.stream), "every stream carries text"
    # the hung-up rows left early: on average they generated less than half of the 240 tokens they asked for
    assert summary["tokens_per_hang_up"] < LONG / 2, summary
    assert summary["occupancy"] > 1.5, summary  # batching happened
    assert summary["health_probes"] >= 1 and summary["health_failed"] == 0, result.health
    assert after["gptmeg:scheduler_alive"] == 1.0


def test_openai_client_under_load(server):
    """The official client (max_retries=0, so no retry hides a failure): 8 concurrent streams and 8 plain requests
    on the same prompts, plus 2 streams closed after 2 chunks. Each stream's text equals its plain twin's."""
    openai = pytest.importorskip("openai")
    name = httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"]
    prompts = [[(7 * k + 3 * i) % (VOCAB - 2) + 2 for i in range(6 + k)] for k in range(8)]
    extra = {"ignore_eos": True}

    async def scenario():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)

        async def stream(prompt):
            texts, reasons, usage = {}, [], None
            chunks = await client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body=extra)
            async for chunk in chunks:
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
                    if choice.finish_reason is not None:
                        reasons.append((choice.index, choice.finish_reason))
                if chunk.usage is not None:
                    usage = chunk.usage
            return texts, reasons, usage

        async def plain(prompt):
            return await client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0,
                                                   extra_body=extra)

        async def hang_up(prompt):
            chunks = await client.completions.create(model=name, prompt=prompt, max_tokens=LONG, temperature=0,
                                                     stream=True, extra_body=extra)
            seen = 0
            async for chunk in chunks:
                seen += sum(bool(c.text) for c in chunk.choices)
                if seen >= 2:
                    break
            await chunks.close()
            return seen

        try:
            return await asyncio.gather(asyncio.gather(*(stream(p) for p in prompts)),
                                        asyncio.gather(*(plain(p) for p in prompts)),
                                        asyncio.gather(*(hang_up(p) for p in prompts[:2])))
        finally:
            await client.close()

    before = read_metrics(server.url)
    streams, plains, hung = asyncio.run(scenario())
    after = settled_metrics(server.url, before)

    assert hung == [2, 2]
    for (texts, reasons, usage), answer in zip(streams, plains):
        assert reasons == [(0, "length")]
        assert usage is not None and usage.completion_tokens == 24
        assert [c.finish_reason for c in answer.choices] == ["length"] and answer.usage.completion_tokens == 24
        assert texts[0] == answer.choices[0].text  # the stream lost nothing and said nothing twice
    ids = {answer.id for answer in plains}
    assert len(ids) == len(plains)
    assert _delta(after, before, "gptmeg:requests_received_total") == 18
    assert _outcome(after, before, "completed") == 16
    assert _outcome(after, before, "cancelled") == 2
    assert _outcome(after, before, "failed") == 0


def test_plain_client_timeout_cancels(server):
    """A plain (non-stream) client that gives up after 0.3 s: the server counts it cancelled and stops generating."""
    body = {"prompt": [[5 + i, 9, 17, 33, 2 + i, 40, 41, 42] for i in range(4)], "n": 16, "max_tokens": LONG,
            "temperature": 0, "ignore_eos": True}  # 64 choices x 240 tokens: seconds of work at batch 8
    before = read_metrics(server.url)
    with pytest.raises(httpx.ReadTimeout):  # the precondition: the server was still generating at 0.3 s
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(0.3, connect=5.0))
    after = settled_metrics(server.url, before)
    assert _delta(after, before, "gptmeg:requests_received_total") == 1
    assert _outcome(after, before, "cancelled") == 1
    assert _outcome(after, before, "completed") == 0
    assert after["gptmeg:num_requests_running"] == 0 and after["gptmeg:num_requests_waiting"] == 0
    generated = _delta(after, before, "gptmeg:generation_tokens_total")
    assert 0 < generated < 64 * LONG / 2, generated  # it stopped early
    time.sleep(0.3)
    assert read_metrics(server.url)["gptmeg:generation_tokens_total"] == after["gptmeg:generation_tokens_total"]
    # and the server goes on serving
    answer = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4,
                                                              "temperature": 0}, timeout=30)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_sigterm_finishes_live_streams(tiny_fp32):
    """SIGTERM with 3 streams mid-generation: each still gets every token, its finish_reasons and one [DONE]; a new
    connection is refused while they finish; the process exits with code 0 within 10 s of the signal."""
    n, prompts = 4, [[11, 12, 13, 14, 15, 16, 17, 18], [40, 30, 20, 10, 50, 60, 70, 80], [99] * 8]

    async def scenario(server: ServerProcess):
        started = [asyncio.Event() for _ in prompts]
        records = [{"text_chunks": 0, "reasons": [], "done": 0, "usage": None, "after_signal": 0} for _ in prompts]
        signalled = asyncio.Event()

        async def stream(k: int, client: httpx.AsyncClient):
            body = {"prompt": prompts[k], "n": n, "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            record = records[k]
            async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if signalled.is_set():
                        record["after_signal"] += 1
                    if data == "[DONE]":
                        record["done"] += 1
                        continue
                    chunk = json.loads(data)
                    assert "error" not in chunk, chunk
                    for choice in chunk["choices"]:
                        record["text_chunks"] += bool(choice["text"])
                        if choice["finish_reason"]:
                            record["reasons"].append((choice["index"], choice["finish_reason"]))
                    if chunk.get("usage"):
                        record["usage"] = chunk["usage"]
                    started[k].set()

        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), trust_env=False) as client:
            tasks = [asyncio.create_task(stream(k, client)) for k in range(len(prompts))]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
            live = [r["done"] == 0 for r in records]
            server.terminate()
            signalled.set()
            sent = time.monotonic()
            refused, alive_when_refused = False, None
            while time.monotonic() - sent < 10:
                try:
                    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as fresh:
                        await fresh.get(f"{server.url}/health")
                except httpx.ConnectError:
                    refused, alive_when_refused = True, server.process.poll() is None
                    break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.02)
            await asyncio.gather(*tasks)
            return records, live, refused, alive_when_refused, sent

    with ServerProcess(tiny_fp32, "--max-batch", "12") as server:
        records, live, refused, alive_when_refused, sent = asyncio.run(scenario(server))
        try:
            code = server.process.wait(timeout=max(0.1, 10 - (time.monotonic() - sent)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server was still running 10 s after SIGTERM:\n{server.log()[-2000:]}")
        log = server.log()
    assert all(live), "the streams ended before SIGTERM: nothing was tested"
    assert code == 0, log[-2000:]
    assert refused and alive_when_refused, (refused, alive_when_refused, log[-2000:])
    for record in records:
        assert record["done"] == 1, record
        assert sorted(record["reasons"]) == [(j, "length") for j in range(n)], record
        assert record["usage"]["completion_tokens"] == n * LONG, record
        assert record["after_signal"] > 0, record  # it was still streaming when the signal came
    assert "server stopped (SIGTERM)" in log


def test_nothing_lost_checker_catches_losses():
    """The checker itself (no server): a clean synthetic run passes; each kind of loss is reported."""
    from collections import Counter

    from benchmarks.serve_load import LoadResult, RequestRecord

    spec = LoadSpec(requests=3, concurrency=2)

    def clean():
        records = [RequestRecord(0, True, 1, "ok", 200, 0.1, 0.2, 24, Counter({0: 1}), 1, 0, {"a"}),
                   RequestRecord(1, False, 1, "ok", 200, None, 0.2, 24, Counter({0: 1}), 0, 0, {"b"}),
                   RequestRecord(2, True, 1, "hung-up", 200, 0.1, 0.1, None, Counter(), 0, 0, {"c"})]
        return LoadResult(spec, records, [(200, 0.01)], 1.0, 200)

    before = {"gptmeg:requests_received_total": 5.0, 'gptmeg:requests_total{outcome="completed"}': 5.0}
    after = {"gptmeg:requests_received_total": 8.0, 'gptmeg:requests_total{outcome="completed"}': 7.0,
             'gptmeg:requests_total{outcome="cancelled"}': 1.0}
    assert clean().nothing_lost_failures(before, after) == []

    def failures(change=None, metrics=None):
        result = clean()
        if change:
            change(result)
        return " ".join(result.nothing_lost_failures(before, {**after, **(metrics or {})}))

    assert failures(lambda r: r.records.pop()).startswith("1:")
    assert "2:" in failures(lambda r: setattr(r.records[1], "outcome", "http 500") or
                            setattr(r.records[1], "status", 500))
    assert "2:" in failures(lambda r: setattr(r.records[1], "outcome", "transport ReadError"))
    assert "3:" in failures(lambda r: setattr(r.records[0], "done", 2))
    assert "3:" in failures(lambda r: r.records[1].finish_reasons.update({0: 1}))
    assert "4:" in failures(lambda r: setattr(r.records[1], "ids", {"a"}))
    assert "5:" in failures(metrics={"gptmeg:requests_received_total": 9.0})
    assert "6:" in failures(metrics={'gptmeg:requests_total{outcome="completed"}': 6.0})
    assert "7:" in failures(metrics={'gptmeg:requests_total{outcome="cancelled"}': 0.0,
                                     'gptmeg:requests_total{outcome="completed"}': 8.0})
    assert "8:" in failures(lambda r: setattr(r, "health_after", 503))
