"""The TensorRT side that needs no GPU: profiles from the manifest, cache keys, engine metadata checks, the trtexec
command line, and the clear errors when TensorRT or CUDA is absent."""

from __future__ import annotations

import importlib.util

import pytest

from engines import EngineError, open_export
from engines.cli import main as engines_main
from engines.tensorrt import (
    DECODE,
    PREFILL,
    BuildOptions,
    EngineMetadata,
    check_compatible,
    decoder_profiles,
    engine_cache_key,
    trtexec_command,
)
from engines.tensorrt.cache import GpuInfo
from engines.tensorrt.profiles import profile_for

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def artifact(tiny_exports):
    return open_export(tiny_exports("fp16").folder)


def test_profiles_from_manifest(artifact):
    spec = artifact.spec  # 3 layers, 4 heads, head_dim 24, context 256
    prefill, decode = decoder_profiles(spec, BuildOptions(max_batch=8, opt_batch=2, opt_seq=64))
    assert prefill["input_ids"] == ((1, 1), (2, 64), (8, 256))
    assert prefill["attention_mask"] == ((1, 1), (2, 64), (8, 256))
    assert prefill["past_key_values.2.value"] == ((1, 4, 0, 24), (2, 4, 0, 24), (8, 4, 0, 24))
    assert decode["input_ids"] == ((1, 1), (2, 1), (8, 1))
    assert decode["attention_mask"] == ((1, 2), (2, 65), (8, 256))
    assert decode["past_key_values.0.key"] == ((1, 4, 1, 24), (2, 4, 64, 24), (8, 4, 255, 24))
    assert set(prefill) == set(decode) == {"input_ids", "attention_mask", "position_ids", *spec.past_names()}
    assert (profile_for(0, 17), profile_for(9, 1)) == (PREFILL, DECODE)
    with pytest.raises(EngineError, match="fits neither"):
        profile_for(9, 4)


@pytest.mark.parametrize("options,message", [
    (BuildOptions(max_seq=1000), "between 2 and the model's context 256"),
    (BuildOptions(max_seq=64, opt_seq=64), "--opt-seq 64"),
    (BuildOptions(max_batch=2, opt_batch=4), "--opt-batch"),
    (BuildOptions(workspace_mib=0), "--workspace-mib"),
])
def test_bad_build_options(artifact, options, message):
    with pytest.raises(EngineError, match=message):
        options.resolved(artifact.spec)


def test_cache_key_depends_on_everything_that_makes_an_engine():
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "10.9.0")
    options = BuildOptions(max_seq=256)
    key = engine_cache_key("a" * 64, gpu, options)
    assert key == engine_cache_key("a" * 64, GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "10.9.0"), BuildOptions(max_seq=256))
    others = [
        engine_cache_key("b" * 64, gpu, options),
        engine_cache_key("a" * 64, GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.9.0"), options),
        engine_cache_key("a" * 64, GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "10.10.0"), options),
        engine_cache_key("a" * 64, gpu, BuildOptions(max_seq=256, max_batch=4)),
    ]
    assert len({key, *others}) == 5


def test_metadata_round_trip_and_compatibility(tmp_path):
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "10.9.0")
    meta = EngineMetadata(key="k", onnx_sha256="a" * 64, gpu=gpu.name, compute_capability="9.0", tensorrt="10.9.0",
                          options=BuildOptions().to_dict(), profiles=[], build_seconds=1.5)
    meta.save(tmp_path)
    loaded = EngineMetadata.load(tmp_path)
    assert loaded == meta and loaded.built
    check_compatible(loaded, gpu, "a" * 64)  # same everything: accepted
    with pytest.raises(EngineError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\) but this GPU "
                                          r"is NVIDIA A100.*python -m engines build"):
        check_compatible(loaded, GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.9.0"), "a" * 64)
    with pytest.raises(EngineError, match="built with TensorRT 10.9.0 but TensorRT 10.10.0 is installed"):
        check_compatible(loaded, GpuInfo(gpu.name, "9.0", "10.10.0"), "a" * 64)
    with pytest.raises(EngineError, match="different model.onnx"):
        check_compatible(loaded, gpu, "b" * 64)
    (tmp_path / "engine.json").write_text("{broken")
    with pytest.raises(EngineError, match="unreadable"):
        EngineMetadata.load(tmp_path)


def test_trtexec_command_line(artifact, tmp_path, capsys):
    argv = trtexec_command(artifact, BuildOptions(max_batch=4, opt_seq=32), tmp_path / "e.plan", tmp_path / "t.cache")
    assert argv[:5] == ["trtexec", f"--onnx={artifact.model_path}", f"--saveEngine={tmp_path / 'e.plan'}",
                        "--stronglyTyped", "--skipInference"]
    assert "--fp16" not in argv  # precisions come from the graph (strongly typed), never from a builder flag
    mins = [a for a in argv if a.startswith("--minShapes=")]
    maxs = [a for a in argv if a.startswith("--maxShapes=")]
    assert len(mins) == len(maxs) == 2  # prefill and decode profiles, in order
    assert "input_ids:1x1," in mins[0] and "past_key_values.0.key:1x4x0x24" in mins[0]
    assert "input_ids:4x256," in maxs[0] and "past_key_values.2.value:4x4x255x24" in maxs[1]
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in argv
    assert engines_main(["trtexec", str(artifact.folder), "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trtexec") and "--stronglyTyped" in out and "2x256" in out


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; this checks the message for machines without it")
@pytest.mark.parametrize("argv", [
    ["build", "{export}"],
    ["generate", "{export}", "--prompt", "hi", "--backend", "trt"],
    ["bench", "{export}", "--backend", "tensorrt"],
])
def test_without_tensorrt_every_command_says_so(artifact, capsys, argv):
    argv = [a.format(export=artifact.folder) for a in argv]
    assert engines_main(argv) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "onnxruntime is the fallback" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
