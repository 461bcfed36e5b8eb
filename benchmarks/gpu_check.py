"""The CUDA side measured: eager CUDA fp16 with each divergence on and off, baddbmm's rounding on the GPU, eager
CUDA fp16 `generate()` speed, and `python -m validate --reference cuda-fp16` over fp16 exports.

Run on a machine with an NVIDIA GPU (no TensorRT or onnxruntime-gpu needed: onnxruntime runs on the CPU there and
is compared with eager CUDA fp16):

    python -m benchmarks.gpu_check --out DIR [--skip-small]

Writes DIR/gpu_check.json (every number below) and the validate reports; prints a summary as it goes. Each part
runs on its own: a failing part is recorded with its error and the others still run.

Models: the built-in tiny model (head_dim 24, weights large enough that the islands show) and a GPT-2-small-sized
random GPTMeg (12 x 768, vocab 50257, seed 0). Eager references are the same weights in fp32 on the GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import gpt2_small_checkpoint, median
from gptmeg import GPTMegLMHeadModel
from gptmeg.megatron_ops import DIVERGENCES, gpt2_numerics
from gptmeg.tiny import tiny_model

DEVICE = "cuda"  # --smoke-cpu runs the same code on the CPU (to check the script, not to measure)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _environment() -> dict:
    import onnx
    import onnxruntime
    import transformers

    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    return {
        "gpu": props.name if props else "none (--smoke-cpu)",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "capability": f"{props.major}.{props.minor}" if props else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    }


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp16 units in the last place (same-sign values; fp16 bit patterns are monotone per sign)."""
    ia = a.half().view(torch.int16).int()
    ib = b.half().view(torch.int16).int()
    ia = torch.where(ia < 0, -32768 - ia, ia)  # sign-magnitude to a monotone integer line
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return (ia - ib).abs()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {
        "max_abs": float((a - b).abs().max()),
        "mean_abs": float((a - b).abs().mean()),
        "differing_fraction": float((a != b).float().mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def baddbmm_rounding() -> dict:
    """Is CUDA baddbmm(beta=0, alpha) an fp32 product scaled then rounded once? Against GPT-2's matmul-then-scale."""
    out = {}
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for head_dim, q_len, k_len in ((64, 128, 128), (24, 128, 128), (128, 256, 256)):
        q = torch.randn(48, q_len, head_dim, device=DEVICE, generator=generator).half()
        k_t = torch.randn(48, head_dim, k_len, device=DEVICE, generator=generator).half()
        alpha = head_dim**-0.5
        row = {}
        for reduced in (True, False):
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
            scores = torch.baddbmm(torch.zeros(48, q_len, k_len, device=DEVICE, dtype=torch.half), q, k_t,
                                   beta=0.0, alpha=alpha)
            once_fp32 = (torch.bmm(q.float(), k_t.float()) * alpha).half()
            exact = (torch.bmm(q.double(), k_t.double()) * alpha).half()
            gpt2 = torch.bmm(q, k_t) * alpha
            row[f"reduced_precision_reduction={reduced}"] = {
                "equal_fp32_product_scaled_once": float((scores == once_fp32).float().mean()),
                "max_ulps_vs_fp32_once": int(_ulps(scores, once_fp32).max()),
                "equal_exact_rounded_once": float((scores == exact).float().mean()),
                "max_ulps_vs_exact": int(_ulps(scores, exact).max()),
                "gpt2_equal_exact": float((gpt2 == exact).float().mean()),
                "gpt2_max_ulps_vs_exact": int(_ulps(gpt2, exact).max()),
            }
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
        out[f"head_dim={head_dim}"] = row
    return out


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def divergences_on_off(name: str, model_fp32: GPTMegLMHeadModel, batch: int, length: int) -> dict:
    """Eager CUDA fp16 logits with the full plan, each divergence switched to GPT-2's rounding, and none;
    each against the full plan and against eager CUDA fp32 (same weights)."""
    vocab = model_fp32.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # one left-padded row
    fp32 = _logits(model_fp32.to(DEVICE).float(), ids, mask)
    half = model_fp32.half()
    variants = {"full plan": ()} | {f"without {d}": (d,) for d in DIVERGENCES} | {"none (GPT-2)": DIVERGENCES}
    logits = {}
    for variant, removed in variants.items():
        with gpt2_numerics(*removed):
            logits[variant] = _logits(half, ids, mask)
    keep = mask.bool()
    rows = {}
    for variant, value in logits.items():
        rows[variant] = {
            "vs_full_plan": _agreement(value[keep], logits["full plan"][keep]),
            "vs_fp32": _agreement(value[keep], fp32[keep]),
        }
    model_fp32.float().cpu()
    return {"model": name, "batch": batch, "length": length, "variants": rows}


def eager_generate_speed(model: GPTMegLMHeadModel, batches=(1, 8), prompt: int = 32, new: int = 64,
                         repeats: int = 5) -> list[dict]:
    """Eager CUDA fp16 `generate()` tokens/s (greedy, EOS ignored), median of ``repeats`` after a warm-up."""
    model = model.half().to(DEVICE).eval()
    rows = []
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
        ids = ids.to(DEVICE)
        seconds = []
        for _ in range(repeats + 1):
            _sync()
            started = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0)
            _sync()
            seconds.append(time.perf_counter() - started)
        runs = seconds[1:]
        rows.append({"batch": batch, "prompt": prompt, "new_tokens": new, "seconds_median": median(runs),
                     "seconds_runs": runs, "tokens_per_second": batch * new / median(runs)})
    model.float().cpu()
    return rows


def _run(argv: list[str], log: Path, timeout: float) -> dict:
    started = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(argv)}\n")
        sink.flush()
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
    return {"argv": argv[2:], "exit": done.returncode, "seconds": round(time.perf_counter() - started, 1)}


