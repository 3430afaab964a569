"""A collapse report in plain words: one verdict line, and cautions about what the numbers can say.

``verdict`` reads the same rules as ``CollapseReport.flags`` (``complete_collapse``: std_l2 below
``std_fraction``/√d; ``dimensional_collapse``: RankMe below ``rank_fraction``·min(N, D) or an effective rank
below 1.5) and says either "no collapse flagged" with the margins, or which metric flagged and why.
``cautions`` says when the sample limits the metrics (n < d bounds every rank by n).
"""

from __future__ import annotations

from featviz.collapse.metrics import CollapseReport


def verdict(report: CollapseReport, std_fraction: float = 0.3, rank_fraction: float = 0.1) -> str:
    """One line: ``no collapse flagged (…)`` or ``collapse flagged: <metric> (<why>)``."""
    std_share = report.std_l2 / report.std_l2_ideal if report.std_l2_ideal else 0.0
    if not (report.complete_collapse(std_fraction) or report.dimensional_collapse(rank_fraction)):
        return (f"no collapse flagged: std_l2 is {std_share:.0%} of 1/√d (complete collapse below "
                f"{std_fraction:.0%}); RankMe {report.rankme:.3g} of at most {report.rank_bound} (dimensional "
                f"collapse below {rank_fraction:.0%} of it, or an effective rank below 1.5)")
    why = []
    if report.complete_collapse(std_fraction):
        why.append(f"complete collapse by std_l2: {std_share:.0%} of 1/√d, below {std_fraction:.0%} (the "
                   "outputs are nearly constant)")
    if report.dimensional_collapse(rank_fraction):
        why.append(f"dimensional collapse by RankMe: {report.rankme:.3g} of at most {report.rank_bound}, below "
                   f"{rank_fraction:.0%} of it (effective rank {report.effective_rank:.3g}): the features use few "
                   "directions")
    return "collapse flagged: " + "; ".join(why)


def cautions(report: CollapseReport) -> list[str]:
    """What the sample keeps the metrics from saying (empty: nothing), one line each."""
    out = []
    if report.n < report.d:
        out.append(f"n = {report.n:,} rows < d = {report.d:,} channels: every rank (RankMe, effective rank, "
                   f"α-ReQ's spectrum) is bounded by n, not d, so it says little about the features' "
                   f"dimensionality; measure at least {report.d:,} rows for that")
    return out
