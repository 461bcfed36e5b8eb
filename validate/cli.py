"""``python -m validate``: does the deployed model still compute what eager GPTMeg computes, and if not, where
does it start to diverge?

    python -m validate EXPORT_DIR [--backends onnxruntime] [--reference cpu-fp32|cpu-fp16|cuda-fp16] ...
    python -m validate graph FILE [--json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engines import ArtifactError, EngineError, make_runtime, open_export
from engines.artifacts import changed_files
from export.report import contract_table, top1_text
from safeio.terminal import interrupt_exit_code, print_error, print_plain, termination_as_interrupt

from .graph_contract import GraphFileError, check_graph_file
from .reference import REFERENCES, ValidateError, default_reference, load_reference
from .report import ReportFolderError, check_report_folder

__all__ = ["main"]


def _graph_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validate graph",
        description=(
            "Find every LayerNorm, GELU and attention-score site of an ONNX graph and report whether each fp32 "
            "island is intact. Exit 0 when the plan holds, 1 when it is broken, 2 for an unreadable file."
        ),
    )
    parser.add_argument("file", help="an .onnx file, or an export folder (its model.onnx)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return parser


def _parity_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validate",
        description=(
            "Validate an export against the eager GPTMeg: graph contract, per-output errors over prefill and "
            "chained decode steps (real prompts and random token batches, left-padded), greedy generation "
            "prefix, layer-by-layer localisation, optional island ablation; writes report.json, report.md and "
            "error_by_layer.png. Exit 0 when everything is within tolerance, 1 otherwise, 2 for bad input. "
            "`python -m validate graph FILE` runs the graph contract alone."
        ),
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `python -m export`")
    parser.add_argument("--backends", default="onnxruntime",
                        help="comma-separated backends to validate (default onnxruntime)")
    parser.add_argument("--reference", choices=REFERENCES, default=None,
                        help="eager reference (default: the export's precision; fp16 on CUDA when a GPU exists)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="checkpoint the export was made from (default: the manifest's source)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime device (default cpu)")
    parser.add_argument("--prompts", metavar="FILE", default=None, help="text file, one prompt per line")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch (default 4)")
    parser.add_argument("--decode-steps", type=int, default=4, help="decode steps chained through the cache")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens for the prefix match")
    parser.add_argument("--ablation", action="store_true",
                        help="also export variants with one fp32 island removed and compare them (fp16 exports)")
    parser.add_argument("--graph", metavar="FILE", default=None,
                        help="validate this ONNX file (e.g. a post-processed graph) with the folder's manifest, "
                             "config and tokenizer")
    parser.add_argument("--report", metavar="DIR", default=None,
                        help="report folder (default: reports/<export folder name>)")
    return parser


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        from .parity import DEFAULT_PROMPTS

        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if file.is_dir():
        raise ValidateError(f"--prompts {path} is a folder; pass a text file with one prompt per line.")
    if not file.is_file():
        raise ValidateError(f"--prompts {path}: no such file.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValidateError(f"--prompts {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                            f"{error.start}); save it as UTF-8.") from None
    except OSError as error:
        raise ValidateError(f"--prompts {path} cannot be read ({error.strerror}).") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValidateError(f"--prompts {path} has no non-empty line.")
    return prompts


def _summary_table(report) -> Table:
    table = Table(title=f"{report.graph_dtype} export vs eager {report.reference}", title_justify="left")
    for column in ("backend", "case", "output", "max abs", "mean abs", "top-1", "top-5", "NaN/Inf", "ok"):
        table.add_column(column)
    for backend in report.backends:
        for case in backend.cases:
            for m in case.outputs:
                ok = not any(f.startswith(m.name) for f in case.failures)
                table.add_row(escape(backend.backend), case.case, m.name, f"{m.max_abs:.3g}", f"{m.mean_abs:.3g}",
                              top1_text(m.top1, m.top1_near_ties, m.top1_positions),
                              f"{m.top5_overlap:.2%}" if m.top5_overlap is not None else "-",
                              f"{m.nan}/{m.inf}", "[green]yes[/]" if ok else "[red]NO[/]")
    return table


def _validate(args, console: Console) -> int:
    # every input is checked before torch and the model are loaded: a typo is answered at once
    # files changed since export (a graph post-processed in place) are reported, not refused: checking such a
    # graph against eager is what validation is for
    artifact = open_export(args.export_dir, verify=False, model_path=args.graph)
    changed = changed_files(artifact.folder, artifact.manifest)
    for name in changed:
        print_plain(console, f"note: {name} differs from the export's manifest (sha256): changed after export.",
                    style="yellow")
    manifest = artifact.manifest
    graph_dtype = manifest["dtype"]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise ValidateError(f"--backends {args.backends!r} names no backend; pass e.g. --backends onnxruntime.")
    if args.batch < 1 or args.decode_steps < 0 or args.new_tokens < 1:
        raise ValidateError("--batch and --new-tokens must be >= 1 and --decode-steps >= 0.")
    context = artifact.spec.max_sequence
    max_prompt = context - args.decode_steps - args.new_tokens - 1
    if max_prompt < 2:
        raise ValidateError(
            f"--decode-steps {args.decode_steps} + --new-tokens {args.new_tokens} leave no room for a prompt in the "
            f"model's context of {context} tokens; keep their sum at most {context - 3}."
        )
    if args.ablation and graph_dtype != "fp16":
        raise ValidateError("--ablation compares fp16 islands: validate an fp16 export (--dtype fp16).")
    folder = Path(args.report) if args.report else Path("reports") / artifact.folder.name
    check_report_folder(folder)  # before the run, not after it
    prompts = _read_prompts(args.prompts)
    reference_name = args.reference or default_reference(graph_dtype)

    from .ablation import run_ablation
    from .parity import ParityReport, build_cases, run_parity
    from .report import write_report

    status = console.status("checking the graph contract")
    status.start()
    try:
        contract = check_graph_file(artifact.model_path, manifest.get("config"))
        status.update(f"loading the eager reference ({reference_name})")
        reference = load_reference(manifest, reference_name, args.model)
        runtimes = [make_runtime(artifact, b, provider=args.provider) for b in backends]
        try:
            tokenizer = artifact.tokenizer
        except ArtifactError:
            tokenizer = None
        spec = artifact.spec
        cases = build_cases(tokenizer, prompts, args.batch, spec.vocab_size, spec.pad_token_id, max_prompt)
        report = ParityReport(str(artifact.folder), graph_dtype, reference_name, contract, changed_files=changed,
                              graph=str(artifact.model_path) if args.graph else None)
        for runtime in runtimes:
            report.backends.append(run_parity(
                reference, runtime, cases, graph_dtype=graph_dtype, reference_name=reference_name,
                # layer-by-layer localisation exposes sites of the ONNX graph in onnxruntime: only meaningful there
                onnx_path=artifact.model_path if runtime.name.startswith("onnxruntime") else None,
                decode_steps=args.decode_steps, new_tokens=args.new_tokens,
                provider=args.provider, progress=status.update,
            ))
        if args.ablation:
            export_copy = load_reference(manifest, "cpu-fp16", args.model)
            report.ablation = run_ablation(export_copy, reference, manifest, cases[0],
                                           decode_steps=args.decode_steps, progress=status.update)
        written = write_report(report, folder)
    finally:
        status.stop()

    out = Console(soft_wrap=True)
    if not contract.ok:
        out.print(contract_table(contract, only_broken=True))
    out.print(_summary_table(report))
    for backend in report.backends:
        if backend.generation:
            g = backend.generation
            out.print(f"{escape(backend.backend)}: greedy exact-match prefix {g.prefix_lengths} of {g.new_tokens} "
                      "tokens", highlight=False)
        if backend.localization:
            out.print(f"{escape(backend.backend)}: {backend.localization.describe()}", highlight=False)
        if backend.polygraphy and backend.polygraphy.get("available"):
            state = "pass" if backend.polygraphy["passed"] else "FAIL"
            out.print(f"{escape(backend.backend)}: teacher-forced step check (Polygraphy): {state}", highlight=False)
    for failure in [f for b in report.backends for f in b.failures]:
        out.print(f"[red]fail:[/] {escape(failure)}", highlight=False)
    out.print(f"{contract.summary()}", highlight=False)
    out.print(f"report: {', '.join(str(p) for p in written)}", highlight=False)
    out.print("[green]PASS[/]" if report.ok else "[red]FAIL[/]")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True, soft_wrap=True)
    if argv[:1] == ["graph"]:
        args = _graph_parser().parse_args(argv[1:])
        try:
            report = check_graph_file(args.file)
        except GraphFileError as error:
            print_error(console, str(error))
            return 2
        if args.json:
            import json

            print(json.dumps(report.to_dict(), indent=2))
        else:
            Console().print(contract_table(report))
        return 0 if report.ok else 1

    args = _parity_parser().parse_args(argv)
    try:
        with termination_as_interrupt():
            return _validate(args, console)
    except (ArtifactError, EngineError, ValidateError, ReportFolderError) as error:
        print_error(console, str(error))
        return 2
    except OSError as error:  # writing the report: disk full, permissions changed during the run
        print_error(console, f"could not write the report: {error.strerror or error} ({error.filename}).")
        return 2
    except KeyboardInterrupt as error:
        print_plain(console, "interrupted; no report was written.")
        return interrupt_exit_code(error)
