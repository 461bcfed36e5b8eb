"""``python -m validate``: check exported GPTMeg models."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from export.report import contract_table

from .graph_contract import GraphFileError, check_graph_file

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m validate", description="Check exported GPTMeg models.")
    commands = parser.add_subparsers(dest="command", required=True)
    graph = commands.add_parser(
        "graph",
        help="check an ONNX file against the fp16 precision plan",
        description=(
            "Find every LayerNorm, GELU and attention-score site of an ONNX graph and report whether each fp32 "
            "island is intact. Exit 0 when the plan holds, 1 when it is broken, 2 for an unreadable file."
        ),
    )
    graph.add_argument("file", help="an .onnx file, or an export folder (its model.onnx)")
    graph.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        report = check_graph_file(args.file)
    except GraphFileError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(contract_table(report))
    return 0 if report.ok else 1
