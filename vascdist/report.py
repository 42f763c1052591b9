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

import numpy as np

from vascdist import plots
from vascdist.errors import VascdistError
from vascdist.fileio import read_jsonl
from vascdist.train.layout import CvLayout, RunLayout


def png_tag(image, alt: str) -> str:
    """<img> with the PNG embedded as base64: a matplotlib Figure, or a PNG file read as it is."""
    data = image.read_bytes() if isinstance(image, Path) else plots.png_bytes(image)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _value(v):
    return v["value"] if isinstance(v, dict) else v


# --------------------------------------------------------------------------------------------- pieces
def operating_point(metrics: dict, level: str, label: str) -> plots.OperatingPoint | None:
    """Where `metrics` (a record or a flat dict) sits at `level`: its own sensitivity, specificity and PPV."""
    sens, spec = _value(metrics.get(f"{level}/sensitivity")), _value(metrics.get(f"{level}/specificity"))
    if sens is None or spec is None or math.isnan(sens) or math.isnan(spec):
        return None
    ppv = _value(metrics.get(f"{level}/ppv", float("nan")))
    return plots.OperatingPoint(sens, 1 - spec, float("nan") if ppv is None else ppv, label)


def curves(arrays: dict[str, np.ndarray], classes: list[str], metrics: dict, title: str,
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
        threshold = _value(metrics.get(f"{level}/threshold"))
        rule = f"threshold {threshold:.2f}" if threshold is not None else "each fold's own threshold"
        lines = [plots.Curve(probs[:, 1], labels, "pooled" if folds else "test")]
        lines += [plots.Curve(f[level][0][:, 1], f[level][1], "each fold alone", thin=True) for f in fold_levels
                  if f[level][1].min() != f[level][1].max()]
        point = operating_point(metrics, level, f"operating point ({rule})")
        out.append(png_tag(plots.roc_pr(lines, f"{title}, per {level}", point), f"ROC and PR {level}"))
    return out


def metrics_table(record: dict, classes: list[str]) -> str:
    """The metrics (rows) per level (columns), each `value [lo-hi]`; the calibration slope and intercept give
    way to the record's caveat when the split has too few patients for them."""
    from vascdist.eval.assess import format_value, table_rows
    from vascdist.eval.metrics import LEVELS
    levels = [lv for lv in LEVELS if f"{lv}/accuracy" in record]
    rows = table_rows(classes) + ["calibration_slope", "calibration_intercept", "threshold"]
    caveat = record.get("calibration_caveat", "")
    cells = []
    for row in rows:
        values = []
        for lv in levels:
            v = record.get(f"{lv}/{row}")
            if row.startswith("calibration_") and caveat and f"{lv}/{row}" in record:
                values.append(caveat)
            else:
                values.append(format_value(v["value"], (v["lo"], v["hi"])) if isinstance(v, dict) else format_value(v))
        if any(v != "n/a" for v in values):
            cells.append(f"<tr><th>{row}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
    head = "<tr><th></th>" + "".join(f"<th>{lv}</th>" for lv in levels) + "</tr>"
    return f"<table>{head}{''.join(cells)}</table>"


def sites_table(sites: dict, pooled: dict | None, level: str, classes: list[str], warning: str = "") -> str:
    """Per-site metrics side by side (value [lo-hi] per site), their mean ± sd across sites, and the pooled figure.

    `sites` is {site: {"metrics", "intervals", "counts"}} (the CV aggregate) or {site: {key: value, "intervals",
    "counts"}} (a run's test record)."""
    from vascdist.eval.assess import format_value, table_rows
    if not sites:
        return ""
    metric = lambda m: m.get("metrics", m)
    cols = list(sites)
    rows = [r for r in table_rows(classes) if r != "n"]
    head = ("<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            + "<th>mean ± sd across sites</th>" + ("<th>pooled</th>" if pooled else "") + "</tr>")
    body = []
    for row in ["n"] + rows:
        key = f"{level}/{row}"
        cells, values = [], []
        for c in cols:
            v = metric(sites[c]).get(key)
            interval = sites[c].get("intervals", {}).get(key)
            cells.append(format_value(v, tuple(interval) if interval else None))
            if isinstance(v, float) and v == v:
                values.append(v)
        spread = (f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "n/a") \
            if row != "n" else str(sum(int(metric(sites[c]).get(key, 0)) for c in cols))
        cells.append(spread)
        if pooled:
            interval = pooled.get("intervals", {}).get(key)
            cells.append(format_value(pooled["metrics"].get(key), tuple(interval) if interval else None))
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
    from vascdist.eval.assess import calibration_note, describe_excluded, level_arrays, reliability_image
    from vascdist.eval.calibration import CALIBRATION_MIN_PATIENTS
    from vascdist.eval.metrics import LEVELS
    layout = RunLayout(run_dir)
    if not layout.test_metrics.is_file():
        raise VascdistError(f"{run_dir}: no {layout.test_metrics.name} (the run has not finished)")
    record = json.loads(layout.test_metrics.read_text())
    records = read_jsonl(layout.metrics) if layout.metrics.is_file() else []  # a half-written last line is left out
    val = [r for r in records if r["split"] == "val"]
    classes = list(next(iter(record["counts"].values())).keys())
    counts = {"validation (last evaluation)": val[-1]["counts"]} if val and "counts" in val[-1] else {}
    counts["test"] = record["counts"]
    best_step = record.get("checkpoint_step")
    drawn = f"best checkpoint, step {best_step}" if best_step is not None else "best checkpoint"
    source = (f"<p>Every test figure and metric below comes from the {drawn} (chosen on validation), "
              f"predicting the test split.</p>")

    figures, reliability = [], "<p>(no test_predictions.npz)</p>"
    if layout.test_predictions.is_file():
        with np.load(layout.test_predictions) as npz:
            arrays = {k: npz[k] for k in npz.files}
        figures = curves(arrays, classes, record, f"test ({drawn})")
        per_beat = len(np.unique(arrays["recording"])) == len(arrays["y"])
        reliability = png_tag(reliability_image(level_arrays(arrays, per_beat), record,
                                                f"test: reliability ({drawn})"), "reliability")
    confusions = [png_tag(plots.confusion(np.array(record[f"{lv}/confusion"]), classes,
                                          f"test, per {lv} ({drawn})"), f"confusion {lv}")
                  for lv in LEVELS if f"{lv}/confusion" in record]
    notes = [f"<p>threshold rule: {html.escape(str(record['threshold_rule']))}</p>"] \
        if "threshold_rule" in record else []
    if "temperature" in record:
        notes.append(f"<p>temperature scaling: T = {record['temperature']:.3f} (fitted on validation)</p>")
    if any(calibration_note(record, lv) for lv in LEVELS):
        notes.append(f"<p>Calibration slope and intercept are shown with their bootstrap interval from "
                     f"{CALIBRATION_MIN_PATIENTS} test patients on; below that they are omitted (a logistic fit on "
                     f"a few patients is noise).</p>")
    config = layout.config.read_text() if layout.config.is_file() else "(no config.yaml)"
    excluded = f"<p>test: {html.escape(describe_excluded(record))}</p>" if describe_excluded(record) else ""
    sections = [
        ("data-summary", counts_table(counts) + excluded),
        ("learning-curves", "".join(learning_curves(records, best_step))),
        ("ROC-and-PR-curves", source + ("".join(figures) or "<p>(binary tasks only)</p>")),
        ("reliability-diagram", reliability),
        ("confusion-matrices", "".join(confusions)),
        ("metrics", f"<p>{100 * record.get('confidence', 0.95):.0f} % intervals from a bootstrap over patients; "
                    f"{html.escape(drawn)}</p>" + metrics_table(record, classes) + "".join(notes)),
    ]
    if record.get("sites"):
        from vascdist.eval.sites import confound_warning
        warning = confound_warning({site: m["counts"] for site, m in record["sites"].items()})
        sections.append(("per-site", "<p>Test metrics per site (recording level; intervals from a bootstrap over the "
                                     "site's patients), at the thresholds of the whole test set</p>"
                         + sites_table(record["sites"], None, "recording", classes, warning)))
    sections.append(("config-and-versions", config_and_versions(config)))
    return page(f"vascdist run {run_dir}", sections)


def aggregate_tables(result: dict) -> str:
    """The CV aggregate as HTML: folds finished / missing, per-fold metrics with mean ± sd, and per repeat the
    table of the pooled out-of-fold predictions with intervals."""
    from vascdist.eval.bootstrap import with_intervals
    classes = result["classes"]
    level = "recording" if any(k.startswith("recording/") for r in result["per_fold"].values() for k in r) else "cycle"
    names = ["balanced_accuracy", "sensitivity", "specificity", "auroc", "auprc", "ece"] if len(classes) == 2 \
        else ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "ece"]
    fmt = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.3f}"
    total = result["folds"] * result["repeats"]
    out = [f"<p>{result['folds']} folds x {result['repeats']} repeat(s), seed {result['seed']}: "
           f"{len(result['finished'])} of {total} folds finished.</p>"]
    if result["missing"]:
        out.append("<ul>" + "".join(f"<li>MISSING {html.escape(n)}: {html.escape(r)}</li>"
                                    for n, r in result["missing"].items()) + "</ul>")
    head = "<tr><th>fold</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    rows = ["<tr><th>" + html.escape(fold) + "</th>" + "".join(f"<td>{fmt(m.get(f'{level}/{n}', math.nan))}</td>"
                                                             for n in names) + "</tr>"
            for fold, m in result["per_fold"].items()]
    spread = result["spread"]
    if spread:
        cells = [("n/a" if spread.get(f"{level}/{n}") is None else
                  f"{spread[f'{level}/{n}']['mean']:.3f} ± {fmt(spread[f'{level}/{n}']['sd'])}") for n in names]
        rows.append("<tr><th>mean ± sd</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append(f"<h3>per fold, {level} level</h3><p>test = the held-out fold; thresholds from each fold's own "
               f"validation patients.</p><table>{head}{''.join(rows)}</table>")
    for repeat, pooled in result["pooled"].items():
        note = "" if pooled["complete"] else f" (INCOMPLETE: only {', '.join(pooled['folds'])})"
        record = with_intervals(pooled["metrics"], {k: tuple(v) for k, v in pooled["intervals"].items()})
        out.append(f"<h3>pooled out-of-fold predictions, repeat {html.escape(repeat)}{html.escape(note)}</h3>"
                   f"<p>{100 * result.get('confidence', 0.95):.0f} % intervals from a bootstrap over patients; each "
                   f"prediction at its own fold's threshold.</p>" + metrics_table(record, classes))
    return "".join(out)


