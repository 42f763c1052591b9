"""Aggregating a cross-validation directory: per-fold metrics, their mean and spread, the metrics of the
pooled out-of-fold predictions with a patient-bootstrap interval, and the same per site (the manifest's `site`
column) with the class-mix warning of vascdist.eval.sites. For leave-one-site-out (--group-by site) a fold is a
site, so the per-site figures are the out-of-site ones and the mean and spread are across sites.

A fold counts only when its run finished (test_metrics.json and test_predictions.npz present); a missing fold
is named with the reason known, and no mean, spread or pooled figure pretends to include it (each says how
many folds it covers). Pooling keeps every fold's own decision: each prediction is thresholded at the
threshold its fold chose on its own validation patients; AUROC, AUPRC, ECE and Brier use the pooled
probabilities as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vascdist.cv.results import CvResult, Pooled, Spread
from vascdist.errors import VascdistError
from vascdist.eval.bootstrap import level_items, patient_weights, percentile_interval, resampled_metrics
from vascdist.eval.metrics import LEVELS, split_counts
from vascdist.eval.results import SplitReport, estimates
from vascdist.eval.table import format_estimate, format_table
from vascdist.train.layout import CvLayout

def load_plan(cv_dir: str | Path) -> dict:
    path = CvLayout(cv_dir).plan
    if not path.is_file():
        raise VascdistError(f"{cv_dir}: no {path.name} (not a directory made by `vascdist cv`)")
    return json.loads(path.read_text())


def fold_status(cv_dir: Path, plan: dict) -> tuple[list[dict], list[dict]]:
    """(finished folds: the plan's entry with its test 'report' and 'predictions', missing folds with a reason)."""
    layout = CvLayout(cv_dir)
    failures = json.loads(layout.failures.read_text()) if layout.failures.is_file() else {}
    done, missing = [], []
    for entry in plan["entries"]:
        run = layout.fold(entry["dir"])
        metrics_path, preds_path = run.test_metrics, run.test_predictions
        if metrics_path.is_file() and preds_path.is_file():
            with np.load(preds_path) as npz:
                done.append({**entry, "report": SplitReport.read(metrics_path, "test", plan["classes"]),
                             "predictions": {k: npz[k] for k in npz.files}})
        else:
            reason = failures.get(entry["name"]) or f"no {metrics_path.name} in {run.root} (still running, or failed: see its log)"
            missing.append({**entry, "reason": reason})
    return done, missing


def fold_values(report: SplitReport) -> dict[str, float]:
    """A fold's row: every defined float of its test report (metrics, calibration, temperature)."""
    values = {**report.selection_values(), **{k: e.value for k, e in report.calibration.items()}}
    return {k: float(v) for k, v in values.items() if isinstance(v, float) and not math.isnan(v)}


def fold_spread(per_fold: dict[str, dict[str, float]]) -> dict[str, Spread]:
    """{metric: Spread} over the finished folds' rows (sd with ddof=1; NaN values left out)."""
    keys = sorted({k for row in per_fold.values() for k in row})
    out = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in per_fold.values()], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size:
            out[key] = Spread(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan,
                              float(values.min()), float(values.max()), int(values.size))
    return out


def pooled_metrics(done: list[dict], classes: list[str], resamples: int, seed: int,
                   confidence: float, complete: bool | None = None) -> Pooled:
    """Metrics of the pooled out-of-fold predictions of `done` (one repeat, or one site's part of its folds)."""
    arrays = {k: np.concatenate([f["predictions"][k] for f in done]) for k in ("probs", "y", "recording", "patient")}
    if len(np.unique(arrays["patient"])) != sum(len(np.unique(f["predictions"]["patient"])) for f in done):
        raise VascdistError("pooled out-of-fold predictions hold a patient twice: folds of one repeat overlap")
    items, n_patients = level_items(arrays["probs"], arrays["y"], arrays["recording"], arrays["patient"])
    patient_ids = np.unique(arrays["patient"])
    fold_of_patient = np.empty(n_patients, np.int64)
    for i, f in enumerate(done):
        fold_of_patient[np.searchsorted(patient_ids, np.unique(f["predictions"]["patient"]))] = i
    weights = np.vstack([np.ones((1, n_patients)), patient_weights(n_patients, resamples, seed)])
    metrics, intervals = {}, {}
    for level in LEVELS:
        probs, labels, patient = items[level]
        threshold = None
        if len(classes) == 2:  # each item at its own fold's threshold for this level
            per_fold = np.array([f["report"].value(f"{level}/threshold") for f in done])
            threshold = per_fold[fold_of_patient[patient]]
        for name, values in resampled_metrics(probs, labels, patient, weights, classes, threshold).items():
            metrics[f"{level}/{name}"] = float(values[0])
            if resamples:
                intervals[f"{level}/{name}"] = percentile_interval(values[1:], confidence)
        metrics[f"{level}/n"] = int(len(labels))
    return Pooled(estimates(metrics, intervals), split_counts(arrays, classes, False), [f["name"] for f in done],
                  complete)


def site_folds(done: list[dict], recording_sites: np.ndarray) -> dict[str, list[dict]]:
    """{site: the finished folds' predictions restricted to that site's recordings} (folds without it left out)."""
    out: dict[str, list[dict]] = {}
    for f in done:
        site_of = recording_sites[f["predictions"]["recording"].astype(np.int64)]
        for site in sorted(set(site_of) - {""}):
            keep = site_of == site
            out.setdefault(site, []).append({**f, "predictions": {k: v[keep] for k, v in f["predictions"].items()}})
    return out


