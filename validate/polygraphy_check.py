"""A teacher-forced step check with Polygraphy's Comparator, where Polygraphy fits.

Polygraphy compares runners on independent iterations of a data loader; a KV cache chained through steps does not
fit that model, so the chained comparison lives in :func:`export.verify.compare_decoder`. What does fit: feeding
every runner the *reference's* cache at each step (teacher forcing). Each iteration is then independent, Polygraphy
runs the backend and the eager reference on the same feeds, and its ``CompareFunc.simple`` judges every output with
per-output tolerances: the per-step error without drift accumulated through the cache.

Optional: Polygraphy is in the ``validate`` extra; without it this check is reported as skipped.
"""

from __future__ import annotations

import time

import numpy as np

from engines.runtime import DecoderRuntime
from export.verify import validation_inputs

__all__ = ["teacher_forced_feeds", "polygraphy_check"]


def teacher_forced_feeds(reference: DecoderRuntime, vocab_size: int, batch: int, prompt: int, steps: int,
                         kv_dtype) -> list[dict[str, np.ndarray]]:
    """Prefill feeds (empty past) then ``steps`` decode feeds whose past is the reference's own ``present.*`` and
    whose token is the reference's greedy choice. Rows are unpadded, so every element is meaningful."""
    spec = reference.spec
    input_ids, mask = validation_inputs(vocab_size, batch=batch, prompt=prompt, pads=(0,), seed=2)
    ids, mask = input_ids.numpy(), mask.numpy()
    past = [np.zeros((batch, spec.n_head, 0, spec.head_dim), dtype=kv_dtype) for _ in spec.past_names()]
    feeds = []
    for _ in range(steps + 1):
        positions = np.broadcast_to(np.arange(mask.shape[1] - ids.shape[1], mask.shape[1]), ids.shape).copy()
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), **dict(zip(spec.past_names(), past))}
        feeds.append(feed)
        out = reference.infer(feed)
        past = [out[name].astype(kv_dtype) for name in spec.present_names()]
        ids = out["logits"][:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
    return feeds


def polygraphy_check(reference: DecoderRuntime, backend: DecoderRuntime, *, graph_dtype: str, batch: int = 2,
                     prompt: int = 24, steps: int = 3) -> dict:
    """{"available": bool, "passed": bool, "outputs": {name: {max_absdiff, mean_absdiff, max_reldiff, passed}}}"""
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
        from polygraphy.comparator import Comparator, CompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return {"available": False, "note": "Polygraphy is not installed (pip install '.[validate]')"}

    class RuntimeRunner(BaseRunner):
        """A Polygraphy runner over one of our DecoderRuntimes (eager, onnxruntime or TensorRT)."""

        def __init__(self, runtime: DecoderRuntime, example: dict[str, np.ndarray]):
            super().__init__(name=runtime.name)
            self.runtime, self.example = runtime, example

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for name, value in self.example.items():
                meta.add(name, value.dtype, [None] * value.ndim)
            return meta

        def infer_impl(self, feed_dict):
            started = time.perf_counter()
            outputs = self.runtime.infer(dict(feed_dict))
            self.inference_time = time.perf_counter() - started  # Polygraphy sums these
            return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}

    kv_dtype = np.float16 if graph_dtype == "fp16" else np.float32
    context = reference.spec.max_sequence  # short-context models get a shorter prompt, never an over-long one
    steps = min(steps, max(0, context - 2))
    prompt = max(1, min(prompt, context - steps - 1))
    feeds = teacher_forced_feeds(reference, reference.spec.vocab_size, batch, prompt, steps, kv_dtype)
    first = reference.infer(feeds[0])
    scale = {name: float(np.abs(value).max()) for name, value in first.items()}
    relative = 0.02 if graph_dtype == "fp16" else 1e-5
    atol = {name: relative * max(value, 1e-6) for name, value in scale.items()}
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        runners = [RuntimeRunner(backend, feeds[0]), RuntimeRunner(reference, feeds[0])]
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=atol, rtol={"": 0.0}, check_error_stat="max")
        )
    finally:
        G_LOGGER.module_severity = severity
    outputs: dict[str, dict] = {}
    for iteration in next(iter(accuracy[0].values())):
        for name, result in iteration.items():
            entry = outputs.setdefault(name, {"max_absdiff": 0.0, "mean_absdiff": 0.0, "max_reldiff": 0.0,
                                              "atol": atol[name], "passed": True})
            entry["max_absdiff"] = max(entry["max_absdiff"], result.max_absdiff)
            entry["mean_absdiff"] = max(entry["mean_absdiff"], result.mean_absdiff)
            entry["max_reldiff"] = max(entry["max_reldiff"], result.max_reldiff)
            entry["passed"] = entry["passed"] and bool(result)
    return {"available": True, "passed": bool(accuracy), "iterations": len(feeds), "outputs": outputs}
