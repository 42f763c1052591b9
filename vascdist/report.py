"""`vascdist report RUN_OR_CV_DIR`: one self-contained HTML file (PNG images embedded as base64) that a person
reads instead of TensorBoard. Figures are drawn by vascdist.plots (matplotlib).

A run directory: data summary, learning curves (the best step marked), ROC and PR curves with the operating
point, reliability diagram, confusion matrices per level, the metrics table with intervals, the per-site table
when the run has sites, config and versions. Every test figure is drawn from the predictions of the checkpoint the
metrics come from (the best step), and says which step that is. A CV directory: the aggregate as tables (per
fold, mean and spread, pooled with intervals), the per-site figures side by side with their mean ± sd and the
pooled one, per-fold and pooled ROC / PR curves with the pooled operating point, links to each fold's report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vascdist import plots
from vascdist.errors import VascdistError
from vascdist.eval.results import Estimate, SplitReport
from vascdist.fileio import read_jsonl
from vascdist.train.layout import CvLayout, RunLayout

if TYPE_CHECKING:
    from vascdist.cv.results import CvResult, Pooled
    from vascdist.eval.results import SiteRow


def png_tag(image, alt: str) -> str:
    """<img> with the PNG embedded as base64: a matplotlib Figure, or a PNG file read as it is."""
    data = image.read_bytes() if isinstance(image, Path) else plots.png_bytes(image)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _value(v):
    """The point value of a metrics.jsonl entry ({value, lo, hi} or a bare value)."""
    return Estimate.from_json(v).value


# --------------------------------------------------------------------------------------------- pieces
def operating_point(metrics: dict[str, Estimate], level: str, label: str) -> plots.OperatingPoint | None:
    """Where `metrics` sits at `level`: its own sensitivity, specificity and PPV."""
    value = lambda name: metrics[f"{level}/{name}"].value if f"{level}/{name}" in metrics else math.nan
    sens, spec = value("sensitivity"), value("specificity")
    if math.isnan(sens) or math.isnan(spec):
        return None
    return plots.OperatingPoint(sens, 1 - spec, value("ppv"), label)


def curves(arrays: dict[str, np.ndarray], classes: list[str], metrics: dict[str, Estimate], title: str,
           folds: list[dict[str, np.ndarray]] = ()) -> list[str]:
    """One ROC + PR image per level (binary only), the operating point of `metrics` marked; `folds` (CV) are
    drawn thin beside the pooled curve."""
    from vascdist.eval.assess import level_arrays
    if len(classes) != 2:
        return []
    out = []
    per_beat = len(np.unique(arrays["recording"])) == len(arrays["y"])
    fold_levels = [level_arrays(f, per_beat) for f in folds]
    for level, (probs, labels) in level_arrays(arrays, per_beat).items():
        if (level == "cycle" and not per_beat) or labels.min() == labels.max():
            continue
        threshold = metrics.get(f"{level}/threshold")
        rule = f"threshold {threshold.value:.2f}" if threshold is not None else "each fold's own threshold"
        lines = [plots.Curve(probs[:, 1], labels, "pooled" if folds else "test")]
        lines += [plots.Curve(f[level][0][:, 1], f[level][1], "each fold alone", thin=True) for f in fold_levels
                  if f[level][1].min() != f[level][1].max()]
        point = operating_point(metrics, level, f"operating point ({rule})")
        out.append(png_tag(plots.roc_pr(lines, f"{title}, per {level}", point), f"ROC and PR {level}"))
    return out


def metrics_table(report: SplitReport) -> str:
    """The metrics (rows) per level (columns), each `value [lo-hi]`; the calibration slope and intercept give
    way to the report's caveat when the split has too few patients for them."""
    from vascdist.eval.table import format_estimate, table_rows
    levels = report.levels
    rows = table_rows(report.classes) + ["calibration_slope", "calibration_intercept", "threshold"]
    metrics = {**report.metrics, **report.calibration}
    caveat = report.calibration_caveat or ""
    cells = []
    for row in rows:
        values = []
        for lv in levels:
            if row.startswith("calibration_") and caveat and f"{lv}/{row}" in metrics:
                values.append(caveat)
            else:
                values.append(format_estimate(metrics.get(f"{lv}/{row}")))
        if any(v != "n/a" for v in values):
            cells.append(f"<tr><th>{row}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
    head = "<tr><th></th>" + "".join(f"<th>{lv}</th>" for lv in levels) + "</tr>"
    return f"<table>{head}{''.join(cells)}</table>"


def sites_table(sites: dict[str, SiteRow | Pooled], pooled: Pooled | None, level: str, classes: list[str],
                warning: str = "") -> str:
    """Per-site metrics side by side (value [lo-hi] per site), their mean ± sd across sites, and the pooled figure.

    `sites` are a run's test SiteRows or the CV aggregate's pooled metrics per site."""
    from vascdist.eval.table import format_estimate, table_rows
    if not sites:
        return ""
    cols = list(sites)
    rows = [r for r in table_rows(classes) if r != "n"]
    head = ("<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            + "<th>mean ± sd across sites</th>" + ("<th>pooled</th>" if pooled else "") + "</tr>")
    body = []
    for row in ["n"] + rows:
        key = f"{level}/{row}"
        cells, values = [], []
        for c in cols:
            estimate = sites[c].metrics.get(key)
            cells.append(format_estimate(estimate))
            if estimate is not None and isinstance(estimate.value, float) and estimate.value == estimate.value:
                values.append(estimate.value)
        spread = (f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "n/a") \
            if row != "n" else str(sum(int(sites[c].metrics[key].value) for c in cols if key in sites[c].metrics))
        cells.append(spread)
        if pooled:
            cells.append(format_estimate(pooled.metrics.get(key)))
        if any(c not in ("n/a", "0") for c in cells):
            body.append(f"<tr><th>{row}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    note = f"<p><b>{html.escape(warning)}</b></p>" if warning else ""
    return f"<table>{head}{''.join(body)}</table>{note}"


def counts_table(counts_by_split: dict[str, dict]) -> str:
    rows = []
    for split, counts in counts_by_split.items():
        for unit, per_class in counts.items():
            rows.append(f"<tr><td>{split}</td><td>{unit}</td>" + "".join(f"<td>{n}</td>" for n in per_class.values())
                        + f"<td>{sum(per_class.values())}</td></tr>")
    classes = next(iter(next(iter(counts_by_split.values())).values())).keys() if counts_by_split else []
    head = "<tr><th>split</th><th>unit</th>" + "".join(f"<th>{c}</th>" for c in classes) + "<th>total</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def versions() -> str:
    import sklearn
    import torch

    import vascdist
    items = {"vascdist": vascdist.__version__, "python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "scikit-learn": sklearn.__version__, "machine": platform.platform()}
    return "<ul>" + "".join(f"<li>{k}: {html.escape(str(v))}</li>" for k, v in items.items()) + "</ul>"


def config_and_versions(config: str) -> str:
    """The config (folded: it is long) and the versions list."""
    return f"<details><summary>config</summary><pre>{html.escape(config)}</pre></details>{versions()}"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "th{background:#f0f0f0}img{margin:4px;border:1px solid #ddd;max-width:100%}pre{background:#f7f7f7;padding:8px;"
             "overflow-x:auto;font-size:12px}")
    body = "".join(f'<section id="{html.escape(sid)}"><h2>{html.escape(sid.replace("-", " "))}</h2>{content}</section>'
                   for sid, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


# --------------------------------------------------------------------------------------------- reports
def learning_curves(records: list[dict], best_step: int | None) -> list[str]:
    """Train and validation loss, and validation accuracy, per step; the best step marked."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    best = (best_step, f"best step {best_step} (the checkpoint tested)") if best_step is not None else None
    losses = [plots.Series(np.array([r["step"] for r in train]), np.array([r["train/loss"] for r in train]),
                           "train loss (logged steps)")]
    if val and "loss" in val[0]:  # validation loss per evaluation (the tie-break of model selection)
        losses.append(plots.Series(np.array([r["step"] for r in val]), np.array([_value(r["loss"]) for r in val]),
                                   "validation loss"))
    out = [png_tag(plots.line_chart(losses, "loss", "step", "loss", best), "train and validation loss")]
    accuracy = [plots.Series(np.array([r["step"] for r in val]), np.array([_value(r[key]) for r in val]),
                             f"validation {key.replace('/', ' ')}")
                for key in ("recording/accuracy", "recording/balanced_accuracy", "cycle/accuracy")
                if val and key in val[0]]
    if accuracy:
        out.append(png_tag(plots.line_chart(accuracy, "validation accuracy per evaluation", "step", "accuracy",
                                            best), "validation accuracy"))
    if len(losses) == 1:
        out.append("<p>This run logged no validation loss (older runs); validation accuracy stands for the "
                   "validation side.</p>")
    return out


def run_report(run_dir: Path) -> str:
    from vascdist.eval.assess import calibration_note, level_arrays, reliability_image
    from vascdist.eval.calibration import CALIBRATION_MIN_PATIENTS
    from vascdist.eval.table import describe_excluded
    layout = RunLayout(run_dir)
    if not layout.test_metrics.is_file():
        raise VascdistError(f"{run_dir}: no {layout.test_metrics.name} (the run has not finished)")
    report = SplitReport.read(layout.test_metrics)
    records = read_jsonl(layout.metrics) if layout.metrics.is_file() else []  # a half-written last line is left out
    val = [r for r in records if r["split"] == "val"]
    counts = {"validation (last evaluation)": val[-1]["counts"]} if val and "counts" in val[-1] else {}
    counts["test"] = report.counts
    drawn = f"best checkpoint, step {report.step}" if report.step is not None else "best checkpoint"
    source = (f"<p>Every test figure and metric below comes from the {drawn} (chosen on validation), "
              f"predicting the test split.</p>")

    figures, reliability = [], "<p>(no test_predictions.npz)</p>"
    if layout.test_predictions.is_file():
        with np.load(layout.test_predictions) as npz:
            arrays = {k: npz[k] for k in npz.files}
        figures = curves(arrays, report.classes, report.metrics, f"test ({drawn})")
        per_beat = len(np.unique(arrays["recording"])) == len(arrays["y"])
        reliability = png_tag(reliability_image(level_arrays(arrays, per_beat), report,
                                                f"test: reliability ({drawn})"), "reliability")
    confusions = [png_tag(plots.confusion(np.array(matrix), report.classes, f"test, per {lv} ({drawn})"),
                          f"confusion {lv}") for lv, matrix in report.confusion.items()]
    notes = [f"<p>threshold rule: {html.escape(report.threshold_rule)}</p>"] if report.threshold_rule else []
    if report.temperature is not None:
        notes.append(f"<p>temperature scaling: T = {report.temperature:.3f} (fitted on validation)</p>")
    if any(calibration_note(report, lv) for lv in report.levels):
        notes.append(f"<p>Calibration slope and intercept are shown with their bootstrap interval from "
                     f"{CALIBRATION_MIN_PATIENTS} test patients on; below that they are omitted (a logistic fit on "
                     f"a few patients is noise).</p>")
    config = layout.config.read_text() if layout.config.is_file() else "(no config.yaml)"
    excluded = describe_excluded(report.excluded)
    sections = [
        ("data-summary", counts_table(counts) + (f"<p>test: {html.escape(excluded)}</p>" if excluded else "")),
        ("learning-curves", "".join(learning_curves(records, report.step))),
        ("ROC-and-PR-curves", source + ("".join(figures) or "<p>(binary tasks only)</p>")),
        ("reliability-diagram", reliability),
        ("confusion-matrices", "".join(confusions)),
        ("metrics", f"<p>{100 * report.confidence:.0f} % intervals from a bootstrap over patients; "
                    f"{html.escape(drawn)}</p>" + metrics_table(report) + "".join(notes)),
    ]
    if report.sites:
        sections.append(("per-site", run_sites(report)))
    sections.append(("config-and-versions", config_and_versions(config)))
    return page(f"vascdist run {run_dir}", sections)


def run_sites(report: SplitReport) -> str:
    """A run's per-site section: the test report's site rows and the class-mix warning."""
    from vascdist.eval.sites import confound_warning
    warning = confound_warning({site: row.counts for site, row in report.sites.items()})
    return ("<p>Test metrics per site (recording level; intervals from a bootstrap over the site's patients), at the "
            "thresholds of the whole test set</p>" + sites_table(report.sites, None, "recording", report.classes,
                                                                  warning))


def aggregate_tables(result: CvResult) -> str:
    """The CV aggregate as HTML: folds finished / missing, per-fold metrics with mean ± sd, and per repeat the
    table of the pooled out-of-fold predictions with intervals."""
    from vascdist.cv.aggregate import metric_names
    level, names = result.level, metric_names(result.classes)
    fmt = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.3f}"
    total = result.folds * result.repeats
    out = [f"<p>{result.folds} folds x {result.repeats} repeat(s), seed {result.seed}: "
           f"{len(result.finished)} of {total} folds finished.</p>"]
    if result.missing:
        out.append("<ul>" + "".join(f"<li>MISSING {html.escape(n)}: {html.escape(r)}</li>"
                                    for n, r in result.missing.items()) + "</ul>")
    head = "<tr><th>fold</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    rows = ["<tr><th>" + html.escape(fold) + "</th>" + "".join(f"<td>{fmt(m.get(f'{level}/{n}', math.nan))}</td>"
                                                             for n in names) + "</tr>"
            for fold, m in result.per_fold.items()]
    if result.spread:
        cells = [("n/a" if f"{level}/{n}" not in result.spread else
                  f"{result.spread[f'{level}/{n}'].mean:.3f} ± {fmt(result.spread[f'{level}/{n}'].sd)}")
                 for n in names]
        rows.append("<tr><th>mean ± sd</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append(f"<h3>per fold, {level} level</h3><p>test = the held-out fold; thresholds from each fold's own "
               f"validation patients.</p><table>{head}{''.join(rows)}</table>")
    for repeat, pooled in result.pooled.items():
        note = "" if pooled.complete else f" (INCOMPLETE: only {', '.join(pooled.folds)})"
        out.append(f"<h3>pooled out-of-fold predictions, repeat {html.escape(repeat)}{html.escape(note)}</h3>"
                   f"<p>{100 * result.confidence:.0f} % intervals from a bootstrap over patients; each "
                   f"prediction at its own fold's threshold.</p>"
                   + metrics_table(pooled.report(result.classes, result.confidence)))
    return "".join(out)


def cv_report(cv_dir: Path) -> str:
    from vascdist.cv.aggregate import load_plan
    from vascdist.cv.results import CvResult
    layout = CvLayout(cv_dir)
    if not layout.aggregate.is_file():
        from vascdist.cv.aggregate import aggregate
        aggregate(cv_dir)
    result = CvResult.read(layout.aggregate)
    plan = load_plan(cv_dir)
    pooled_html = []
    for repeat, pooled in result.pooled.items():
        parts = []
        for name in pooled.folds:
            with np.load(layout.fold(name).test_predictions) as npz:
                parts.append({k: npz[k] for k in npz.files})
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pooled_html += curves(arrays, result.classes, pooled.metrics, f"out-of-fold, repeat {repeat}", folds=parts)
    folds = "".join(f'<li><a href="{e["dir"]}/{RunLayout(e["dir"]).report.name}">{e["name"]}</a> '
                    f'({"finished" if e["name"] in result.finished else "MISSING"})</li>' for e in plan["entries"])
    config = json.dumps({k: plan[k] for k in ("config", "overrides", "folds", "repeats", "seed", "shards")}
                        | {"group_by": plan.get("group_by", "patient")}, indent=1)
    level = result.level
    held = ("each site's figures are from the fold that held it out (trained on the other sites)"
            if result.group_by == "site" else "each site's figures are from its patients' out-of-fold predictions")
    site_html = sites_table(result.sites, result.pooled.get("0"), level, result.classes, result.site_warning)
    sections = [
        ("aggregate", aggregate_tables(result)),
        ("per-site", (f"<p>{level} level, {html.escape(held)}; pooled: every site's predictions together</p>"
                      + site_html) if site_html else "<p>(no sites in the manifest)</p>"),
        ("ROC-and-PR-curves", ("".join(pooled_html) or "<p>(binary tasks only)</p>")
         + "<p>Thick: the pooled out-of-fold probabilities; thin grey: each fold alone. The ring is the operating "
           "point of the pooled metrics (each prediction at its own fold's threshold); each fold's own operating "
           "point is in its report.</p>"),
        ("folds", f"<ul>{folds}</ul>"),
        ("config-and-versions", config_and_versions(config)),
    ]
    return page(f"vascdist cross-validation {cv_dir}", sections)


def write_report(directory: str | Path) -> Path:
    """Write DIR/report.html for a run or CV directory; returns its path."""
    from vascdist.fileio import atomic_write_text, said_if_disk_full
    directory = Path(directory)
    is_cv = CvLayout.is_cv_dir(directory)
    text = cv_report(directory) if is_cv else run_report(directory)
    out = CvLayout(directory).report if is_cv else RunLayout(directory).report
    with said_if_disk_full(out, len(text.encode())):
        atomic_write_text(out, text)
    return out


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="vascdist report", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="run directory or cross-validation directory")
    a = p.parse_args(argv)
    print(f"wrote {write_report(a.dir)}")
    return 0
