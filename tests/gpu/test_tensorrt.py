"""TensorRT on a real GPU: build the built-in model's engine, run it, compare it, cache it, refuse a foreign one.

Skipped unless CUDA and TensorRT are both present. These tests have never run in this project's sessions (no GPU
with TensorRT was available); they are written against TensorRT 10's Python API.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                       reason="needs TensorRT (pip install --extra-index-url https://pypi.nvidia.com '.[tensorrt]')"),
]


@pytest.fixture(scope="module")
def built(tiny_exports, tmp_path_factory):
    from engines import open_export
    from engines.tensorrt import BuildOptions
    from engines.tensorrt.build import build_engine

    artifact = open_export(tiny_exports("fp16").folder)
    root = tmp_path_factory.mktemp("engines")
    options = BuildOptions(max_batch=4, max_seq=128, opt_seq=32)
    return artifact, options, root, build_engine(artifact, options, out=root)


@pytest.fixture(scope="module")
def trt_runtime(built):
    from engines.tensorrt.runner import TrtDecoder

    artifact, options, _, result = built
    return TrtDecoder(artifact, engine=result)


def test_build_then_cache_hit(built):
    from engines.tensorrt.build import build_engine

    artifact, options, root, first = built
    assert not first.cache_hit and first.engine_path.stat().st_size > 0
    second = build_engine(artifact, options, out=root)
    assert second.cache_hit and second.folder == first.folder
    assert list(root.glob("timing-*.cache")), "the persistent timing cache was not written"


def test_prefill_and_decode_match_onnxruntime_and_eager_cuda(built, trt_runtime):
    from engines import make_runtime
    from export.verify import compare_decoder, validation_inputs
    from gptmeg.tiny import tiny_model

    artifact = built[0]
    eager = tiny_model(dtype=torch.float16).to("cuda")
    ids, mask = validation_inputs(eager.config.vocab_size, batch=4, prompt=32)
    trt_vs_eager = compare_decoder(eager, trt_runtime.infer, ids, mask, graph_dtype="fp16", decode_steps=4)
    ort = make_runtime(artifact)
    trt_vs_ort = compare_decoder(eager, ort.infer, ids, mask, graph_dtype="fp16", decode_steps=4)
    logits = trt_vs_eager[0]
    print(f"TensorRT vs eager CUDA fp16: logits max abs {logits.max_abs:.3g} (ref max {logits.reference_max:.3g}), "
          f"top-1 {logits.top1:.2%}; onnxruntime CPU vs eager CUDA: max abs {trt_vs_ort[0].max_abs:.3g}")
    assert logits.nan == 0 and logits.inf == 0
    assert logits.top1 == 1.0
    assert logits.max_abs <= 0.02 * logits.reference_max


def test_greedy_generation_equals_eager(trt_runtime):
    from engines import GenerationSettings, generate
    from gptmeg.tiny import tiny_model
    from validate.eager_runtime import EagerDecoder

    eager = EagerDecoder(tiny_model(dtype=torch.float16).to("cuda"), trt_runtime.spec)
    prompts = [[5, 17, 99, 3, 250, 41, 8], [200, 7], list(range(60, 90))]
    settings = GenerationSettings(max_new_tokens=24, eos_token_id=-1)
    assert generate(trt_runtime, prompts, settings).tokens == generate(eager, prompts, settings).tokens


def test_engine_for_another_gpu_is_refused(built):
    from engines import EngineError
    from engines.tensorrt.build import find_engine

    artifact, options, root, result = built
    meta_path = result.folder / "engine.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["gpu"], meta["compute_capability"] = "NVIDIA Imaginary GPU", "1.0"
    meta_path.write_text(json.dumps(meta))
    try:
        with pytest.raises(EngineError, match="built for NVIDIA Imaginary GPU .* Rebuild it here"):
            find_engine(artifact, options, out=root)
    finally:
        meta_path.write_text(original)


def test_kv_cache_stays_on_the_gpu(trt_runtime):
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    out = trt_runtime.step(ids, np.ones_like(ids), np.arange(3)[None], trt_runtime.empty_cache(1))
    assert all(t.is_cuda for t in out.cache) and out.logits.shape == (1, trt_runtime.spec.vocab_size)