def cv_report(cv_dir: Path) -> str:
    from vascdist.cv.aggregate import load_plan
    layout = CvLayout(cv_dir)
    aggregate_path = layout.aggregate
    if not aggregate_path.is_file():
        from vascdist.cv.aggregate import aggregate
        aggregate(cv_dir)
    result = json.loads(aggregate_path.read_text())
    plan = load_plan(cv_dir)
    classes = result["classes"]
    pooled_html = []
    for repeat, pooled in result["pooled"].items():
        parts = []
        for name in pooled["folds"]:
            with np.load(layout.fold(name).test_predictions) as npz:
                parts.append({k: npz[k] for k in npz.files})
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pooled_html += curves(arrays, classes, pooled["metrics"], f"out-of-fold, repeat {repeat}", folds=parts)
    folds = "".join(f'<li><a href="{e["dir"]}/{RunLayout(e["dir"]).report.name}">{e["name"]}</a> '
                    f'({"finished" if e["name"] in result["finished"] else "MISSING"})</li>' for e in plan["entries"])
    config = json.dumps({k: plan[k] for k in ("config", "overrides", "folds", "repeats", "seed", "shards")}
                        | {"group_by": plan.get("group_by", "patient")}, indent=1)
    level = "recording" if any(k.startswith("recording/") for r in result["per_fold"].values() for k in r) else "cycle"
    held = ("each site's figures are from the fold that held it out (trained on the other sites)"
            if result.get("group_by") == "site" else "each site's figures are from its patients' out-of-fold predictions")
    site_html = sites_table(result.get("sites", {}), result["pooled"].get("0"), level, classes,
                            result.get("site_warning", ""))
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
