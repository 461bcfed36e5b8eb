"""A load generator for `python -m engines serve`: asyncio + httpx, no locust.

N ``POST /v1/completions`` requests at concurrency C against a server (loopback only), streamed or not, greedy or
sampled, prompts of P random token ids (or one text), ``max_tokens`` M; optionally every k-th stream is hung up
after its first few text chunks. Streams are read incrementally (SSE), so the time to first token is the arrival
of the first chunk with text. ``/health`` is probed every ~50 ms meanwhile. Every call has a timeout.

Each request ends with exactly one record: its outcome (``ok``, ``hung-up``, ``http <status>``, ``sse-error`` or
``transport <Error>``), time to first token, latency, completion tokens from ``usage`` (streams ask for
``stream_options.include_usage``), the number of ``finish_reason``s per choice, the number of ``[DONE]``s and the
response ids it saw. :class:`LoadResult` gives the figures of research/serving.md §7.2 and checks the eight
"nothing lost" assertions of §7.3 against the server's ``/metrics`` before and after the run.

    .venv/bin/python -m benchmarks.serve_load http://127.0.0.1:8000 [--requests 64] [--concurrency 8]
        [--prompt-tokens 8] [--max-tokens 24] [--non-stream-every 4] [--hang-up-every 6] [--temperature 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

__all__ = ["LoadResult", "LoadSpec", "RequestRecord", "format_summary", "percentile", "read_metrics", "run_load", "run_load_sync",
           "settled_metrics"]

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class LoadSpec:
    """What the load is. Request ``i`` is a plain (non-stream) request when ``stream`` is False or
    ``non_stream_every`` divides ``i + 1``; among the streams, every ``hang_up_every``-th is hung up after
    ``hang_up_after`` text chunks (it asks for ``hang_up_max_tokens`` tokens, so that it is still generating then)."""

    requests: int = 64
    concurrency: int = 8
    prompt_tokens: int = 8  # random ids in [2, vocab_size) ...
    vocab_size: int = 256
    prompt_text: str | None = None  # ... or this text for every prompt
    max_tokens: int = 24
    temperature: float = 0.0  # 0: greedy; > 0: sampled, seed = seed + i when seed is set
    seed: int | None = None
    ignore_eos: bool = True
    n: int = 1
    stream: bool = True
    non_stream_every: int = 0  # 0: no plain requests among the streams
    hang_up_every: int = 0  # 0: no hang-ups
    hang_up_after: int = 2
    hang_up_max_tokens: int | None = None  # None: max_tokens
    model: str | None = None
    api_key: str | None = None
    timeout: float = 60.0  # seconds, per request (and the read timeout between two stream chunks)
    health_interval: float = 0.05
    prompt_seed: int = 0

    def __post_init__(self):
        if self.requests < 1 or self.concurrency < 1 or self.max_tokens < 1 or self.n < 1:
            raise ValueError("requests, concurrency, max_tokens and n must be >= 1.")
        if self.prompt_text is None and self.prompt_tokens < 1:
            raise ValueError("prompt_tokens must be >= 1 (or give prompt_text).")


@dataclass(frozen=True)
class Planned:
    index: int
    stream: bool
    hang_up: bool
    body: dict


def plan(spec: LoadSpec) -> list[Planned]:
    """The requests, in order; deterministic for a spec."""
    rng = random.Random(spec.prompt_seed)
    planned, streams = [], 0
    for index in range(spec.requests):
        stream = spec.stream and not (spec.non_stream_every and (index + 1) % spec.non_stream_every == 0)
        hang_up = False
        if stream:
            streams += 1
            hang_up = bool(spec.hang_up_every) and streams % spec.hang_up_every == 0
        prompt = spec.prompt_text if spec.prompt_text is not None else \
            [rng.randrange(2, spec.vocab_size) for _ in range(spec.prompt_tokens)]
        body = {"prompt": prompt, "max_tokens": spec.max_tokens, "temperature": spec.temperature, "n": spec.n,
                "ignore_eos": spec.ignore_eos, "stream": stream}
        if hang_up and spec.hang_up_max_tokens is not None:
            body["max_tokens"] = spec.hang_up_max_tokens
        if spec.model is not None:
            body["model"] = spec.model
        if spec.seed is not None and spec.temperature > 0:
            body["seed"] = spec.seed + index
        if stream:
            body["stream_options"] = {"include_usage": True}
        planned.append(Planned(index, stream, hang_up, body))
    return planned


@dataclass
class RequestRecord:
    index: int
    stream: bool
    choices: int  # choices the request asked for (prompts x n)
    outcome: str = "pending"  # ok | hung-up | http <status> | sse-error | transport <Error> | protocol
    status: int | None = None
    ttft: float | None = None  # seconds to the first chunk with text (streams)
    latency: float | None = None  # seconds to the last byte (or to the hang-up)
    completion_tokens: int | None = None  # from usage
    finish_reasons: Counter = field(default_factory=Counter)  # choice index -> finish_reasons seen
    done: int = 0  # [DONE] events seen
    after_done: int = 0  # events after the first [DONE]
    ids: set = field(default_factory=set)  # response ids seen
    text_chunks: int = 0
    error: str | None = None

    @property
    def error_class(self) -> str | None:
        """None for ok and hung-up; else 4xx, 5xx (an SSE error chunk counts as 5xx), transport or protocol."""
        if self.outcome in ("ok", "hung-up"):
            return None
        if self.outcome == "sse-error" or (self.status is not None and self.status >= 500):
            return "5xx"
        if self.status is not None and self.status >= 400:
            return "4xx"
        if self.outcome.startswith("transport"):
            return "transport"
        return "protocol"


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan when there are no values. p99 of fewer than 100 is the max."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _outcomes(metrics: dict, name: str) -> float:
    return metrics.get(f'gptmeg:requests_total{{outcome="{name}"}}', 0.0)


@dataclass
class LoadResult:
    spec: LoadSpec
    records: list[RequestRecord]
    health: list[tuple[int | None, float]]  # (status or None on a transport error, seconds) of each probe
    wall: float  # seconds from the first request sent to the last record
    health_after: int | None = None  # GET /health status right after the run (None: no answer)

    # --- figures (§7.2) -----------------------------------------------------------------------------------------

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.outcome == "ok"]

    @property
    def hung_up(self) -> list[RequestRecord]:
        return [r for r in self.records if r.outcome == "hung-up"]

    @property
    def usage_tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.ok)

    def errors(self) -> Counter:
        return Counter(r.error_class for r in self.records if r.error_class is not None)

    def summary(self, before: dict | None = None, after: dict | None = None) -> dict:
        """The §7.2 figures; with the server's metrics before and after, also its counters' deltas."""
        ttfts = [r.ttft for r in self.records if r.ttft is not None]
        latencies = [r.latency for r in self.ok if r.latency is not None]
        probes = [seconds for status, seconds in self.health if status == 200]
        figures = {
            "requests": len(self.records),
            "wall_s": self.wall,
            "requests_per_s": len(self.records) / self.wall if self.wall else math.nan,
            "usage_tokens": self.usage_tokens,
            "tokens_per_s": self.usage_tokens / self.wall if self.wall else math.nan,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "health_probes": len(self.health),
            "health_failed": len(self.health) - len(probes),
            "health_p50_s": percentile(probes, 50),
            "health_p99_s": percentile(probes, 99),
            "errors": dict(self.errors()),
            "hang_ups": len(self.hung_up),
        }
        if before is not None and after is not None:
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            steps, rows = delta.get("gptmeg:decode_steps_total", 0.0), delta.get("gptmeg:decode_rows_total", 0.0)
            generated = delta.get("gptmeg:generation_tokens_total", 0.0)
            figures.update({
                "occupancy": rows / steps if steps else math.nan,
                "server_generated_tokens": generated,
                "server_tokens_per_s": generated / self.wall if self.wall else math.nan,
                "server_received": delta.get("gptmeg:requests_received_total", 0.0),
                "server_cancelled": _outcomes(after, "cancelled") - _outcomes(before, "cancelled"),
                # tokens the server generated that no finished answer carried: the hung-up streams' share
                "tokens_per_hang_up": (generated - self.usage_tokens) / len(self.hung_up) if self.hung_up
                else math.nan,
            })
        return figures

    # --- "nothing lost" (§7.3) ----------------------------------------------------------------------------------

    def nothing_lost_failures(self, before: dict, after: dict) -> list[str]:
        """The §7.3 assertions that do not hold (an empty list when nothing was lost). ``before``/``after`` are the
        server's /metrics (see :func:`read_metrics`) before the run and once it settled (:func:`settled_metrics`)."""
        failures = []
        n = self.spec.requests
        # 1. every request got exactly one outcome on the client
        indices = [r.index for r in self.records]
        if len(self.records) != n or sorted(indices) != list(range(n)):
            failures.append(f"1: {len(self.records)} records for {n} requests (indices {sorted(set(indices))[:8]}...)")
        pending = [r.index for r in self.records if r.outcome == "pending"]
        if pending:
            failures.append(f"1: requests without an outcome: {pending}")
        # 2. no 5xx (an SSE error chunk included), no transport errors, nothing else refused
        errors = self.errors()
        if errors:
            examples = [f"#{r.index} {r.outcome}: {r.error}" for r in self.records if r.error_class][:3]
            failures.append(f"2: errors by class {dict(errors)}; e.g. {examples}")
        # 3. one finish_reason per choice of each answered request; one [DONE] per finished stream, nothing after
        for r in self.ok:
            wanted = Counter({choice: 1 for choice in range(r.choices)})
            if r.finish_reasons != wanted:
                failures.append(f"3: request #{r.index} finish_reasons per choice {dict(r.finish_reasons)}, "
                                f"expected one for each of {r.choices}")
            if r.stream and (r.done != 1 or r.after_done):
                failures.append(f"3: stream #{r.index} had {r.done} [DONE] and {r.after_done} events after it")
        for r in self.hung_up:
            if any(count > 1 for count in r.finish_reasons.values()) or r.done:
                failures.append(f"3: hung-up stream #{r.index} saw {dict(r.finish_reasons)} finish_reasons and "
                                f"{r.done} [DONE]")
        # 4. response ids unique (and one id per response)
        seen: Counter = Counter()
        for r in self.records:
            if len(r.ids) > 1:
                failures.append(f"4: request #{r.index} carried {len(r.ids)} ids: {sorted(r.ids)}")
            seen.update(r.ids)
        duplicated = [i for i, count in seen.items() if count > 1]
        if duplicated:
            failures.append(f"4: response ids shared by several requests: {duplicated}")
        answered = [r for r in self.records if r.outcome in ("ok", "hung-up")]
        if any(not r.ids for r in answered if r.outcome == "ok"):
            failures.append("4: an answered request had no id")
        # 5.-7. the server's counters
        received = after.get("gptmeg:requests_received_total", 0.0) - before.get("gptmeg:requests_received_total",
                                                                                    0.0)
        ended = {o: _outcomes(after, o) - _outcomes(before, o) for o in ("completed", "cancelled", "failed",
                                                                          "rejected", "invalid")}
        if received != n:
            failures.append(f"5: the server received {received:g} requests, the client sent {n}")
        if ended["completed"] + ended["cancelled"] + ended["failed"] != received:
            failures.append(f"6: completed {ended['completed']:g} + cancelled {ended['cancelled']:g} + failed "
                            f"{ended['failed']:g} != received {received:g}")
        if ended["failed"] or ended["rejected"] or ended["invalid"]:
            failures.append(f"6: failed {ended['failed']:g}, rejected {ended['rejected']:g}, invalid "
                            f"{ended['invalid']:g} (expected none)")
        if ended["cancelled"] != len(self.hung_up):
            failures.append(f"7: the server cancelled {ended['cancelled']:g} requests, the client hung up "
                            f"{len(self.hung_up)}")
        if ended["completed"] != len(self.ok):
            failures.append(f"7: the server completed {ended['completed']:g} requests, the client got "
                            f"{len(self.ok)} answers")
        # 8. /health 200 after the run
        if self.health_after != 200:
            failures.append(f"8: GET /health answered {self.health_after} after the run")
        return failures


