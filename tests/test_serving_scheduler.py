"""The continuous-batching scheduler on the tiny export: rows that join and leave a running batch at chosen steps
generate exactly what they generate alone; seeded sampling does not depend on what shares the batch; stop strings,
cancellation, a failing step and a full queue."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from engines import GenerationSettings, SamplingSettings, generate, make_runtime, open_export
from engines.serving import ChoiceSettings, ChoiceText, Delta, Failed, Finished, Overloaded, Request, Scheduler


class Collector:
    """A request's sink: every event, in order."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def texts(self, choices: int = 1) -> list[str]:
        return ["".join(e.text for e in self.events if isinstance(e, Delta) and e.choice == c) for c in range(choices)]

    def reasons(self, choices: int = 1) -> list[str | None]:
        return [next((e.finish_reason for e in self.events if isinstance(e, Delta) and e.choice == c
                      and e.finish_reason), None) for c in range(choices)]


class SteppingRuntime:
    """Wraps a runtime: runs ``hooks[k]()`` before the k-th step call (0-based), optionally raises at some calls."""

    def __init__(self, runtime, hooks=None, fail_at=()):
        self._runtime, self.fail_at, self.calls = runtime, set(fail_at), 0
        self.hooks = hooks if hooks is not None else {}  # the caller may add hooks later
        self.spec, self.name = runtime.spec, runtime.name

    def step(self, *args):
        call, self.calls = self.calls, self.calls + 1
        for hook in self.hooks.pop(call, []):
            hook()
        if call in self.fail_at:
            raise RuntimeError(f"injected failure at step call {call}")
        return self._runtime.step(*args)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def export(request, tiny_exports):
    artifact = open_export(tiny_exports(request.param).folder)
    return artifact, make_runtime(artifact, threads=1)


def _alone(runtime, prompt, max_new_tokens, sampling=SamplingSettings(), seed=0, eos=-1):
    return generate(runtime, [prompt], GenerationSettings(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                                          eos_token_id=eos)).tokens[0]


def _wait(collectors, timeout=60.0):
    for collector in collectors:
        assert collector.done.wait(timeout), "a request never finished"


def test_rows_joining_and_leaving_at_chosen_steps_equal_generate_alone(export):
    artifact, runtime = export
    rng = np.random.default_rng(0)
    lengths, joins, budgets = [5, 11, 2, 17, 8], [0, 3, 7, 7, 12], [9, 4, 14, 6, 10]
    prompts = [rng.integers(0, artifact.spec.vocab_size, n).tolist() for n in lengths]
    collectors = [Collector() for _ in prompts]
    hooks: dict[int, list] = {}
    stepping = SteppingRuntime(runtime, hooks)
    scheduler = Scheduler(stepping, artifact.tokenizer.decode, max_batch=3)
    requests = [Request([p], ChoiceSettings(max_new_tokens=b, sampling=SamplingSettings(), ignore_eos=True), c)
                for p, b, c in zip(prompts, budgets, collectors)]
    for request, step in zip(requests[1:], joins[1:]):
        hooks.setdefault(step, []).append(lambda r=request: scheduler.submit(r))
    scheduler.start()
    try:
        scheduler.submit(requests[0])
        _wait(collectors)
    finally:
        scheduler.stop()
    decode = artifact.tokenizer.decode
    for prompt, budget, collector in zip(prompts, budgets, collectors):
        tokens = _alone(runtime, prompt, budget)
        assert collector.texts() == [decode(tokens)]
        assert collector.reasons() == ["length"]
        assert collector.events[-1] == Finished(len(prompt), budget)
    stats = scheduler.stats
    assert stats.completed == 5 and stats.decode_rows > stats.decode_steps  # rows really shared steps
    assert stats.prefills >= 3  # joiners were prefilled while others were running


