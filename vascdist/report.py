"""`vascdist report RUN_OR_CV_DIR`: one self-contained HTML file (PNG images embedded as base64) that a person
reads instead of TensorBoard. Charts are drawn with PIL (no plotting library is a dependency).

A run directory: data summary, learning curves, ROC and PR curves with the operating point, reliability
diagram, confusion matrices per level, the metrics table with intervals, config and versions. A CV directory:
the aggregate (folds, mean and spread, pooled table), the per-site figures side by side with their mean ± sd and
the pooled one, pooled ROC / PR curves, links to each fold's report. A run with sites gets the per-site table too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vascdist.errors import VascdistError
from vascdist.fileio import read_jsonl
from vascdist.train.layout import RunLayout

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


# --------------------------------------------------------------------------------------------- drawing
def line_chart(series: list[tuple[np.ndarray, np.ndarray, str]], title: str, xlabel: str, ylabel: str,
               unit_square: bool = False, points: list[tuple[float, float, str]] = ()) -> np.ndarray:
    """Lines (x, y, label) on one pair of axes, with a legend; unit_square fixes both axes to [0, 1] and draws
    the diagonal. `points` are marked with a ring and their label (an operating point)."""
    font = ImageFont.load_default(size=13)
    w, h, left, top, right, bottom = 460, 350, 58, 44, 16, 46
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    xs = np.concatenate([np.asarray(s[0], float) for s in series]) if series else np.zeros(1)
    ys = np.concatenate([np.asarray(s[1], float) for s in series]) if series else np.zeros(1)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if unit_square or not finite.any():
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    else:
        x0, x1 = float(xs[finite].min()), float(xs[finite].max())
        y0, y1 = float(ys[finite].min()), float(ys[finite].max())
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = w - left - right, h - top - bottom
    to = lambda x, y: (left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph)
    draw.rectangle([left, top, left + pw, top + ph], outline=(90, 90, 90))
    draw.text((left, 8), title, fill="black", font=font)
    for frac in (0, 0.5, 1):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        draw.text((to(xv, y0)[0], top + ph + 4), f"{xv:.3g}", fill="black", font=font, anchor="ma")
        draw.text((left - 4, to(x0, yv)[1]), f"{yv:.3g}", fill="black", font=font, anchor="rm")
    draw.text((left + pw / 2, h - 18), xlabel, fill="black", font=font, anchor="ma")
    draw.text((4, top - 16), ylabel, fill="black", font=font)  # below the title line
    if unit_square:
        draw.line([to(0, 0), to(1, 1)], fill=(190, 190, 190))
    for i, (x, y, label) in enumerate(series):
        pts = [to(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float)) if np.isfinite(a) and np.isfinite(b)]
        color = COLORS[i % len(COLORS)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((left + pw - 8, top + 8 + 16 * i), label, fill=color, font=font, anchor="ra")
    for x, y, label in points:
        px, py = to(x, y)
        draw.ellipse([px - 6, py - 6, px + 6, py + 6], outline="black", width=2)
        flip = px + 9 + draw.textlength(label, font=font) > w - 4  # near the right edge: label on the left
        draw.text((px - 9, py + 4) if flip else (px + 9, py + 4), label, fill="black", font=font,
                  anchor="ra" if flip else "la")
    return np.asarray(image, dtype=np.uint8)


def png_tag(image: np.ndarray | Path, alt: str) -> str:
    """<img> with the PNG embedded as base64 (a path is read as it is)."""
    if isinstance(image, Path):
        data = image.read_bytes()
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        data = buffer.getvalue()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


# --------------------------------------------------------------------------------------------- pieces
def curves(arrays: dict[str, np.ndarray], classes: list[str], metrics: dict, what: str) -> list[str]:
    """ROC and PR curve images (binary) per recording and patient level, the operating point marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from vascdist.eval.assess import level_arrays
    if len(classes) != 2:
        return []
    out = []
    per_beat = len(np.unique(arrays["recording"])) == len(arrays["y"])
    for level, (probs, labels) in level_arrays(arrays, per_beat).items():
        if (level == "cycle" and not per_beat) or labels.min() == labels.max():
            continue
        t = float(metrics.get(f"{level}/threshold", 0.5))
        pred = probs[:, 1] >= t
        sens = float((pred & (labels == 1)).sum() / max((labels == 1).sum(), 1))
        fpr_at = float((pred & (labels == 0)).sum() / max((labels == 0).sum(), 1))
        ppv = float((pred & (labels == 1)).sum() / max(pred.sum(), 1))
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
        precision, recall, _ = precision_recall_curve(labels, probs[:, 1])
        op = f"threshold {t:.2f}"
        out.append(png_tag(line_chart([(fpr, tpr, f"{level} ROC")], f"{what}: ROC, per {level}", "1 - specificity",
                                      "sensitivity", True, [(fpr_at, sens, op)]), f"ROC {level}"))
        out.append(png_tag(line_chart([(recall, precision, f"{level} PR")], f"{what}: precision-recall, per {level}",
                                      "recall (sensitivity)", "precision (PPV)", True, [(sens, ppv, op)]),
                           f"PR {level}"))
    return out