# --- the client -------------------------------------------------------------------------------------------------


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and f"[{host}]" not in LOOPBACK:
        raise ValueError(f"the load generator only talks to loopback servers, not {host!r}.")


def _headers(spec: LoadSpec) -> dict:
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}


def _read_choices(record: RequestRecord, payload: dict) -> bool:
    """Account one response object (a whole answer or a chunk); True when it carried text."""
    if "id" in payload:
        record.ids.add(payload["id"])
    text = False
    for choice in payload.get("choices") or []:
        if choice.get("text"):
            text = True
        if choice.get("finish_reason") is not None:
            record.finish_reasons[choice.get("index")] += 1
    usage = payload.get("usage")
    if usage:
        record.completion_tokens = usage.get("completion_tokens")
    return text


async def _plain(client: httpx.AsyncClient, url: str, job: Planned, record: RequestRecord, spec: LoadSpec,
                 started: float) -> None:
    response = await client.post(url, json=job.body, headers=_headers(spec))
    record.latency = time.perf_counter() - started
    record.status = response.status_code
    if response.status_code != 200:
        record.outcome, record.error = f"http {response.status_code}", response.text[:300]
        return
    try:
        _read_choices(record, response.json())
    except (ValueError, AttributeError) as error:
        record.outcome, record.error = "protocol", f"the answer is not a completion object ({error})"
        return
    record.outcome = "ok"