def per_site(done: list[dict], plan: dict, cfg) -> tuple[dict[str, Pooled], str]:
    """({site: pooled_metrics of its out-of-fold predictions}, the class-mix warning or ''), first repeat only."""
    from vascdist.data.shards import load_index
    from vascdist.eval.sites import confound_warning, recording_sites
    index = load_index(plan["shards"])
    first = [f for f in done if f["repeat"] == 0]
    sites = {site: pooled_metrics(members, plan["classes"], cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed,
                                  cfg.eval.confidence)
             for site, members in site_folds(first, recording_sites(index)).items()}
    warning = confound_warning({site: s.counts["recordings"] for site, s in sites.items()})
    return sites, warning


def aggregate(cv_dir: str | Path) -> CvResult:
    """Everything `vascdist cv --report` prints, as data; also written to CV_DIR/aggregate.json."""
    from vascdist.config import load_config
    cv_dir = Path(cv_dir)
    plan = load_plan(cv_dir)
    done, missing = fold_status(cv_dir, plan)
    cfg = load_config(plan["config"], plan["overrides"])
    per_fold = {f["name"]: fold_values(f["report"]) for f in done}
    pooled = {}
    for repeat in range(plan["repeats"]):
        members = [f for f in done if f["repeat"] == repeat]
        if members:
            pooled[str(repeat)] = pooled_metrics(members, plan["classes"], cfg.eval.bootstrap_resamples,
                                                 cfg.eval.bootstrap_seed, cfg.eval.confidence,
                                                 complete=len(members) == plan["folds"])
    sites, warning = per_site(done, plan, cfg) if done else ({}, "")
    result = CvResult(str(cv_dir), plan.get("group_by", "patient"), plan["folds"], plan["repeats"], plan["seed"],
                      plan["classes"], [f["name"] for f in done], {f["name"]: f["reason"] for f in missing},
                      per_fold, fold_spread(per_fold), pooled, sites, warning, cfg.eval.confidence)
    from vascdist.fileio import atomic_write_json
    atomic_write_json(CvLayout(cv_dir).aggregate, result.to_json())
    return result


def metric_names(classes: list[str]) -> list[str]:
    """The metrics of the per-fold and per-site rows."""
    return (["balanced_accuracy", "sensitivity", "specificity", "auroc", "auprc", "ece"] if len(classes) == 2
            else ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "ece"])


def format_aggregate(result: CvResult) -> str:
    """The text report: folds finished / missing, per-fold rows, mean and spread, per-site rows with intervals,
    pooled table with intervals."""
    classes, level, names = result.classes, result.level, metric_names(result.classes)
    total = result.folds * result.repeats
    by_site = result.group_by == "site"
    kind = f"leave-one-site-out over {result.folds} sites" if by_site else \
        f"{result.folds} folds x {result.repeats} repeat(s), seed {result.seed}"
    lines = [f"cross-validation: {kind}: {len(result.finished)} of {total} folds finished ({result.cv_dir})"]
    for name, reason in result.missing.items():
        lines.append(f"  MISSING {name}: {reason}")
    held_out = "the held-out site" if by_site else "the held-out fold"
    lines.append(f"per fold, {level} level (test = {held_out}; thresholds from each fold's validation):")
    width = max([12] + [len(f) + 2 for f in result.per_fold])
    lines.append(f"{'fold':<{width}}" + "".join(f"{n:>19}" for n in names))
    fmt = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.3f}"
    for fold, metrics in result.per_fold.items():
        lines.append(f"{fold:<{width}}" + "".join(f"{fmt(metrics.get(f'{level}/{n}', math.nan)):>19}" for n in names))
    spread = result.spread
    if spread:
        cells = []
        for n in names:
            s = spread.get(f"{level}/{n}")
            cells.append("n/a" if s is None else f"{s.mean:.3f} ± {fmt(s.sd)}")
        count = max((s.folds for s in spread.values()), default=0)
        over = "sites" if by_site else "finished folds"
        lines.append(f"{'mean ± sd':<{width}}" + "".join(f"{c:>19}" for c in cells) + f"   (over {count} {over})")
    if result.sites:
        lines.append("")
        lines.append(format_site_rows(result, level, names))
    if result.site_warning:
        lines.append(result.site_warning)
    for repeat, pooled in result.pooled.items():
        note = "" if pooled.complete else f" -- INCOMPLETE: only {', '.join(pooled.folds)}"
        what = "out-of-site" if by_site else "out-of-fold"
        lines.append(f"\npooled {what} predictions, repeat {repeat}{note}:")
        lines.append(format_table(pooled.metrics, classes, pooled.counts, result.confidence))
    return "\n".join(lines)


def format_site_rows(result: CvResult, level: str, names: list[str]) -> str:
    """Per site: n per class and each metric as value [lo-hi] (pooled predictions of that site's patients)."""
    by_site = result.group_by == "site"
    what = "tested when held out (out-of-site)" if by_site else "out-of-fold predictions of its patients"
    lines = [f"per site, {level} level, {what} [{100 * result.confidence:.0f} % interval: bootstrap "
             "over the site's patients]:"]
    width = max(16, *(len(s) + 2 for s in result.sites))
    lines.append(f"{'site':<{width}}{'n (per class)':>16}" + "".join(f"{n:>19}" for n in names))
    unit = "recordings" if level == "recording" else "cycles"
    for site, pooled in result.sites.items():
        counts = " / ".join(str(v) for v in pooled.counts.get(unit, {}).values())
        cells = [format_estimate(pooled.metrics.get(f"{level}/{n}")) for n in names]
        lines.append(f"{site:<{width}}{counts:>16}" + "".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)
