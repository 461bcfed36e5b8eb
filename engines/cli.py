"""``python -m engines``: run an exported GPTMeg (generate, bench)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from safeio.terminal import interrupt_exit_code, print_error, print_plain, termination_as_interrupt

from .artifacts import load_tokenizer, open_export
from .backends import ALIASES, BACKENDS, make_runtime
from .bench import bench_runtime, check_bench_settings
from .errors import EngineError
from .generation import GenerationSettings, check_prompts, generate
from .sampling import SamplingSettings
from .streaming import TextStream

__all__ = ["main", "build_parser"]


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `python -m export`")
    parser.add_argument("--backend", choices=[*BACKENDS, *ALIASES], default="onnxruntime",
                        help="runtime: onnxruntime (ort) or tensorrt (trt, needs an engine from `build`); "
                             "default onnxruntime")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description="Run an exported GPTMeg decoder.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text, streamed as it comes",
                              description="Generate from one or more prompts (several --prompt: one batch, "
                                          "left-padded). Greedy unless a sampling option is given.")
    _runtime_options(gen)
    given = gen.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    given.add_argument("--prompt-ids", action="append", metavar="IDS",
                       help="prompt as comma-separated token ids (e.g. 15496,995); repeat for a batch. For exports "
                            "without a tokenizer")
    gen.add_argument("--tokenizer", metavar="DIR", default=None,
                     help="folder with the tokenizer.json to use (default: the export's own)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with probability p")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    gen.add_argument("--stop", action="append", default=[], help="stop when this string appears; repeatable")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")

    bench = commands.add_parser("bench", help="prefill latency and decode tokens/s",
                                description="Greedy generation on random prompts: median prefill latency and "
                                            "decode throughput over --repeats runs after one warm-up.")
    _runtime_options(bench)
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    bench.add_argument("--prompt-length", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                                description="Serve the export over HTTP: POST /v1/completions (streaming too), GET "
                                            "/v1/models, /health, /metrics. One scheduler thread batches concurrent "
                                            "requests step by step. Needs the serve extra.")
    _runtime_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    serve.add_argument("--tokenizer", metavar="DIR", default=None,
                       help="folder with the tokenizer.json to use (default: the export's own)")
    serve.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8; 1 = no batching)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="choices that may wait to join; more are answered 429 (default 256)")
    serve.add_argument("--max-prefill-tokens", type=int, default=2048,
                       help="padded prompt tokens one prefill may take (default 2048)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: the export "
                                                                 "folder's name)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                                                       "GPTMEG_API_KEY environment variable, else no key)")

    triton = commands.add_parser("triton-repo", help="write a Triton Inference Server model repository",
                                 description="A Triton model repository serving this export: a decoupled python-"
                                             "backend model running the same scheduler (TensorRT-LLM-style inputs "
                                             "text_input, max_tokens, stream, ... -> text_output), and with "
                                             "--with-decoder-model the stateless decoder as an onnxruntime model.")
    triton.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `python -m export`")
    triton.add_argument("--out", metavar="REPO", required=True, help="repository folder to create")
    triton.add_argument("--model-name", default="gptmeg", help="name of the model in the repository (default gptmeg)")
    triton.add_argument("--backend", choices=[*BACKENDS, *ALIASES], default="onnxruntime",
                        help="runtime inside the python model (default onnxruntime)")
    triton.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device (default cpu)")
    triton.add_argument("--threads", type=int, default=None, help="intra-op threads of the runtime")
    triton.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    triton.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    triton.add_argument("--with-decoder-model", action="store_true",
                        help="also write the stateless decoder as an onnxruntime model (gptmeg_decoder)")
    triton.add_argument("--force", action="store_true", help="replace REPO if it is an earlier repository")
    triton.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")

    build = commands.add_parser("build", help="build (or reuse) the fp16 TensorRT engine of an export",
                                description="Strongly typed TensorRT build of the export's fp16 ONNX with a prefill "
                                            "and a decode optimization profile, a persistent timing cache, and an "
                                            "engine cache keyed by model, GPU, TensorRT version and options.")
    _build_options(build)
    build.add_argument("--no-timing-cache", action="store_true", help="build without the persistent timing cache")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache has this engine")

    trtexec = commands.add_parser("trtexec", help="print the equivalent trtexec command line",
                                  description="Print the trtexec command that builds the same engine (shapes, "
                                              "profiles, caches), for NVIDIA's containers. Needs no GPU.")
    _build_options(trtexec)
    return parser


def _build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `python -m export --dtype fp16`")
    parser.add_argument("--out", metavar="DIR", default=None, help="engine cache folder (default EXPORT_DIR/tensorrt)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch (default 8)")
    parser.add_argument("--max-seq", type=int, default=None, help="longest past + new tokens (default: n_positions)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    parser.add_argument("--opt-seq", type=int, default=None, help="length TensorRT tunes for (default min(128, max))")
    parser.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit in MiB")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")


def _options(args):
    from .tensorrt.options import BuildOptions

    return BuildOptions(max_batch=args.max_batch, max_seq=args.max_seq, opt_batch=args.opt_batch,
                        opt_seq=args.opt_seq, workspace_mib=args.workspace_mib)


def _build(args, artifact, console: Console) -> None:
    from .tensorrt.build import build_engine

    with console.status("building the TensorRT engine (minutes for large models)..."):
        result = build_engine(artifact, _options(args), out=args.out, use_timing_cache=not args.no_timing_cache,
                              force=args.force)
    state = "cache hit" if result.cache_hit else f"built in {result.seconds:.1f}s"
    print(result.engine_path)
    console.print(f"{state}: {result.engine_path} (TensorRT {result.metadata.tensorrt}, {result.metadata.gpu})",
                  highlight=False, markup=False)


def _trtexec(args, artifact) -> None:
    from pathlib import Path

    from .tensorrt.trtexec import format_command, trtexec_command

    root = Path(args.out) if args.out else artifact.folder / "tensorrt"
    argv = trtexec_command(artifact, _options(args), root / "trtexec" / "engine.plan", root / "trtexec" / "timing.cache")
    print(format_command(argv))


def _sampling(args) -> SamplingSettings:
    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return SamplingSettings(
        do_sample=sample,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_k=args.top_k or 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        repetition_penalty=args.repetition_penalty,
    )


def _tokenizer(args, artifact, needed: bool):
    """--tokenizer DIR, else the export's; None when neither exists and ``needed`` is False."""
    if args.tokenizer:
        return load_tokenizer(args.tokenizer, artifact.spec.vocab_size)
    if needed or (artifact.folder / "tokenizer.json").is_file():
        return artifact.tokenizer
    return None


