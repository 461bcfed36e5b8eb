"""Terminal rendering of export results (rich tables)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # verify imports torch; `validate graph` and the runtimes render contracts without it
    from .precision_plan import ContractReport
    from .verify import VerifyReport

__all__ = ["contract_table", "verification_table"]


def contract_table(report: ContractReport, only_broken: bool = False) -> Table:
    table = Table(title=report.summary(), title_justify="left")
    for column in ("site", "#", "module", "intact", "detail"):
        table.add_column(column)
    rows = report.violations if only_broken else report.sites + [v for v in report.violations if v.index < 0]
    for site in rows:
        mark = "[green]yes[/]" if site.intact else "[red]NO[/]"
        table.add_row(site.kind, str(site.index), escape(site.scope or site.node), mark, escape(site.detail))
    return table


def top1_text(top1: float | None, near_ties: int | None = None, positions: int | None = None) -> str:
    """Top-1 agreement for messages and tables: the exact share, and with the near-ties counted when there are any
    ("-" when not measured)."""
    if top1 is None:
        return "-"
    if not near_ties or not positions:
        return f"{top1:.2%}"
    return f"{top1 + near_ties / positions:.2%} ({top1:.2%} exact + {near_ties} near-ties)"


def verification_table(report: VerifyReport) -> Table:
    state = "[green]pass[/]" if report.ok else "[red]FAIL[/]"
    title = (
        f"onnxruntime ({report.provider}) vs eager {report.dtype} on {report.reference_device}: {state}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("output", "max abs", "mean abs", "ref max |x|", "NaN", "Inf", "top-1", "values"):
        table.add_column(column, justify="right" if column != "output" else "left")
    for m in report.outputs:
        table.add_row(
            m.name,
            f"{m.max_abs:.3g}",
            f"{m.mean_abs:.3g}",
            f"{m.reference_max:.3g}" if m.reference_max is not None else "-",
            str(m.nan),
            str(m.inf),
            top1_text(m.top1, m.top1_near_ties, m.top1_positions),
            str(m.count),
        )
    for failure in report.failures:
        table.caption = (table.caption + "\n" if table.caption else "") + f"[red]{escape(failure)}[/]"
    return table
