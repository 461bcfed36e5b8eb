"""Megatron-LM / Megatron-DeepSpeed checkpoints -> GPTMeg (gptmeg.megatron, python -m gptmeg.convert).

The synthetic checkpoints (tests/megatron_synth.py) are cut from canonical per-head weights, so the expected GPTMeg
tensors come from those weights, never from the converter; an fp32 forward computed straight from the TP shards
checks the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import megatron_synth as ms
from gptmeg import CheckpointError, GPTMegLMHeadModel
from gptmeg.megatron import (
    MegatronCheckpointError,
    UnsafeCheckpointError,
    convert,
    load_megatron_model,
    load_pt,
)
from tests.clitools import assert_refused, run_cli

DIMS = ms.Dims()  # TP=2, PP=2, 4 layers, width 48, 4 heads (head_dim 12), vocab 250 padded to 256


@pytest.fixture(scope="module")
def weights():
    return ms.canonical_weights(DIMS)


LAYOUTS = {
    "megatron-lm v0 (no version key)": lambda r, w: ms.write_megatron_lm(r, w, DIMS, version=None),
    "megatron-lm v1.0, old args (model_parallel_size, no ffn_hidden_size)": lambda r, w: ms.write_megatron_lm(
        r, w, replace(DIMS, pp=1), version=1.0, args_overrides=ms.legacy_args_overrides(replace(DIMS, pp=1))),
    "megatron-lm v2.0 attention./transformer names": lambda r, w: ms.write_megatron_lm(r, w, DIMS, version=2.0,
                                                                                       old_names=True),
    "megatron-lm v3.0": lambda r, w: ms.write_megatron_lm(r, w, DIMS, version=3.0),
    "megatron-lm virtual pipeline": lambda r, w: ms.write_megatron_lm(r, w, DIMS, vpp=2),
    "megatron-lm release": lambda r, w: ms.write_megatron_lm(r, w, DIMS, release=True),
    "megatron-lm TP=2 PP=1": lambda r, w: ms.write_megatron_lm(r, w, replace(DIMS, pp=1)),
    "deepspeed pipe, bigscience numbering": lambda r, w: ms.write_deepspeed_pipe(r, w, DIMS, enum_module=True),
    "deepspeed pipe, microsoft numbering": lambda r, w: ms.write_deepspeed_pipe(r, w, DIMS, numbering="microsoft"),
    "deepspeed without pipeline": lambda r, w: ms.write_deepspeed_nopipe(r, w, DIMS),
    "universal, trimmed vocabulary": lambda r, w: ms.write_universal(r, w, DIMS, trimmed=True, jitter=True),
    "universal, padded vocabulary": lambda r, w: ms.write_universal(r, w, DIMS, trimmed=False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_converts_to_the_expected_tensors(weights, tmp_path, layout):
    conversion = convert(LAYOUTS[layout](tmp_path / "ckpt", weights))
    trimmed = layout == "universal, trimmed vocabulary"  # DeepSpeed's universal writer keeps only the real rows
    expected = ms.expected_state_dict(weights, DIMS, trim_vocab=trimmed)
    assert set(conversion.state_dict) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(conversion.state_dict[name], tensor), name
    config = conversion.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_inner, config.n_positions) == (4, 48, 4, 96, 16)
    assert config.vocab_size == (250 if trimmed else 256)
    assert config.activation_function == "gelu_fast"  # Megatron's fused tanh GELU = GPTMeg's Megatron GELU
    assert config.scale_attn_by_inverse_layer_idx is False and config.tie_word_embeddings
    record = conversion.record
    assert record["tensor_parallel"] == 2 and record["files"]
    assert all(len(digest) == 64 for digest in record["files"].values())


def test_megatron_forward_from_the_shards_matches_the_converted_model(weights, tmp_path):
    """fp32: the logits of a Megatron-style forward over the TP shards (per-partition heads, row-parallel partial
    sums, vocab-parallel logits) against the converted GPTMeg. A transposed or misordered tensor fails this."""
    for name in ("megatron-lm v0 (no version key)", "deepspeed pipe, bigscience numbering"):
        model, _ = load_megatron_model(LAYOUTS[name](tmp_path / name.replace(" ", "_"), weights))
        ids = torch.tensor([[5, 17, 99, 3, 249, 41, 8, 0, 120, 77, 64, 1, 2, 3, 4, 200]])
        with torch.no_grad():
            ours = model(ids).logits
        reference = ms.megatron_forward(weights, DIMS, ids)
        assert ours.shape == reference.shape == (1, 16, 256)
        assert float((ours - reference).abs().max()) <= 1e-5


def test_qkv_layout_override_for_checkpoints_whose_version_does_not_say(weights, tmp_path):
    """Megatron-DeepSpeed after its 2024-12 FPDT change writes [3, heads, d] partitions under version 3.0."""
    src = ms.write_megatron_lm(tmp_path / "ckpt", weights, DIMS, version=None)
    with ms.megatron_enums_module():
        for path in src.rglob("model_optim_rng.pt"):
            state = torch.load(path, weights_only=False)
            state["checkpoint_version"] = 3.0
            torch.save(state, path)
    expected = ms.expected_state_dict(weights, DIMS)["transformer.h.1.attn.c_attn.weight"]
    assert not torch.equal(convert(src).state_dict["transformer.h.1.attn.c_attn.weight"], expected)
    assert torch.equal(convert(src, qkv_layout="blocks").state_dict["transformer.h.1.attn.c_attn.weight"], expected)


def test_replicated_drift_is_reported_and_rank_0_used(weights, tmp_path):
    src = ms.write_megatron_lm(tmp_path / "ckpt", weights, DIMS, drift=1e-3)
    conversion = convert(src)
    name = "transformer.h.0.ln_1.weight"
    assert list(conversion.record["replicated_drift"]) == [name]
    assert 9e-4 <= conversion.record["replicated_drift"][name] <= 2e-3
    assert torch.equal(conversion.state_dict[name], weights["layers"][0]["ln1_weight"])
    assert any("differ across TP ranks" in note for note in conversion.notes)
    averaged = convert(src, tp_replicated="average").state_dict[name]
    assert not torch.equal(averaged, weights["layers"][0]["ln1_weight"])


def test_trim_vocab_drops_only_the_padding_rows(weights, tmp_path):
    src = ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS)
    kept, trimmed = convert(src), convert(src, trim_vocab=True)
    assert kept.config.vocab_size == 256 and kept.config.megatron["original_vocab_size"] == 250
    assert trimmed.config.vocab_size == 250
    assert torch.equal(trimmed.state_dict["transformer.wte.weight"], kept.state_dict["transformer.wte.weight"][:250])
    for name in kept.state_dict:
        if name != "transformer.wte.weight":
            assert torch.equal(kept.state_dict[name], trimmed.state_dict[name])


def test_megatron_numerics_are_recorded_with_what_gptmeg_does_not_reproduce(weights, tmp_path):
    conversion = convert(ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS))
    megatron = conversion.config.megatron
    assert megatron["apply_query_key_layer_scaling"] is True
    assert megatron["query_key_layer_scaling_coefficients"] == "max(1, i)"  # GPTModelPipe: 1, 1, 2, 3
    assert megatron["attention_softmax_in_fp32"] is True  # forced by layer scaling
    notes = " ".join(conversion.record["numerics_not_reproduced"])
    assert "apply_query_key_layer_scaling" in notes and "tensor parallelism 2" in notes


# --- refusals -----------------------------------------------------------------------------------------------------


def _delete(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    "case,match",
    [
        ("rotary", "rotary position embeddings"),
        ("alibi", "alibi position embeddings"),
        ("glu", "GLU activation"),
        ("post-ln", "post-LayerNorm residuals"),
        ("kv-channels", "kv_channels"),
        ("gqa", "grouped-query attention"),
        ("layernorm-1p", "gamma - 1"),
        ("moe", "mixture of experts"),
        ("no biases", "without biases"),
        ("universal without positions", "skips them"),
        ("missing TP shard", "lacks 1 shard"),
        ("missing layer file", "lacks layer_04-model_01"),
        ("virtual chunks without VPP", "virtual-pipeline chunks"),
        ("untied head", "untied output layer"),
        ("embedding LayerNorm", "LayerNorm after the word embedding"),
        ("mixed iterations", "different saves"),
        ("megatron-core names", "Megatron-Core parameter names"),
        ("megatron-core distributed", "Megatron-Core distributed checkpoint"),
        ("zero-3", "ZeRO-3"),
        ("no tracker", "pass --iteration"),
        ("truncated shard", "cannot be read"),
    ],
)
def test_unsupported_checkpoints_are_refused_with_one_sentence(weights, tmp_path, case, match):
    root = tmp_path / "ckpt"
    lm = {"rotary": {"position_embedding_type": ms.PositionEmbeddingType.rotary},
          "alibi": {"position_embedding_type": ms.PositionEmbeddingType.alibi},
          "glu": {"glu_activation": "geglu"}, "post-ln": {"apply_residual_connection_post_layernorm": True},
          "kv-channels": {"kv_channels": 8}, "gqa": {"num_key_value_heads": 2},
          "layernorm-1p": {"apply_layernorm_1p": True}, "moe": {"num_experts": [4]},
          "no biases": {"add_bias_linear": False}}
    if case in lm:
        src = ms.write_megatron_lm(root, weights, DIMS, args_overrides=lm[case])
    elif case == "missing TP shard":
        src = ms.write_megatron_lm(root, weights, DIMS)
        _delete(next(src.glob("iter_*")) / "mp_rank_01_001")
    elif case == "missing layer file":
        src = ms.write_deepspeed_pipe(root, weights, DIMS)
        _delete(next(src.glob("global_step*")) / "layer_04-model_01-model_states.pt")
    elif case == "virtual chunks without VPP":
        src = ms.write_megatron_lm(root, weights, DIMS, vpp=2, args_overrides={
            "virtual_pipeline_model_parallel_size": None})
    elif case == "untied head":
        src = ms.write_deepspeed_pipe(root, weights, DIMS, untied_head=True)
    elif case == "embedding LayerNorm":
        src = ms.write_deepspeed_pipe(root, weights, DIMS, embed_norm=True)
    elif case == "mixed iterations":
        src = ms.write_megatron_lm(root, weights, DIMS, iteration=10)
        other = ms.write_megatron_lm(tmp_path / "other", weights, DIMS, iteration=20)
        shutil.copy(next(other.glob("iter_*")) / "mp_rank_01_001" / "model_optim_rng.pt",
                    next(src.glob("iter_*")) / "mp_rank_01_001" / "model_optim_rng.pt")
    elif case == "megatron-core names":
        src = ms.write_megatron_lm(root, weights, replace(DIMS, tp=1, pp=1))
        path = next(src.rglob("model_optim_rng.pt"))
        state = torch.load(path, weights_only=False)
        state["model"] = {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(3)}
        torch.save(state, path)
    elif case == "megatron-core distributed":
        src = root / "iter_0000010"
        src.mkdir(parents=True)
        (src / "__0_0.distcp").write_bytes(b"")
        (src / "metadata.json").write_text("{}")
        (root / "latest_checkpointed_iteration.txt").write_text("10")
        src = root
    elif case == "zero-3":
        step = root / "global_step10"
        step.mkdir(parents=True)
        (root / "latest").write_text("global_step10")
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
            torch.save({"module": None}, step / name)
        src = root
    elif case == "universal without positions":
        src = ms.write_universal(root, weights, DIMS, trimmed=False)
        shutil.rmtree(next(src.glob("*/zero")) / "tied_modules.embed.position_embeddings.weight")
    elif case == "no tracker":
        src = ms.write_megatron_lm(root, weights, DIMS)
        (src / "latest_checkpointed_iteration.txt").unlink()
    elif case == "truncated shard":
        src = ms.write_megatron_lm(root, weights, DIMS)
        path = next(src.rglob("model_optim_rng.pt"))
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MegatronCheckpointError, match=match) as caught:
        convert(src)
    assert "\n" not in str(caught.value)


def test_no_code_runs_from_a_checkpoint(tmp_path):
    """A pickle that calls os.system (or any other callable off the allowlist) is refused before the call."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00"
    folder.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
    torch.save({"args": Exploit(), "iteration": 1}, folder / "model_optim_rng.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert(tmp_path / "ckpt")
    assert not marker.exists()
    torch.save({"x": torch.ones(1), "hook": eval}, tmp_path / "eval.pt")
    with pytest.raises(UnsafeCheckpointError, match="eval"):
        load_pt(tmp_path / "eval.pt")


def test_megatron_stubs_stand_in_for_missing_classes(weights, tmp_path):
    src = ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS, enum_module=True)
    state = load_pt(next(src.rglob("mp_rank_00_model_states.pt")))
    assert state["args"].position_embedding_type.value == 2  # absolute, as an inert stub


