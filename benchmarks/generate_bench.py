"""Generation speed: eager PyTorch `generate()` vs the onnxruntime KV-cache loop, same model, machine and run.

For the built-in tiny model and a GPT-2-small-sized random GPTMeg (12 x 768, vocab 50257), fp32, greedy, prompt
--prompt-length tokens, --new-tokens new tokens, batch 1 and 8: median prefill latency and decode tokens/s over
--repeats runs (after one warm-up). Also measures, in the same run, the fp32 GEMV bandwidth over a 50257 x 768
matrix (torch) and the batch-1 weight-streaming floor = weight bytes / bandwidth.

    .venv/bin/python -m benchmarks.generate_bench [--repeats 3] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.common import gpt2_small_checkpoint, machine
from engines import make_runtime, open_export
from engines.bench import bench_runtime, random_prompts
from export import export_model
from gptmeg import GPTMegLMHeadModel
from gptmeg.tiny import tiny_model


class _StepClock(LogitsProcessor):
    """Records the time of every generation step (called once per step, right after each forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def bench_eager(model, prompts, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(prefill ms, decode ms per step, decode tokens/s) medians of eager `generate()`."""
    ids = torch.tensor(prompts)
    runs = []
    for _ in range(repeats + 1):
        clock = _StepClock()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
        steps = len(clock.times) - 1
        decode = clock.times[-1] - clock.times[0]
        runs.append((clock.times[0] - started, decode / steps, ids.shape[0] * steps / decode))
    runs = runs[1:]
    return tuple(1e3 * statistics.median(r[i] for r in runs) if i < 2 else statistics.median(r[i] for r in runs)
                 for i in range(3))


def _median_seconds(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gemv_bandwidths(rows: int = 50257, cols: int = 768, threads: int = 2) -> dict[str, float]:
    """GB/s of fp32 matrix-vector products streaming a rows x cols matrix (the LM head's shape), per kernel:
    torch, numpy and onnxruntime. The fastest is the bandwidth the floor is computed with."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((cols, rows), dtype=np.float32)  # (768, 50257)
    vector = np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32)
    torch_weight, torch_vector = torch.from_numpy(weight.T.copy()), torch.from_numpy(vector[0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )
    nbytes = weight.nbytes
    return {
        "torch mv": nbytes / _median_seconds(lambda: torch_weight @ torch_vector) / 1e9,
        "numpy": nbytes / _median_seconds(lambda: vector @ weight) / 1e9,
        "onnxruntime MatMul": nbytes / _median_seconds(lambda: session.run(None, {"x": vector})) / 1e9,
    }


def weight_bytes(onnx_path: Path) -> int:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(int(np.prod(i.dims)) * (2 if i.data_type == onnx.TensorProto.FLOAT16 else 4)
               for i in model.graph.initializer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="gptmeg-generate-bench-"))

    small_dir = gpt2_small_checkpoint(work / "gpt2-small-random")
    models = {
        "built-in tiny": (tiny_model(), None),
        "GPT-2-small size": (GPTMegLMHeadModel.from_pretrained(small_dir, dtype=torch.float32).eval(), small_dir),
    }
    bandwidths = gemv_bandwidths(threads=args.threads)
    bandwidth = max(bandwidths.values())
    print(f"machine: {machine()}")
    print("fp32 GEMV bandwidth over a 50257 x 768 matrix: "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidths.items()) + f" -> floor uses {bandwidth:.1f} GB/s")
    print(f"greedy, fp32, prompt {args.prompt_length}, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| model | batch | eager prefill ms | ORT prefill ms | eager decode tok/s | ORT decode tok/s | "
          "ORT / eager | ORT ms/token | floor ms/token | ORT / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (model, source) in models.items():
        folder = work / f"export-{name.split()[0]}"
        if not (folder / "manifest.json").is_file():
            export_model(None if source is None else str(source), folder, dtype="fp32", validate=False, force=True)
        runtime = make_runtime(open_export(folder), threads=args.threads)
        floor_ms = 1e3 * weight_bytes(folder / "model.onnx") / (bandwidth * 1e9)
        for batch in args.batches:
            prompts = random_prompts(model.config.vocab_size, batch, args.prompt_length)
            e_prefill, _, e_tps = bench_eager(model, prompts, args.new_tokens, args.repeats)
            ort = bench_runtime(runtime, batch, args.prompt_length, args.new_tokens, args.repeats)
            per_token = ort.decode_ms_per_step if batch == 1 else float("nan")
            floor = f"{floor_ms:.1f}" if batch == 1 else "-"
            ratio = f"{per_token / floor_ms:.2f}" if batch == 1 else "-"
            print(f"| {name} | {batch} | {e_prefill:.1f} | {ort.prefill_ms:.1f} | {e_tps:.1f} | "
                  f"{ort.decode_tokens_per_second:.1f} | {ort.decode_tokens_per_second / e_tps:.2f}x | "
                  f"{ort.decode_ms_per_step:.2f} | {floor} | {ratio} |", flush=True)
    bench_tensorrt(work, small_dir, args)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def bench_tensorrt(work: Path, small_dir: Path, args) -> None:
    """The TensorRT column: fp16 engines of both models, build time without and with the timing cache, prefill
    latency and decode tokens/s. Runs only where TensorRT and a CUDA GPU exist."""
    from engines.errors import EngineError
    from engines.tensorrt import BuildOptions
    from engines.tensorrt.build import build_engine
    from engines.tensorrt.environment import load_tensorrt

    try:
        load_tensorrt()
    except EngineError as error:
        print(f"\nTensorRT column skipped: {error}")
        return
    print("\n| model | batch | TRT build s (cold) | TRT build s (timing cache) | TRT prefill ms | TRT decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, source in (("built-in tiny", None), ("GPT-2-small size", small_dir)):
        folder = work / f"export-{name.split()[0]}-fp16"
        if not (folder / "manifest.json").is_file():
            export_model(None if source is None else str(source), folder, dtype="fp16", validate=False, force=True)
        artifact = open_export(folder)
        options = BuildOptions(max_batch=max(args.batches), max_seq=256)
        cold = build_engine(artifact, options, out=work / "trt-cold", use_timing_cache=False, force=True)
        build_engine(artifact, options, out=work / "trt-warm", force=True)  # fills the timing cache
        warm = build_engine(artifact, options, out=work / "trt-warm", force=True)
        runtime = make_runtime(artifact, "tensorrt", engine=warm)
        for batch in args.batches:
            result = bench_runtime(runtime, batch, args.prompt_length, args.new_tokens, args.repeats)
            print(f"| {name} | {batch} | {cold.seconds:.1f} | {warm.seconds:.1f} | {result.prefill_ms:.1f} | "
                  f"{result.decode_tokens_per_second:.1f} |", flush=True)


if __name__ == "__main__":
    main()