def metrics_table(record: dict, classes: list[str]) -> str:
    """The metrics (rows) per level (columns), each `value [lo-hi]`."""
    from vascdist.eval.assess import format_value, table_rows
    from vascdist.eval.metrics import LEVELS
    levels = [lv for lv in LEVELS if f"{lv}/accuracy" in record]
    rows = table_rows(classes) + ["calibration_slope", "calibration_intercept", "threshold"]
    cells = []
    for row in rows:
        values = []
        for lv in levels:
            v = record.get(f"{lv}/{row}")
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


def page(title: str, sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "th{background:#f0f0f0}img{margin:4px;border:1px solid #ddd}pre{background:#f7f7f7;padding:8px;"
             "overflow-x:auto;font-size:12px}")
    body = "".join(f'<section id="{html.escape(sid)}"><h2>{html.escape(sid.replace("-", " "))}</h2>{content}</section>'
                   for sid, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


# --------------------------------------------------------------------------------------------- reports
def run_report(run_dir: Path) -> str:
    from vascdist.eval.metrics import LEVELS, render_confusion_matrix
    layout = RunLayout(run_dir)
    test_path = layout.test_metrics
    if not test_path.is_file():
        raise VascdistError(f"{run_dir}: no test_metrics.json (the run has not finished)")
    record = json.loads(test_path.read_text())
    records = read_jsonl(layout.metrics) if layout.metrics.is_file() else []  # a half-written last line is left out
    val = [r for r in records if r["split"] == "val"]
    classes = list(next(iter(record["counts"].values())).keys())
    counts = {"validation (last evaluation)": val[-1]["counts"]} if val and "counts" in val[-1] else {}
    counts["test"] = record["counts"]

    train = [r for r in records if r["split"] == "train"]
    value = lambda v: v["value"] if isinstance(v, dict) else v
    losses = [(np.array([r["step"] for r in train]), np.array([r["train/loss"] for r in train]), "train loss")]
    if val and "loss" in val[0]:  # validation loss per evaluation (the tie-break of model selection)
        losses.append((np.array([r["step"] for r in val]), np.array([value(r["loss"]) for r in val]), "val loss"))
    curves_html = [png_tag(line_chart(losses, "train loss (logged steps), validation loss",
                                      "step", "loss"), "train and val loss")]
    acc_series = []
    for key in ("recording/accuracy", "recording/balanced_accuracy", "cycle/accuracy"):
        if val and key in val[0]:
            acc_series.append((np.array([r["step"] for r in val]), np.array([value(r[key]) for r in val]), f"val {key}"))
    if acc_series:
        curves_html.append(png_tag(line_chart(acc_series, "validation accuracy per evaluation", "step", "accuracy"),
                                   "val accuracy"))
    if len(losses) == 1:
        curves_html.append("<p>This run logged no validation loss (older runs); validation accuracy stands for the "
                           "validation side.</p>")

    predictions = layout.test_predictions
    roc = []
    if predictions.is_file():
        with np.load(predictions) as npz:
            roc = curves({k: npz[k] for k in npz.files}, classes, record, "test")
    confusions = [png_tag(render_confusion_matrix(np.array(record[f"{lv}/confusion"]), classes, f"test, per {lv}"),
                          f"confusion {lv}") for lv in LEVELS if f"{lv}/confusion" in record]
    reliability = run_dir / "test_reliability.png"
    rule = [f"<p>threshold rule: {html.escape(str(record['threshold_rule']))}</p>"] if "threshold_rule" in record else []
    if "temperature" in record:
        rule.append(f"<p>temperature scaling: T = {record['temperature']:.3f} (fitted on validation)</p>")
    config = layout.config.read_text() if layout.config.is_file() else "(no config.yaml)"
    from vascdist.eval.assess import describe_excluded
    excluded = f"<p>test: {html.escape(describe_excluded(record))}</p>" if describe_excluded(record) else ""
    sections = [
        ("data-summary", counts_table(counts) + excluded),
        ("learning-curves", "".join(curves_html)),
        ("ROC-and-PR-curves", "".join(roc) or "<p>(binary tasks only)</p>"),
        ("reliability-diagram", png_tag(reliability, "reliability") if reliability.is_file() else "<p>(none)</p>"),
        ("confusion-matrices", "".join(confusions)),
        ("metrics", f"<p>{100 * record.get('confidence', 0.95):.0f} % intervals from a bootstrap over patients</p>"
                    + metrics_table(record, classes) + "".join(rule)),
    ]
    if record.get("sites"):
        from vascdist.eval.sites import confound_warning
        warning = confound_warning({site: m["counts"] for site, m in record["sites"].items()})
        sections.append(("per-site", "<p>Test metrics per site (recording level; intervals from a bootstrap over the "
                                     "site's patients), at the thresholds of the whole test set</p>"
                         + sites_table(record["sites"], None, "recording", classes, warning)))
    sections.append(("config-and-versions", f"<pre>{html.escape(config)}</pre>{versions()}"))
    return page(f"vascdist run {run_dir}", sections)


def cv_report(cv_dir: Path) -> str:
    from vascdist.cv.aggregate import format_aggregate, load_plan
    aggregate_path = cv_dir / "aggregate.json"
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
            with np.load(cv_dir / name / "test_predictions.npz") as npz:
                parts.append({k: npz[k] for k in npz.files})
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pooled_html += curves(arrays, classes, {}, f"pooled out-of-fold, repeat {repeat}")
    folds = "".join(f'<li><a href="{e["dir"]}/report.html">{e["name"]}</a> '
                    f'({"finished" if e["name"] in result["finished"] else "MISSING"})</li>' for e in plan["entries"])
    config = json.dumps({k: plan[k] for k in ("config", "overrides", "folds", "repeats", "seed", "shards")}
                        | {"group_by": plan.get("group_by", "patient")}, indent=1)
    level = "recording" if any(k.startswith("recording/") for r in result["per_fold"].values() for k in r) else "cycle"
    held = ("each site's figures are from the fold that held it out (trained on the other sites)"
            if result.get("group_by") == "site" else "each site's figures are from its patients' out-of-fold predictions")
    site_html = sites_table(result.get("sites", {}), result["pooled"].get("0"), level, classes,
                            result.get("site_warning", ""))
    sections = [
        ("aggregate", f"<pre>{html.escape(format_aggregate(result))}</pre>"),
        ("per-site", (f"<p>{level} level, {html.escape(held)}; pooled: every site's predictions together</p>"
                      + site_html) if site_html else "<p>(no sites in the manifest)</p>"),
        ("ROC-and-PR-curves", ("".join(pooled_html) or "<p>(binary tasks only)</p>")
         + "<p>Curves of the pooled probabilities; each fold's operating point is in its own report.</p>"),
        ("folds", f"<ul>{folds}</ul>"),
        ("config-and-versions", f"<pre>{html.escape(config)}</pre>{versions()}"),
    ]
    return page(f"vascdist cross-validation {cv_dir}", sections)


def write_report(directory: str | Path) -> Path:
    """Write DIR/report.html for a run or CV directory; returns its path."""
    from vascdist.fileio import atomic_write_text
    directory = Path(directory)
    text = cv_report(directory) if (directory / "cv.json").is_file() else run_report(directory)
    out = directory / "report.html"
    atomic_write_text(out, text)
    return out


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="vascdist report", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="run directory or cross-validation directory")
    a = p.parse_args(argv)
    print(f"wrote {write_report(a.dir)}")
    return 0