# --- generation never emits a padding row ---------------------------------------------------------------------


def test_eager_and_engine_generation_never_emit_padding_rows(weights, tmp_path):
    model, conversion = load_megatron_model(ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS))
    assert model.generation_config.suppress_tokens == list(range(250, 256))
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # make a padding row the most likely next token
        top = int(model(prompt).logits[0, -1].argmax())
        model.transformer.wte.weight[253] = 10 * model.transformer.wte.weight[top]
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        raw = model(prompt).logits[0, -1]
    assert int(raw.argmax()) == 253  # without the suppression the padding row would win
    assert all(int(t) < 250 for t in out.sequences[0, 3:])

    from engines import GenerationSettings, generate
    from engines.artifacts import DecoderSpec
    from engines.runtime import DecoderRuntime, StepOutput

    class FavoursPadding(DecoderRuntime):
        name = "fake"
        spec = DecoderSpec(n_layer=1, n_head=1, head_dim=1, vocab_size=256, max_sequence=16, kv_dtype="float32",
                           eos_token_id=None, pad_token_id=0, emit_vocab_size=250)

        def empty_cache(self, batch_size):
            return None

        def step(self, input_ids, attention_mask, position_ids, cache):
            logits = np.zeros((input_ids.shape[0], 256), np.float32)
            logits[:, 253], logits[:, 7] = 10.0, 1.0
            return StepOutput(logits, None)

        def infer(self, feeds):
            raise NotImplementedError

    result = generate(FavoursPadding(), [[1, 2]], GenerationSettings(max_new_tokens=4))
    assert result.tokens == [[7, 7, 7, 7]]


