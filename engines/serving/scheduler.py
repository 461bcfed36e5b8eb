"""Continuous (step-level) batching over one :class:`DecoderRuntime`, in one thread that owns the runtime.

Between decode steps, waiting choices join the running batch: they are prefilled on their own (left-padded,
positions counting real tokens only) and merged into it, the shorter cache left-padded so that every row's past is
right-aligned. A choice that finishes or whose request is cancelled leaves before the next step, and past columns
that no remaining row uses are dropped. Each row keeps its own position ids, sampling settings and random generator,
so a row generates what it would alone: greedy rows the same tokens, seeded rows the same draws, whatever shares
the batch (the logits of a row inside a batch differ from batch 1 only by float reordering: up to 1.9e-5 in fp32,
one ulp in fp16, which can flip a near-tie).

Results leave the thread through each request's ``sink`` callable (the HTTP layer hands them to its event loop);
the thread never blocks on a client.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import EngineError
from ..generation import left_pad
from ..runtime import DecoderRuntime
from ..sampling import SamplingSettings, select_next_tokens
from .text import ChoiceText

__all__ = ["ChoiceSettings", "Delta", "Failed", "Finished", "Overloaded", "Request", "Scheduler", "SchedulerStats"]


class Overloaded(EngineError):
    """The waiting queue is full: the request was not accepted (HTTP 429)."""


@dataclass(frozen=True)
class ChoiceSettings:
    """How one request's choices are generated."""

    max_new_tokens: int = 16
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = None  # choice j of a prompt draws from np.random.default_rng(seed + j); None: fresh entropy
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")


# --- events a request's sink receives (in this order per choice: Delta..., the last with finish_reason) ----------


@dataclass(frozen=True)
class Delta:
    choice: int  # index of the choice within the request
    text: str  # may be empty (a held-back character or stop-string prefix)
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" on the choice's last delta


@dataclass(frozen=True)
class Finished:
    """Every choice has ended: the request's token counts (usage)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed (a runtime step raised); nothing more follows."""

    message: str


Event = Delta | Finished | Failed


class Request:
    """One completion request: ``prompts`` (token ids) x ``n`` choices, in the response's order p * n + j."""

    _ids = itertools.count()

    def __init__(self, prompts: Sequence[Sequence[int]], settings: ChoiceSettings, sink: Callable[[Event], None],
                 *, n: int = 1):
        if not prompts or n < 1:
            raise ValueError("a request needs at least one prompt and one choice.")
        self.id = next(self._ids)
        self.prompts = [list(p) for p in prompts]
        self.settings = settings
        self.sink = sink
        self.n = n
        self.cancelled = False  # set from any thread; the scheduler drops the request's rows before its next step
        self.received_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self._open = len(self.prompts) * n
        self._ended = False  # completed, failed or cancelled: counted once in the stats

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def cancel(self) -> None:
        self.cancelled = True


class _Choice:
    """One row of the batch: a choice of a request."""

    def __init__(self, request: Request, index: int, decode: Callable[[list[int]], str], vocab: int,
                 max_sequence: int):
        self.request = request
        self.index = index
        self.prompt = request.prompts[index // request.n]
        settings = request.settings
        seed = None if settings.seed is None else settings.seed + index % request.n
        self.rng = np.random.default_rng(seed)
        self.sampling = settings.sampling
        self.greedy = not settings.sampling.do_sample and settings.sampling.repetition_penalty == 1.0
        self.seen: np.ndarray | None = None
        if settings.sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, dtype=bool)
            self.seen[self.prompt] = True
        self.budget = min(settings.max_new_tokens, max_sequence - len(self.prompt))
        self.text = ChoiceText(decode, settings.stop)
        self.generated = 0
        self.finished = False


@dataclass
class SchedulerStats:
    """Counters since start (read by the metrics endpoint; written by the scheduler thread only)."""

    received: int = 0  # requests accepted into the queue
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # refused because the queue was full
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # rows summed over decode steps: mean batch occupancy = decode_rows / decode_steps
    prefills: int = 0
    prefill_rows: int = 0
    waiting: int = 0  # choices waiting to join
    running: int = 0  # rows in the batch


class _Batch:
    """The running rows: cache (right-aligned past), mask (B, P), next position (B,), last token not yet fed (B,)."""

    def __init__(self, rows: list[_Choice], cache, mask: np.ndarray, positions: np.ndarray, tokens: np.ndarray):
        self.rows, self.cache, self.mask, self.positions, self.tokens = rows, cache, mask, positions, tokens