async def _stream(client: httpx.AsyncClient, url: str, job: Planned, record: RequestRecord, spec: LoadSpec,
                  started: float) -> None:
    async with client.stream("POST", url, json=job.body, headers=_headers(spec)) as response:
        record.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            record.latency = time.perf_counter() - started
            record.outcome, record.error = f"http {response.status_code}", response.text[:300]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if record.done:
                record.after_done += 1
            if data == "[DONE]":
                record.done += 1
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                record.outcome, record.error = "protocol", f"a chunk is not JSON: {data[:200]!r}"
                return
            if "error" in payload:
                record.outcome, record.error = "sse-error", json.dumps(payload["error"])[:300]
            elif _read_choices(record, payload):
                record.text_chunks += 1
                if record.ttft is None:
                    record.ttft = time.perf_counter() - started
                if job.hang_up and record.text_chunks >= spec.hang_up_after:
                    record.latency = time.perf_counter() - started
                    record.outcome = "hung-up"
                    return  # leaving the context closes the connection mid-stream
        record.latency = time.perf_counter() - started
        if record.outcome == "pending":
            record.outcome = "ok" if record.done else "protocol"
            if not record.done:
                record.error = "the stream ended without [DONE]"


async def _one(client: httpx.AsyncClient, url: str, job: Planned, spec: LoadSpec) -> RequestRecord:
    prompt = job.body["prompt"]
    prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else 1
    record = RequestRecord(job.index, job.stream, spec.n * prompts)
    started = time.perf_counter()
    try:
        await (_stream if job.stream else _plain)(client, url, job, record, spec, started)
    except httpx.HTTPError as error:
        record.latency = time.perf_counter() - started
        record.outcome, record.error = f"transport {type(error).__name__}", str(error)[:300]
    return record


