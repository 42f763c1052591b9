"""The text of the typed results (vascdist.eval.results): a split's table (`vascdist train`'s summary, `vascdist
evaluate`, `vascdist cv`'s pooled figures) with metrics as rows, levels as columns, each cell `0.85 [0.72-0.96]`, the
split's size and what preprocessing excluded; and the per-site table."""

from __future__ import annotations

import math

from vascdist.eval.metrics import LEVELS
from vascdist.eval.results import Estimate, Excluded, SiteRow, SplitReport


def format_value(value, interval: tuple[float, float] | None = None) -> str:
    """'0.85 [0.72-0.96]', '0.85' without an interval, 'n/a' for NaN / None, integers as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if interval is None or any(math.isnan(b) for b in interval):
        return f"{value:.2f}"
    return f"{value:.2f} [{interval[0]:.2f}-{interval[1]:.2f}]"


def format_estimate(estimate: Estimate | None) -> str:
    """format_value of an Estimate; 'n/a' when it was not measured."""
    return "n/a" if estimate is None else format_value(estimate.value, estimate.interval)


def table_rows(classes: list[str]) -> list[str]:
    """The metrics the summary table shows, one row each."""
    if len(classes) == 2:
        return ["balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc", "ece",
                "brier", "n"]
    per_class = [f"{m}/{c}" for c in classes for m in ("sensitivity", "ppv")]
    return ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "macro_auprc", "ece", "brier", *per_class, "n"]


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """'12 patients (7 normal / 5 stenosis), 35 recordings (20 / 15), 1234 cycles (700 / 534)'."""
    parts = []
    for i, (unit, per_class) in enumerate(counts.items()):
        split = " / ".join(f"{n} {c}" if i == 0 else str(n) for c, n in per_class.items())
        parts.append(f"{sum(per_class.values())} {unit} ({split})")
    return ", ".join(parts)


def describe_excluded(excluded: Excluded | None) -> str:
    """'excluded in preprocessing: 2 recordings, 1 patients' (data.shards.excluded_counts: left out of the split,
    with no prediction; the reasons are in the metrics JSON); '' when they were not counted."""
    if excluded is None:
        return ""
    return f"excluded in preprocessing: {excluded.recordings} recordings, {excluded.patients} patients"


def format_table(metrics: dict[str, Estimate], classes: list[str], counts: dict | None = None,
                 confidence: float = 0.95, excluded: Excluded | None = None, threshold_rule: str | None = None,
                 temperature: float | None = None) -> str:
    """Metrics as rows, levels as columns, each cell `value [lo-hi]`; the split's n and exclusions above, the
    threshold rule and temperature below."""
    levels = [lv for lv in LEVELS if f"{lv}/accuracy" in metrics]
    lines = []
    excluded_text = describe_excluded(excluded)
    if counts:
        lines.append(f"n = {describe_counts(counts)}" + (f"; {excluded_text}" if excluded_text else ""))
    elif excluded_text:
        lines.append(excluded_text)
    if any(e.interval is not None for e in metrics.values()):
        lines.append(f"[{100 * confidence:.0f} % interval: bootstrap over patients]")
    rows = table_rows(classes)
    width = max(len(r) for r in rows) + 2
    lines.append(f"{'':<{width}}" + "".join(f"{lv:>20}" for lv in levels))
    if any(f"{lv}/threshold" in metrics for lv in levels):
        rows = rows + ["threshold"]
    for row in rows:
        cells = [format_estimate(metrics.get(f"{lv}/{row}")) for lv in levels]
        lines.append(f"{row:<{width}}" + "".join(f"{c:>20}" for c in cells))
    if threshold_rule is not None:
        lines.append(f"threshold rule: {threshold_rule}")
    if temperature is not None:
        lines.append(f"temperature scaling: T = {temperature:.3f} (fitted on validation)")
    return "\n".join(lines)


def split_summary(report: SplitReport, best_step: int) -> str:
    """A split's header line and its table: what `vascdist train` prints for test and `vascdist evaluate` for any
    split (validation's thresholds are its own; every other split's come from validation)."""
    source = "this set" if report.split == "val" else "validation"
    return "\n".join([f"{report.split} set ({', '.join(report.classes)}), thresholds chosen on {source}; "
                      f"best step {best_step}",
                      format_table(report.metrics, report.classes, report.counts, report.confidence, report.excluded,
                                   report.threshold_rule, report.temperature)])


def format_sites(sites: dict[str, SiteRow], confidence: float = 0.95) -> str:
    """The per-site table: recording-level balanced accuracy, AUROC, sensitivity, specificity with intervals."""
    if not sites:
        return ""
    names = ("balanced_accuracy", "auroc", "sensitivity", "specificity")
    lines = [f"per site, recording level [{100 * confidence:.0f} % interval: bootstrap over the site's patients]:",
             f"{'site':<16}{'n (per class)':>18}" + "".join(f"{n:>20}" for n in names)]
    for site, row in sites.items():
        cells = [format_estimate(row.metrics.get(f"recording/{n}")) for n in names]
        counts = " / ".join(str(v) for v in row.counts.values())
        lines.append(f"{site:<16}{counts:>18}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)