def _parse_ids(text: str, number: int) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise EngineError(f"--prompt-ids #{number} ({text!r}) must be comma-separated integers, e.g. 15496,995.") \
            from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    prompts = []
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise EngineError(f"--prompt #{number} is not valid UTF-8 text (a byte at position {error.start} cannot "
                              "be decoded); pass UTF-8 text, or token ids with --prompt-ids.") from None
        prompts.append(tokenizer.encode(text).ids)
    return prompts


def _generate(args, runtime, artifact, console: Console) -> None:
    by_text = args.prompt is not None
    tokenizer = _tokenizer(args, artifact, needed=by_text)
    if by_text:
        prompts = _encode(tokenizer, args.prompt)
    else:
        prompts = [_parse_ids(text, n) for n, text in enumerate(args.prompt_ids, start=1)]
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        sampling=_sampling(args),
        seed=args.seed,
        eos_token_id=-1 if args.ignore_eos else None,
        stop_strings=tuple(args.stop),
    )
    check_prompts(runtime.spec, prompts)  # before anything is printed
    if settings.stop_strings and tokenizer is None:
        raise EngineError("--stop needs a tokenizer to read the generated text; pass --tokenizer DIR.")
    decode = tokenizer.decode if tokenizer is not None else None
    streams = [TextStream(decode) for _ in prompts] if decode else []
    single = by_text and len(prompts) == 1
    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()

    def on_tokens(tokens, active):
        if not single:
            return
        piece = streams[0].push(int(tokens[0])) if active[0] else ""
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = generate(runtime, prompts, settings, on_tokens=on_tokens, decode=decode)
    if single:
        sys.stdout.write(streams[0].flush() + "\n")
    else:
        for number, tokens in enumerate(result.tokens):
            if decode is None:
                print(",".join(str(t) for t in tokens))
            else:
                print((args.prompt[number] if by_text else decode(prompts[number])) + decode(tokens))
            if len(prompts) > 1:
                print("---")
    print_plain(
        console,
        f"{runtime.describe()}: prefill {1e3 * result.prefill_seconds:.1f} ms, "
        f"{result.decode_tokens_per_second:.1f} decode tokens/s, finished: {', '.join(result.finish_reasons)}",
    )