# --- the command lines -------------------------------------------------------------------------------------------


def test_convert_cli_writes_a_loadable_gptmeg_folder(weights, tmp_path):
    src = ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS, enum_module=True)
    out = tmp_path / "gptmeg"
    result = run_cli("gptmeg.convert", src, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "deepspeed-pipe checkpoint, iteration 10" in result.stderr
    assert {"model.safetensors", "config.json", "generation_config.json", "conversion.json"} <= {
        p.name for p in out.iterdir()}
    record = json.loads((out / "conversion.json").read_text())
    assert record["layout"] == "deepspeed-pipe" and record["checkpoint_version"] == 3.0
    assert (record["padded_vocab_size"], record["original_vocab_size"]) == (256, 250)
    model = GPTMegLMHeadModel.from_pretrained(out)
    expected = ms.expected_state_dict(weights, DIMS)
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in expected.items())
    assert model.generation_config.suppress_tokens == list(range(250, 256))
    # --force replaces an earlier conversion, never another folder
    again = run_cli("gptmeg.convert", src, out, "--force", "--trim-vocab")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 250
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_refused(run_cli("gptmeg.convert", src, tmp_path / "mine", "--force"), "not a conversion")


def test_export_takes_a_megatron_folder_end_to_end(weights, tmp_path):
    src = ms.write_megatron_lm(tmp_path / "ckpt", weights, DIMS, version=None)
    out = tmp_path / "onnx"
    # fp32: with a 16-token context the validation sees ~30 positions, too few for the fp16 top-1 target (one
    # near-tie flips it); fp32 is judged by max abs error
    result = run_cli("export", "--model", src, "--out", out, "--quiet", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    conversion = manifest["checkpoint"]["megatron_conversion"]
    assert conversion["layout"] == "megatron-lm" and conversion["qkv_layout"] == "blocks"
    assert manifest["validation"]["ok"] and manifest["precision_plan"]["ok"]
    assert manifest["config"]["megatron"]["padded_vocab_size"] == 256
    generated = run_cli("engines", "generate", out, "--prompt-ids", "5,6,7", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    assert all(int(t) < 250 for t in generated.stdout.strip().split(","))  # never a padding row
    # validate re-reads the Megatron folder (the manifest's source) as its eager reference
    from validate.cli import main as validate_main

    assert validate_main([str(out), "--report", str(tmp_path / "report"), "--decode-steps", "2",
                          "--new-tokens", "4"]) == 0


def test_a_missing_folder_is_one_line(tmp_path):
    assert_refused(run_cli("gptmeg.convert", tmp_path / "nope", tmp_path / "out"), "is not a folder")
    with pytest.raises(CheckpointError):
        convert(tmp_path)


def _small_tokenizer(folder: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"w{size - 1}").save_pretrained(folder)
    return folder


def test_tokenizer_is_included_and_must_fit_the_vocabulary(weights, tmp_path):
    src = ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, DIMS)
    conversion = convert(src, tokenizer_dir=_small_tokenizer(tmp_path / "tok250", 250))
    assert conversion.tokenizer is not None and conversion.config.eos_token_id == 249
    assert conversion.record["original_vocab_size"] == 250
    with pytest.raises(MegatronCheckpointError, match="300 tokens"):
        convert(src, tokenizer_dir=_small_tokenizer(tmp_path / "tok300", 300))
    with pytest.raises(MegatronCheckpointError, match="no tokenizer.json"):
        convert(src, tokenizer_dir=tmp_path)