def test_seeded_sampling_does_not_depend_on_what_shares_the_batch(export):
    artifact, runtime = export
    sampling = SamplingSettings(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    prompt = artifact.tokenizer.encode("Once upon a time").ids
    expected = artifact.tokenizer.decode(_alone(runtime, prompt, 12, sampling, seed=7))

    def run(neighbours: int) -> str:
        scheduler = Scheduler(runtime, artifact.tokenizer.decode, max_batch=4).start()
        try:
            mine = Collector()
            others = [Collector() for _ in range(neighbours)]
            for k, other in enumerate(others):
                scheduler.submit(Request([[3 + k, 9, 27]], ChoiceSettings(max_new_tokens=5 + 3 * k, sampling=sampling,
                                                                          seed=100 + k, ignore_eos=True), other))
            scheduler.submit(Request([prompt], ChoiceSettings(max_new_tokens=12, sampling=sampling, seed=7,
                                                              ignore_eos=True), mine))
            _wait([mine, *others])
        finally:
            scheduler.stop()
        return mine.texts()[0]

    assert run(0) == expected
    assert run(3) == expected


def test_n_choices_use_consecutive_seeds_and_differ(export):
    artifact, runtime = export
    sampling = SamplingSettings(do_sample=True, temperature=1.0)
    prompt = artifact.tokenizer.encode("Hello").ids
    scheduler = Scheduler(runtime, artifact.tokenizer.decode, max_batch=2).start()  # n=3 > max_batch: split joins
    try:
        collector = Collector()
        scheduler.submit(Request([prompt], ChoiceSettings(max_new_tokens=10, sampling=sampling, seed=5,
                                                          ignore_eos=True), collector, n=3))
        _wait([collector])
    finally:
        scheduler.stop()
    decode = artifact.tokenizer.decode
    assert collector.texts(3) == [decode(_alone(runtime, prompt, 10, sampling, seed=5 + j)) for j in range(3)]
    assert len(set(collector.texts(3))) > 1
    assert collector.events[-1] == Finished(len(prompt), 30)  # the prompt counted once, completions summed


def test_stop_string_is_cut_and_never_half_sent(export):
    artifact, runtime = export
    decode = artifact.tokenizer.decode
    prompt = artifact.tokenizer.encode("The quick brown fox").ids
    full = decode(_alone(runtime, prompt, 30))
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    scheduler = Scheduler(runtime, decode).start()
    try:
        collector = Collector()
        scheduler.submit(Request([prompt], ChoiceSettings(max_new_tokens=30, stop=("zzzz-never", stop),
                                                          ignore_eos=True), collector))
        _wait([collector])
    finally:
        scheduler.stop()
    assert collector.texts() == [full[:full.index(stop)]]  # deltas only append: a half-sent stop would stay
    assert collector.reasons() == ["stop"]


def test_choice_text_holds_back_stop_prefixes_and_incomplete_utf8():
    vocab = {0: b"ab", 1: b"c", 2: b"\xe2\x82", 3: b"\xac", 4: b"STO", 5: b"P", 6: b"ST", 7: b"x"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    text = ChoiceText(decode, stop=("STOP",))
    sent = [text.push(t) for t in (0, 1, 2, 3, 6, 7)]  # "ab", "c", half of "€", its end, "ST", "x"
    assert sent == ["", "", "", "a", "bc", "€"]  # the last 3 characters are held back (they may start "STOP")
    assert not text.stopped and text.finish() == "STx"
    text = ChoiceText(decode, stop=("STOP",))
    sent = [text.push(t) for t in (0, 4, 5)]
    assert text.stopped and "".join(sent) == "ab" and text.text == "ab"
    text = ChoiceText(decode)
    assert [text.push(2), text.finish()] == ["", "\ufffd"]  # an incomplete character is flushed at the end


def test_cancelled_request_leaves_within_one_step(export):
    artifact, runtime = export
    scheduler = Scheduler(runtime, artifact.tokenizer.decode, max_batch=4).start()
    try:
        keeper, quitter = Collector(), Collector()
        scheduler.submit(Request([[5, 6, 7]], ChoiceSettings(max_new_tokens=40, ignore_eos=True), keeper))
        request = Request([[8, 9]], ChoiceSettings(max_new_tokens=200, ignore_eos=True), quitter)

        def sink(event, original=quitter):
            original(event)
            if len(original.events) == 3:
                request.cancel()

        request.sink = sink
        scheduler.submit(request)
        _wait([keeper])
        deadline = time.monotonic() + 10
        while scheduler.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert len(quitter.events) <= 4  # at most the step already under way when it was cancelled
    assert not quitter.done.is_set()  # a cancelled request gets no Finished
    assert scheduler.stats.cancelled == 1 and scheduler.stats.completed == 1 and scheduler.stats.running == 0
    assert keeper.texts() == [artifact.tokenizer.decode(_alone(runtime, [5, 6, 7], 40))]


def test_a_failing_step_fails_only_its_rows_and_the_next_request_succeeds(export):
    artifact, runtime = export
    stepping = SteppingRuntime(runtime, fail_at={2})
    scheduler = Scheduler(stepping, artifact.tokenizer.decode, max_batch=4).start()
    try:
        first = Collector()
        scheduler.submit(Request([[5, 6, 7]], ChoiceSettings(max_new_tokens=10, ignore_eos=True), first))
        _wait([first])
        second = Collector()
        scheduler.submit(Request([[5, 6, 7]], ChoiceSettings(max_new_tokens=10, ignore_eos=True), second))
        _wait([second])
    finally:
        scheduler.stop()
    assert isinstance(first.events[-1], Failed) and "injected failure" in first.events[-1].message
    assert second.texts() == [artifact.tokenizer.decode(_alone(runtime, [5, 6, 7], 10))]
    assert scheduler.stats.failed == 1 and scheduler.stats.completed == 1


def test_a_full_queue_is_refused_and_a_stopped_scheduler_fails_what_it_held(export):
    artifact, runtime = export
    scheduler = Scheduler(runtime, artifact.tokenizer.decode, max_batch=1, max_waiting=2).start()
    with pytest.raises(Overloaded, match="at most 2"):
        scheduler.submit(Request([[5]], ChoiceSettings(), Collector(), n=3))
    assert scheduler.stats.rejected == 1
    held = Collector()
    scheduler.submit(Request([[5]], ChoiceSettings(max_new_tokens=200, ignore_eos=True), held))
    scheduler.stop()
    assert not scheduler.alive
    _wait([held], timeout=5)
    assert isinstance(held.events[-1], Failed) and "shutting down" in held.events[-1].message


class PaddedVocabulary:
    """A runtime whose spec says the last 10 ids are a Megatron vocabulary's padding, and whose logits favour them."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.spec = dataclasses.replace(runtime.spec, emit_vocab_size=runtime.spec.vocab_size - 10)
        self.name = runtime.name

    def step(self, *args):
        out = self._runtime.step(*args)
        out.logits[:, self.spec.emit_vocab_size:] = 1e4
        return out

    def __getattr__(self, name):
        return getattr(self._runtime, name)


def test_padding_rows_of_a_megatron_vocabulary_are_never_generated(export):
    artifact, runtime = export
    padded = PaddedVocabulary(runtime)
    generated: set[int] = set()

    def decode(ids):  # the scheduler decodes every generated id
        generated.update(ids)
        return artifact.tokenizer.decode(ids)

    scheduler = Scheduler(padded, decode).start()
    try:
        greedy, sampled = Collector(), Collector()
        scheduler.submit(Request([[5, 6]], ChoiceSettings(max_new_tokens=8, ignore_eos=True), greedy))
        scheduler.submit(Request([[5, 6]], ChoiceSettings(max_new_tokens=8, ignore_eos=True, seed=1,
                                                          sampling=SamplingSettings(do_sample=True)), sampled))
        _wait([greedy, sampled])
    finally:
        scheduler.stop()
    # the padding ids would win every step; what came out is what the unpadded model generates
    assert greedy.texts() == [artifact.tokenizer.decode(_alone(runtime, [5, 6], 8))]
    assert sampled.events[-1] == Finished(2, 8)
    assert generated and max(generated) < padded.spec.emit_vocab_size


def test_cancelled_requests_leave_the_queue_before_their_turn(export):
    artifact, runtime = export
    scheduler = Scheduler(runtime, artifact.tokenizer.decode, max_batch=1, max_waiting=4).start()
    try:
        running = Collector()
        scheduler.submit(Request([[5, 6]], ChoiceSettings(max_new_tokens=150, ignore_eos=True), running))
        queued = [Request([[7]], ChoiceSettings(max_new_tokens=5), Collector()) for _ in range(3)]
        for request in queued:
            scheduler.submit(request)
        for request in queued:
            request.cancel()
        deadline = time.monotonic() + 10
        while scheduler.stats.cancelled < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not running.done.is_set()  # freed while the long request still runs, not when it is their turn
        assert scheduler.stats.cancelled == 3 and scheduler.stats.waiting == 0
        scheduler.submit(Request([[7]], ChoiceSettings(max_new_tokens=5), Collector(), n=4))  # the slots are free
        _wait([running])
    finally:
        scheduler.stop()
