"""Validation reports: ``report.json`` (machine-readable), ``report.md`` (the tables a person reads) and
``error_by_layer.png`` (relative error of every block site, per backend)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from export.report import top1_text
from safeio.staging import deferred_signals, is_writable_folder, nearest_existing

if TYPE_CHECKING:  # the parity harness imports torch; `validate graph` needs none of it
    from .parity import ParityReport

__all__ = ["REPORT_FILES", "ReportFolderError", "check_report_folder", "write_report", "markdown"]


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def markdown(report: ParityReport) -> str:
    data = report.to_dict()
    lines = [
        f"# GPTMeg validation: {'PASS' if report.ok else 'FAIL'}",
        "",
        f"- export: `{report.export_dir}` ({report.graph_dtype})"
        + (f", graph `{report.graph}`" if report.graph else ""),
        *([f"- **changed since export** (sha256 differs from the manifest): {', '.join(report.changed_files)}"]
          if report.changed_files else []),
        f"- reference: eager GPTMeg, {report.reference}",
        f"- numerics plan checked: {report.contract.plan}"
        + (" (" + ", ".join(k for k, v in (report.contract.expected.megatron_numerics or {}).items() if v) + ")"
           if report.contract.plan != "gptmeg" else " (the three divergences)"),
        f"- graph contract: {report.contract.summary()}",
        "",
        "## Outputs",
        "",
        "| backend | case | output | max abs | mean abs | p99 abs | max rel | mean rel | ref max | NaN | Inf | top-1 "
        "| top-5 overlap | worst at |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend in data["backends"]:
        for case in backend["cases"]:
            for m in case["outputs"]:
                worst = m["worst"]
                where = f"step {worst['step']} {worst['index']}" if worst["index"] is not None else "-"
                top1 = top1_text(m["top1"], m.get("top1_near_ties"), m.get("top1_positions"))
                top5 = _fmt(m["top5_overlap"], ".2%") if m["top5_overlap"] is not None else "-"
                lines.append(
                    f"| {backend['backend']} | {case['case']} | {m['name']} | {_fmt(m['max_abs'])} | "
                    f"{_fmt(m['mean_abs'])} | {_fmt(m['p99_abs'])} | {_fmt(m['max_rel'])} | {_fmt(m['mean_rel'])} | "
                    f"{_fmt(m['reference_max'])} | {m['nan']} | {m['inf']} | {top1} | {top5} | {where} |"
                )
    lines += ["", "## Greedy generation", "", "| backend | new tokens | exact-match prefix per row | mean |",
              "| --- | --- | --- | --- |"]
    for backend in data["backends"]:
        g = backend["generation"]
        if g:
            lines.append(f"| {backend['backend']} | {g['new_tokens']} | {g['prefix_lengths']} | "
                         f"{g['mean_prefix']:.1f} |")
    lines += ["", "## Teacher-forced step check (Polygraphy Comparator, each step fed the reference's cache)", ""]
    for backend in data["backends"]:
        check = backend.get("polygraphy")
        if not check:
            continue
        if not check.get("available"):
            lines += [f"**{backend['backend']}**: skipped - {check.get('note', '')}", ""]
            continue
        lines += [f"**{backend['backend']}**: {'pass' if check['passed'] else 'FAIL'} over {check['iterations']} "
                  "steps", "", "| output | max abs | mean abs (worst step) | max rel | atol | ok |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {_fmt(o['max_absdiff'])} | {_fmt(o['mean_absdiff'])} | {_fmt(o['max_reldiff'])} | "
                  f"{_fmt(o['atol'])} | {'yes' if o['passed'] else 'NO'} |" for name, o in check["outputs"].items()]
        lines.append("")
    lines += ["## Layer by layer", ""]
    for backend in data["backends"]:
        loc = backend["localization"]
        if not loc:
            continue
        lines += [f"**{backend['backend']}**: {loc['summary']}", "", "| module | max abs | ref max | relative |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {s['module']} | {_fmt(s['max_abs'])} | {_fmt(s['reference_max'])} | {_fmt(s['relative'])} |"
                  for s in loc["sites"]]
        lines.append("")
    if report.ablation:
        lines += ["## Ablation: each fp32 island removed in turn (fp16 export vs eager GPTMeg reference)", "",
                  "| variant | contract | logits max abs | logits mean abs | top-1 | present max abs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in report.ablation:
            contract = "intact" if row["contract_ok"] else f"{row['broken_sites']} broken"
            lines.append(f"| {row['variant']} | {contract} | {_fmt(row['logits_max_abs'])} | "
                         f"{_fmt(row['logits_mean_abs'])} | {_fmt(row['logits_top1'], '.2%')} | "
                         f"{_fmt(row['present_max_abs'])} |")
        lines.append("")
    failures = [f for b in data["backends"] for f in b["failures"]]
    failures += [f"graph contract: {v['kind']} #{v['index']} ({v.get('scope') or v['node']}): {v['detail']}"
                 for v in data["contract"]["violations"]]
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines) + "\n"


def _plot(report: ParityReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(10, 4.5))
    plotted = False
    for backend in report.backends:
        loc = backend.localization
        if not loc or not loc.available:
            continue
        values = [max(s.relative, 1e-12) for s in loc.sites]
        axis.plot(range(len(values)), values, marker="o", label=backend.backend)
        axis.set_xticks(range(len(values)), [s.module.removeprefix("transformer.") for s in loc.sites],
                        rotation=90, fontsize=7)
        axis.axhline(loc.threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {loc.threshold:g}")
        plotted = True
    if not plotted:
        plt.close(figure)
        return False
    axis.set_yscale("log")
    axis.set_ylabel("max abs error / max |reference|")
    axis.set_title(f"error by layer: {report.graph_dtype} export vs eager {report.reference}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


REPORT_FILES = ("report.json", "report.md", "error_by_layer.png")


def check_report_folder(folder: Path) -> None:
    """A ReportFolderError, before any work, when ``folder`` cannot receive a report."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ReportFolderError(f"--report {folder} exists and is not a folder; choose another --report.")
    existing = nearest_existing(folder)
    if not is_writable_folder(existing):
        raise ReportFolderError(f"cannot write the report to {folder}: {existing} is not a writable folder. Choose "
                                "another --report.")


class ReportFolderError(ValueError):
    pass


def write_report(report: ParityReport, folder: Path) -> list[Path]:
    """Write the report files together: each is rendered to a temporary name first and the set is renamed into
    place at the end (an older report's plot that this run does not redraw is removed), so an interrupted run
    leaves the previous report, not half of a new one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    staged: dict[str, Path] = {}
    try:
        staged["report.json"] = folder / ("report.json" + suffix)
        staged["report.json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n")
        staged["report.md"] = folder / ("report.md" + suffix)
        staged["report.md"].write_text(markdown(report))
        plot = folder / ("error_by_layer" + suffix + ".png")
        if _plot(report, plot):
            staged["error_by_layer.png"] = plot
        with deferred_signals():
            for name in REPORT_FILES:
                if name in staged:
                    os.replace(staged.pop(name), folder / name)
                else:
                    (folder / name).unlink(missing_ok=True)
    finally:
        for leftover in staged.values():
            leftover.unlink(missing_ok=True)
    return [folder / name for name in REPORT_FILES if (folder / name).exists()]