async def _probe_health(client: httpx.AsyncClient, url: str, interval: float, stop: asyncio.Event,
                        out: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            status = (await client.get(url, timeout=5.0)).status_code
        except httpx.HTTPError:
            status = None
        out.append((status, time.perf_counter() - started))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def run_load(url: str, spec: LoadSpec) -> LoadResult:
    """Run the load against ``url`` (``http://127.0.0.1:PORT``, the server root) and return every record."""
    _check_loopback(url)
    url = url.rstrip("/")
    jobs = plan(spec)
    timeout = httpx.Timeout(spec.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    records: list[RequestRecord] = []
    health: list[tuple[int | None, float]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client, \
            httpx.AsyncClient(timeout=5.0, trust_env=False) as prober:

        async def worker():
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records.append(await _one(client, f"{url}/v1/completions", job, spec))

        stop = asyncio.Event()
        probe = asyncio.create_task(_probe_health(prober, f"{url}/health", spec.health_interval, stop, health))
        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        finally:
            wall = time.perf_counter() - started
            stop.set()
            await probe
        try:
            health_after = (await prober.get(f"{url}/health")).status_code
        except httpx.HTTPError:
            health_after = None
    records.sort(key=lambda r: r.index)
    return LoadResult(spec, records, health, wall, health_after)


def run_load_sync(url: str, spec: LoadSpec) -> LoadResult:
    return asyncio.run(run_load(url, spec))


# --- the server's counters ----------------------------------------------------------------------------------------


def read_metrics(url: str, timeout: float = 10.0) -> dict[str, float]:
    """``GET /metrics`` as {sample name with labels: value}."""
    _check_loopback(url)
    samples = {}
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout, trust_env=False).text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def settled_metrics(url: str, before: dict, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once the server has accounted for every request it received since ``before``: every received
    request completed, cancelled or failed, nothing waiting or running (a hang-up is counted at the scheduler's next
    step, a moment after the client left). After ``timeout`` seconds, whatever it says then."""
    deadline = time.monotonic() + timeout
    while True:
        after = read_metrics(url)
        received = after.get("gptmeg:requests_received_total", 0) - before.get("gptmeg:requests_received_total", 0)
        ended = sum(_outcomes(after, o) - _outcomes(before, o) for o in ("completed", "cancelled", "failed"))
        idle = not after.get("gptmeg:num_requests_waiting", 0) and not after.get("gptmeg:num_requests_running", 0)
        if (ended == received and idle) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def format_summary(figures: dict) -> str:
    ms = lambda key: f"{1e3 * figures[key]:.1f} ms"  # noqa: E731
    lines = [
        f"requests {figures['requests']} in {figures['wall_s']:.2f} s: {figures['requests_per_s']:.2f} req/s, "
        f"{figures['tokens_per_s']:.1f} generated tok/s (usage, {figures['usage_tokens']} tokens)",
        f"TTFT p50 {ms('ttft_p50_s')}, p99 {ms('ttft_p99_s')}; latency p50 {ms('latency_p50_s')}, "
        f"p99 {ms('latency_p99_s')}",
        f"/health p50 {ms('health_p50_s')}, p99 {ms('health_p99_s')} over {figures['health_probes']} probes "
        f"({figures['health_failed']} failed)",
        f"errors {figures['errors'] or 'none'}; hang-ups {figures['hang_ups']}",
    ]
    if "occupancy" in figures:
        lines.append(f"server: occupancy {figures['occupancy']:.2f}, {figures['server_generated_tokens']:g} tokens "
                     f"generated, received {figures['server_received']:g}, cancelled "
                     f"{figures['server_cancelled']:g}, {figures['tokens_per_hang_up']:.1f} tokens per hang-up")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server root, e.g. http://127.0.0.1:8000")
    for name, default in (("requests", 64), ("concurrency", 8), ("prompt-tokens", 8), ("vocab-size", 256),
                          ("max-tokens", 24), ("non-stream-every", 0), ("hang-up-every", 0), ("hang-up-after", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt-text", default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    spec = LoadSpec(requests=args.requests, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                    vocab_size=args.vocab_size, prompt_text=args.prompt_text, max_tokens=args.max_tokens,
                    temperature=args.temperature, non_stream_every=args.non_stream_every,
                    hang_up_every=args.hang_up_every, hang_up_after=args.hang_up_after, timeout=args.timeout)
    before = read_metrics(args.url)
    result = run_load_sync(args.url, spec)
    after = settled_metrics(args.url, before)
    print(format_summary(result.summary(before, after)))
    failures = result.nothing_lost_failures(before, after)
    print("nothing lost: " + ("yes" if not failures else "NO\n  " + "\n  ".join(failures)))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