def validate_exports(out: Path, work: Path, small: bool) -> dict:
    """`python -m export` (fp16) then `python -m validate --reference cuda-fp16`; the tiny one with --ablation."""
    py, log, results = sys.executable, out / "commands.log", {}
    tiny = work / "tiny-fp16"
    results["export tiny"] = _run([py, "-m", "export", "--out", str(tiny), "--force"], log, 300)
    results["export tiny --device cuda"] = _run(
        [py, "-m", "export", "--out", str(work / "tiny-fp16-cudaval"), "--device", DEVICE, "--force"], log, 300)
    results["validate tiny"] = _run([py, "-m", "validate", str(tiny), "--reference", f"{DEVICE}-fp16", "--ablation",
                                     "--report", str(work / "report-tiny")], log, 300)
    _copy_report(work / "report-tiny", out, "tiny")
    if small:
        checkpoint = gpt2_small_checkpoint(work / "small-checkpoint")
        folder = work / "small-fp16"
        results["export small"] = _run([py, "-m", "export", "--model", str(checkpoint), "--out", str(folder),
                                        "--force", "--no-validate"], log, 300)
        results["validate small"] = _run([py, "-m", "validate", str(folder), "--reference", f"{DEVICE}-fp16",
                                          "--report", str(work / "report-small")], log, 300)
        _copy_report(work / "report-small", out, "small")
    return results


def _copy_report(report: Path, out: Path, name: str) -> None:
    for suffix in ("json", "md"):
        source = report / f"report.{suffix}"
        if source.is_file():
            (out / f"validate_{name}.{suffix}").write_text(source.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the reports")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptmeg-gpu-check"), help="scratch folder")
    parser.add_argument("--skip-small", action="store_true", help="leave out the GPT-2-small-sized model")
    parser.add_argument("--smoke-cpu", action="store_true", help="run the script on the CPU to check it works")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.smoke_cpu else "cuda"
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; nothing to measure.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    def part(name, fn, *a, **k):
        started = time.perf_counter()
        try:
            results[name] = fn(*a, **k)
        except Exception:  # noqa: BLE001 - a failing part is recorded and the next one runs
            results[name] = {"error": traceback.format_exc(limit=6)}
        print(f"== {name} ({time.perf_counter() - started:.1f} s)\n{json.dumps(results[name], indent=1)[:4000]}",
              flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))

    part("environment", _environment)
    part("baddbmm rounding", baddbmm_rounding)
    part("divergences tiny", divergences_on_off, "built-in tiny", tiny_model(), 4, 128)
    small_model = None
    if not args.skip_small:
        small_model = GPTMegLMHeadModel.from_pretrained(gpt2_small_checkpoint(args.work / "small-checkpoint"))
        part("divergences small", divergences_on_off, "GPT-2-small-sized random", small_model, 4, 256)
        part("eager generate small", eager_generate_speed, small_model)
    part("eager generate tiny", eager_generate_speed, tiny_model())
    part("validate", validate_exports, args.out, args.work, not args.skip_small)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
