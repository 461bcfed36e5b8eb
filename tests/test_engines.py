"""engines: onnxruntime generation equals eager generate(), sampling is seeded and correct, clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engines import (
    ArtifactError,
    EngineError,
    GenerationSettings,
    SamplingSettings,
    generate,
    make_runtime,
    open_export,
)
from engines import sampling
from engines.cli import main as engines_main
from gptmeg.tiny import tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], [200, 7], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74]]


@pytest.fixture(scope="module")
def fp32_runtime(tiny_exports):
    return make_runtime(open_export(tiny_exports("fp32").folder), threads=1)


def _eager_greedy(prompts, max_new_tokens):
    """transformers' generate() on the eager model, left-padded batch; tokens cut after the first EOS."""
    model = tiny_model()
    eos = model.config.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.config.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS[1:2], PROMPTS], ids=["batch1", "batch1-short", "batch3"])
def test_greedy_equals_eager_generate(fp32_runtime, prompts):
    result = generate(fp32_runtime, prompts, GenerationSettings(max_new_tokens=24))
    assert result.tokens == _eager_greedy(prompts, 24)


def test_padding_does_not_change_a_row(fp32_runtime):
    alone = generate(fp32_runtime, PROMPTS[1:2], GenerationSettings(max_new_tokens=16, eos_token_id=-1))
    batched = generate(fp32_runtime, PROMPTS, GenerationSettings(max_new_tokens=16, eos_token_id=-1))
    assert batched.tokens[1] == alone.tokens[0]
    assert batched.decode_steps == 15 and len(batched.tokens[0]) == 16


def test_fp16_greedy_runs_and_mostly_agrees(tiny_exports, fp32_runtime):
    fp16 = make_runtime(open_export(tiny_exports("fp16").folder))
    settings = GenerationSettings(max_new_tokens=12, eos_token_id=-1)
    a, b = generate(fp16, PROMPTS, settings), generate(fp32_runtime, PROMPTS, settings)
    assert all(len(t) == 12 for t in a.tokens)
    assert a.tokens[0][:3] == b.tokens[0][:3]  # early greedy tokens agree across precisions


def test_seeded_sampling_is_reproducible(fp32_runtime):
    settings = lambda seed: GenerationSettings(  # noqa: E731
        max_new_tokens=20, seed=seed, eos_token_id=-1,
        sampling=SamplingSettings(do_sample=True, temperature=1.5, top_k=50, top_p=0.95),
    )
    first, again = generate(fp32_runtime, PROMPTS, settings(1)), generate(fp32_runtime, PROMPTS, settings(1))
    other = generate(fp32_runtime, PROMPTS, settings(2))
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_stop_strings_and_streaming(fp32_runtime):
    artifact_tokenizer_decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    baseline = generate(fp32_runtime, PROMPTS[:1], GenerationSettings(max_new_tokens=10, eos_token_id=-1))
    third = f"<{baseline.tokens[0][2]}>"
    streamed = []
    result = generate(
        fp32_runtime, PROMPTS[:1], GenerationSettings(max_new_tokens=10, eos_token_id=-1, stop_strings=(third,)),
        on_tokens=lambda tokens, active: streamed.append(int(tokens[0])), decode=artifact_tokenizer_decode,
    )
    assert result.finish_reasons == ["stop_string"]
    assert result.tokens[0] == baseline.tokens[0][: len(result.tokens[0])]
    assert third in artifact_tokenizer_decode(result.tokens[0])
    assert streamed == result.tokens[0]


# --- logits processors against transformers' own, on hand-made logits ----------------------------------------


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, size=(4, 50))


def _finite(x):
    return np.isfinite(np.asarray(x))


def test_repetition_penalty_matches_transformers(logits):
    seen_ids = np.array([[1, 2, 3], [4, 4, 5], [0, 49, 7], [10, 11, 12]])
    seen = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(seen, seen_ids, True, axis=-1)
    ours = sampling.apply_repetition_penalty(logits, seen, 1.7)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(seen_ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert (ours[seen] != logits[seen]).all() and (ours[~seen] == logits[~seen]).all()


def test_temperature_matches_transformers(logits):
    ours = sampling.apply_temperature(logits, 0.7)
    np.testing.assert_allclose(ours, TemperatureLogitsWarper(0.7)(None, torch.tensor(logits)).numpy())
    assert sampling.softmax(ours).max() > sampling.softmax(logits).max()  # sharper


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(logits, k):
    ours = sampling.apply_top_k(logits, k)
    theirs = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
    assert (_finite(ours) == _finite(theirs)).all()
    assert (_finite(ours).sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, p):
    ours = sampling.apply_top_p(logits, p)
    theirs = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
    assert (_finite(ours) == _finite(theirs)).all()
    kept = np.where(_finite(ours), sampling.softmax(logits), 0).sum(-1)
    assert (kept >= p - 1e-12).all()


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    settings = SamplingSettings(do_sample=True)
    seen = np.zeros((1, 4), dtype=bool)
    draws = np.array([sampling.select_next_tokens(logits, seen, settings, rng)[0] for _ in range(20000)])
    frequencies = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    top1 = SamplingSettings(do_sample=True, top_k=1)
    assert {int(sampling.select_next_tokens(logits, seen, top1, rng)[0]) for _ in range(100)} == {0}


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=1.5)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.fixture
def export_copy(tiny_exports, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_exports("fp32").folder, folder)
    return folder


def test_corrupted_model_is_refused(export_copy, capsys):
    data = bytearray((export_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        open_export(export_copy)
    assert engines_main(["generate", str(export_copy), "--prompt", "hi"]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def test_missing_model_is_refused(export_copy, capsys):
    (export_copy / "model.onnx").unlink()
    assert engines_main(["bench", str(export_copy)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx is missing" in err and "Traceback" not in err


def test_not_an_export_folder(tmp_path, capsys):
    assert engines_main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_prompt_longer_than_context(fp32_runtime, tiny_exports, capsys):
    context = fp32_runtime.spec.max_sequence
    with pytest.raises(EngineError, match=f"context is {context} tokens"):
        generate(fp32_runtime, [[1] * context])
    folder = str(tiny_exports("fp32").folder)
    assert engines_main(["generate", folder, "--prompt", "x" * (context + 5)]) == 2
    assert "Shorten the prompt" in capsys.readouterr().err


def test_unavailable_provider_is_a_clear_error(tiny_exports, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the error path needs a build without it")
    assert engines_main(["generate", str(tiny_exports("fp32").folder), "--prompt", "hi", "--provider", "cuda"]) == 2
    assert "has no CUDAExecutionProvider" in capsys.readouterr().err


def test_cli_generate_streams_text(tiny_exports, capsys):
    folder = str(tiny_exports("fp32").folder)
    assert engines_main(["generate", folder, "--prompt", "Hello", "--max-new-tokens", "5", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and "decode tokens/s" in captured.err
    assert engines_main(["bench", folder, "--batch", "1", "2", "--new-tokens", "4", "--repeats", "1"]) == 0
    assert "decode tokens/s" in capsys.readouterr().out
