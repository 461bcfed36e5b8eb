"""Prometheus metrics of the server (``GET /metrics``), prefixed ``gptmeg:`` as vLLM prefixes ``vllm:``.

Counters and gauges are read from the scheduler's :class:`SchedulerStats` at scrape time (one writer, no locks on
the hot path); the two latency histograms are fed by the scheduler as requests progress.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .scheduler import Scheduler

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """The registry behind ``/metrics``. ``observe`` is the scheduler's callback; ``invalid`` counts requests the
    HTTP layer refused before they reached the scheduler (4xx)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.invalid = 0
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(self))
        self._histograms = {
            "time_to_first_token": Histogram("gptmeg:time_to_first_token_seconds",
                                             "Time from a request's arrival to its first generated token.",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry),
            "latency": Histogram("gptmeg:e2e_request_latency_seconds",
                                 "Time from a request's arrival to its last generated token.",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry),
        }

    def observe(self, name: str, seconds: float) -> None:
        self._histograms[name].observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatsCollector:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        scheduler = self.metrics.scheduler
        stats = scheduler.stats
        received = CounterMetricFamily("gptmeg:requests_received", "Requests accepted into the queue.")
        received.add_metric([], stats.received)
        yield received
        outcomes = CounterMetricFamily("gptmeg:requests", "Requests by outcome: completed, cancelled (client gone), "
                                       "failed (a step raised), rejected (queue full, 429), invalid (4xx).",
                                       labels=["outcome"])
        for outcome in ("completed", "cancelled", "failed", "rejected"):
            outcomes.add_metric([outcome], getattr(stats, outcome))
        outcomes.add_metric(["invalid"], self.metrics.invalid)
        yield outcomes
        for name, value, text in (
            ("prompt_tokens", stats.prompt_tokens, "Prompt tokens of accepted requests."),
            ("generation_tokens", stats.generated_tokens, "Generated tokens."),
            ("decode_steps", stats.decode_steps, "Decode steps run."),
            ("decode_rows", stats.decode_rows, "Rows summed over decode steps (occupancy = rows / steps)."),
            ("prefills", stats.prefills, "Prefill calls (each joins one or more choices)."),
        ):
            counter = CounterMetricFamily(f"gptmeg:{name}", text)
            counter.add_metric([], value)
            yield counter
        for name, value, text in (
            ("num_requests_waiting", stats.waiting, "Choices waiting to join the batch."),
            ("num_requests_running", stats.running, "Rows in the running batch."),
            ("batch_occupancy", stats.decode_rows / stats.decode_steps if stats.decode_steps else 0.0,
             "Mean rows per decode step since start."),
            ("max_batch", scheduler.max_batch, "Largest batch (--max-batch)."),
            ("scheduler_alive", 1.0 if scheduler.alive else 0.0, "1 while the scheduler thread runs."),
        ):
            gauge = GaugeMetricFamily(f"gptmeg:{name}", text)
            gauge.add_metric([], value)
            yield gauge