def _bench(args, runtime, console: Console) -> None:
    table = Table(title=f"{escape(runtime.describe())} - greedy, prompt {args.prompt_length}, {args.new_tokens} new "
                        f"tokens, median of {args.repeats}")
    for column in ("batch", "prefill ms", "decode ms/step", "decode tokens/s"):
        table.add_column(column, justify="right")
    for batch in args.batch:
        with console.status(f"batch {batch}..."):
            r = bench_runtime(runtime, batch, args.prompt_length, args.new_tokens, args.repeats)
        table.add_row(str(batch), f"{r.prefill_ms:.1f}", f"{r.decode_ms_per_step:.2f}", f"{r.decode_tokens_per_second:.1f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        with termination_as_interrupt():
            return _run(args, console)
    except (EngineError, ValueError) as error:
        sys.stdout.flush()
        print_error(console, str(error))
        return 2
    except KeyboardInterrupt as error:
        print_plain(console, "interrupted.")
        return interrupt_exit_code(error)


def _serve(args, artifact) -> int:
    import os

    from .serving.server import ServeOptions, check_options, serve

    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_waiting=args.max_waiting,
                           max_prefill_tokens=args.max_prefill_tokens, served_model_name=args.served_model_name,
                           api_key=args.api_key if args.api_key is not None else os.environ.get("GPTMEG_API_KEY"))
    check_options(options)  # before the session loads
    tokenizer = _tokenizer(args, artifact, needed=True)
    runtime = make_runtime(artifact, args.backend, provider=args.provider, threads=args.threads)
    return serve(runtime, artifact, tokenizer, options)


def _triton_repo(args, artifact) -> int:
    from .serving.triton_repo import TritonRepoOptions, write_triton_repo

    options = TritonRepoOptions(model_name=args.model_name, backend=ALIASES.get(args.backend, args.backend),
                                provider=args.provider, threads=args.threads, max_batch=args.max_batch,
                                instances=args.instances, with_decoder_model=args.with_decoder_model)
    repo = write_triton_repo(artifact, args.out, options, force=args.force)
    print(repo)
    return 0


def _run(args, console: Console) -> int:
    artifact = open_export(args.export_dir, verify=not args.no_verify)
    if args.command == "serve":
        return _serve(args, artifact)
    if args.command == "triton-repo":
        return _triton_repo(args, artifact)
    if args.command == "build":
        _build(args, artifact, console)
        return 0
    if args.command == "trtexec":
        _trtexec(args, artifact)
        return 0
    if args.command == "bench":  # settings first: a bad option should not wait for a session to load
        check_bench_settings(artifact.spec.max_sequence, args.batch, args.prompt_length, args.new_tokens,
                             args.repeats)
    runtime = make_runtime(artifact, args.backend, provider=args.provider, threads=args.threads)
    if args.command == "generate":
        _generate(args, runtime, artifact, console)
    else:
        _bench(args, runtime, console)
    return 0