class Scheduler:
    """Owns ``runtime`` in its own thread and serves :class:`Request` objects with continuous batching.

    ``decode`` turns token ids into text (the export's tokenizer). ``max_batch`` rows run together; at most
    ``max_waiting`` choices wait (more is :class:`Overloaded`); one prefill takes joiners up to
    ``max_prefill_tokens`` padded prompt tokens (always at least one). ``observe(name, seconds)`` receives
    "time_to_first_token" and "latency" per finished request (metrics histograms).
    """

    def __init__(self, runtime: DecoderRuntime, decode: Callable[[list[int]], str], *, max_batch: int = 8,
                 max_waiting: int = 256, max_prefill_tokens: int = 2048,
                 observe: Callable[[str, float], None] | None = None):
        if max_batch < 1 or max_waiting < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch, max_waiting and max_prefill_tokens must be >= 1.")
        self.runtime = runtime
        self.spec = runtime.spec
        self.decode = decode
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.observe = observe or (lambda _name, _seconds: None)
        self.stats = SchedulerStats()
        self._nothing_seen = np.zeros((1, self.spec.vocab_size), dtype=bool)  # rows without a repetition penalty
        self._waiting: deque[_Choice] = deque()
        self._batch: _Batch | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the thread, if anything did

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="gptmeg-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- requests -------------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue every choice of ``request``; :class:`Overloaded` when the queue cannot take them all."""
        rows = len(request.prompts) * request.n
        with self._wake:
            if not self.alive:
                raise EngineError("the scheduler is not running.")
            if len(self._waiting) + rows > self.max_waiting:
                self.stats.rejected += 1
                raise Overloaded(f"the server is busy: {len(self._waiting)} choices are waiting (at most "
                                 f"{self.max_waiting}); retry later.")
            for index in range(rows):
                self._waiting.append(_Choice(request, index, self.decode, self.spec.vocab_size,
                                             self.spec.max_sequence))
            self.stats.received += 1
            self.stats.prompt_tokens += request.prompt_tokens
            self.stats.waiting = len(self._waiting)
            self._wake.notify_all()

    # --- the thread -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        joined = False
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and self._batch is None:
                        self._wake.wait()
                    if self._stopping:
                        break
                    self._purge_cancelled()
                    # a join holds the running rows for one prefill: alternate, so a stream of joiners that
                    # finish at once cannot starve them
                    joiners = [] if joined and self._batch is not None else self._take_joiners()
                joined = bool(joiners)
                if joiners:
                    self._join(joiners)
                elif self._batch is not None:
                    self._decode_step()
                self._drop_finished()
        except BaseException as error:  # noqa: BLE001 - recorded for /health; the thread must say why it died
            self.error = error
            raise
        finally:
            self._fail((self._batch.rows if self._batch else []) + list(self._waiting),
                       "the server is shutting down." if self.error is None else
                       f"the scheduler stopped: {error_text(self.error)}")
            self._batch = None
            self.stats.running = 0

    def _purge_cancelled(self) -> None:
        """Waiting choices of cancelled requests leave the queue at once (they hold --max-waiting slots)."""
        if any(c.request.cancelled for c in self._waiting):
            for choice in self._waiting:
                if choice.request.cancelled:
                    self._end(choice.request, "cancelled")
            self._waiting = deque(c for c in self._waiting if not c.request.cancelled)
            self.stats.waiting = len(self._waiting)

    def _take_joiners(self) -> list[_Choice]:
        """Waiting choices that fit the batch and the prefill budget (at least one when there is room)."""
        room = self.max_batch - (len(self._batch.rows) if self._batch else 0)
        joiners: list[_Choice] = []
        while self._waiting and len(joiners) < room:
            candidate = self._waiting[0]
            width = max([len(c.prompt) for c in joiners] + [len(candidate.prompt)])
            if joiners and width * (len(joiners) + 1) > self.max_prefill_tokens:
                break
            joiners.append(self._waiting.popleft())
        self.stats.waiting = len(self._waiting)
        return joiners

    def _join(self, joiners: list[_Choice]) -> None:
        """Prefill ``joiners`` and merge them into the running batch (whose rows do not advance this iteration)."""
        try:
            input_ids, mask = left_pad([c.prompt for c in joiners], self.spec.pad_token_id)
            positions = np.maximum(mask.cumsum(-1) - 1, 0)
            out = self.runtime.step(input_ids, mask, positions, self.runtime.empty_cache(len(joiners)))
            fresh = _Batch(joiners, out.cache, mask, positions[:, -1] + 1, np.zeros(len(joiners), dtype=np.int64))
            self.stats.prefills += 1
            self.stats.prefill_rows += len(joiners)
            self._sample(fresh, out.logits)
        except Exception as error:  # noqa: BLE001 - a failing step fails its rows; the thread serves the next ones
            self._fail(joiners, step_failed(error))
            return
        if self._batch is None:
            self._batch = fresh
        else:
            try:
                self._batch = self._merge(self._batch, fresh)
            except Exception as error:  # noqa: BLE001
                self._fail(self._batch.rows + joiners, step_failed(error))
                self._batch = None
        self.stats.running = len(self._batch.rows) if self._batch else 0

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        width = max(a.mask.shape[1], b.mask.shape[1])
        masks = [np.pad(m.mask, ((0, 0), (width - m.mask.shape[1], 0))) for m in (a, b)]
        return _Batch(a.rows + b.rows, self.runtime.merge_caches(a.cache, b.cache), np.concatenate(masks),
                      np.concatenate([a.positions, b.positions]), np.concatenate([a.tokens, b.tokens]))

    def _decode_step(self) -> None:
        batch = self._batch
        try:
            mask = np.concatenate([batch.mask, np.ones((len(batch.rows), 1), dtype=np.int64)], axis=1)
            out = self.runtime.step(batch.tokens[:, None], mask, batch.positions[:, None], batch.cache)
            batch.cache, batch.mask, batch.positions = out.cache, mask, batch.positions + 1
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(batch.rows)
            self._sample(batch, out.logits)
        except Exception as error:  # noqa: BLE001
            self._fail(batch.rows, step_failed(error))
            self._batch = None

    def _sample(self, batch: _Batch, logits: np.ndarray) -> None:
        """Pick each live row's next token and hand its text to the request."""
        if self.spec.emit_vocab_size is not None:  # padding rows of a Megatron vocabulary are never a token
            logits = logits.copy()
            logits[:, self.spec.emit_vocab_size:] = -np.inf
        greedy = [k for k, row in enumerate(batch.rows) if row.greedy]
        if greedy:
            batch.tokens[greedy] = logits[greedy].argmax(axis=-1)
        for k, row in enumerate(batch.rows):
            if not row.greedy:
                seen = row.seen[None] if row.seen is not None else self._nothing_seen
                batch.tokens[k] = select_next_tokens(logits[k:k + 1], seen, row.sampling, row.rng)[0]
        for k, row in enumerate(batch.rows):
            if not row.finished and not row.request.cancelled:
                self._accept(row, int(batch.tokens[k]))

    def _accept(self, row: _Choice, token: int) -> None:
        request = row.request
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
            self.observe("time_to_first_token", request.first_token_at - request.received_at)
        row.generated += 1
        request.completion_tokens += 1
        self.stats.generated_tokens += 1
        if row.seen is not None:
            row.seen[token] = True
        reason = None
        if token == self.spec.eos_token_id and not request.settings.ignore_eos:
            text, reason = row.text.finish(), "stop"
        else:
            text = row.text.push(token)
            if row.text.stopped:
                reason = "stop"
            elif row.generated >= row.budget:
                text, reason = text + row.text.finish(), "length"
        row.finished = reason is not None
        self._send(request, Delta(row.index, text, reason))
        if row.finished:
            request._open -= 1
            if request._open == 0:
                self._send(request, Finished(request.prompt_tokens, request.completion_tokens))
                self._end(request, "completed")
                self.observe("latency", time.perf_counter() - request.received_at)

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave; past columns no remaining row uses are dropped."""
        batch = self._batch
        if batch is None:
            return
        for row in batch.rows:
            if row.request.cancelled and not row.finished:
                row.finished = True
                self._end(row.request, "cancelled")
        keep = np.array([k for k, row in enumerate(batch.rows) if not row.finished], dtype=np.int64)
        if len(keep) == len(batch.rows):
            return
        if len(keep) == 0:
            self._batch = None
        else:
            mask = batch.mask[keep]
            start = int(mask.any(axis=0).argmax())  # leading columns that are padding for every kept row
            try:
                cache = self.runtime.select_rows(batch.cache, keep, start)
            except Exception as error:  # noqa: BLE001
                self._fail(batch.rows, step_failed(error))
                self._batch = None
                return
            self._batch = _Batch([batch.rows[k] for k in keep], cache, mask[:, start:], batch.positions[keep],
                                 batch.tokens[keep])
        self.stats.running = len(self._batch.rows) if self._batch else 0

    def _fail(self, rows: list[_Choice], message: str) -> None:
        """Each request with a row in ``rows`` fails with ``message`` (counted cancelled if its client left); its
        choices still waiting leave the queue."""
        for row in rows:
            row.finished = True
            request = row.request
            if not request._ended and not request.cancelled:
                self._send(request, Failed(message))
            self._end(request, "cancelled" if request.cancelled else "failed")
        self._cancel_waiting_of({row.request for row in rows})

    @staticmethod
    def _send(request: Request, event: Event) -> None:
        """Hand ``event`` to the request's sink; a sink that raises (its event loop closed) cancels the request."""
        try:
            request.sink(event)
        except Exception:  # noqa: BLE001 - whoever listened is gone; the thread must go on
            request.cancelled = True

    def _end(self, request: Request, outcome: str) -> None:
        """Count a request's outcome once: completed, cancelled or failed."""
        if request._ended:
            return
        request._ended = True
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _cancel_waiting_of(self, requests: set) -> None:
        """A failed request's choices that have not joined yet are dropped."""
        with self._wake:
            self._waiting = deque(c for c in self._waiting if c.request not in requests)
            self.stats.waiting = len(self._waiting)


def step_failed(error: BaseException) -> str:
    return f"generation failed: {error_text(error)}"


def error_text(error: BaseException) -> str:
    """One line naming the error: its message, or its type when it has none."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text or type(error).__name__
