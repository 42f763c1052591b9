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

from vascdist.errors import VascdistError
from vascdist.eval.assess import format_table
from vascdist.eval.bootstrap import level_items, patient_weights, percentile_interval, resampled_metrics
from vascdist.eval.metrics import LEVELS, split_counts
from vascdist.train.layout import CvLayout

def load_plan(cv_dir: str | Path) -> dict:
    path = CvLayout(cv_dir).plan
    if not path.is_file():
        raise VascdistError(f"{cv_dir}: no {path.name} (not a directory made by `vascdist cv`)")
    return json.loads(path.read_text())


def fold_status(cv_dir: Path, plan: dict) -> tuple[list[dict], list[dict]]:
    """(finished folds with their metrics and predictions, missing folds with a reason)."""
    layout = CvLayout(cv_dir)
    failures = json.loads(layout.failures.read_text()) if layout.failures.is_file() else {}
    done, missing = [], []
    for entry in plan["entries"]:
        run = layout.fold(entry["dir"])
        metrics_path, preds_path = run.test_metrics, run.test_predictions
        if metrics_path.is_file() and preds_path.is_file():
            with np.load(preds_path) as npz:
                done.append({**entry, "metrics": json.loads(metrics_path.read_text()),
                             "predictions": {k: npz[k] for k in npz.files}})
        else:
            reason = failures.get(entry["name"]) or f"no {metrics_path.name} in {run.root} (still running, or failed: see its log)"
            missing.append({**entry, "reason": reason})
    return done, missing


def _value(v):
    return v["value"] if isinstance(v, dict) and "value" in v else v


def fold_spread(done: list[dict]) -> dict[str, dict]:
    """{metric: {mean, sd, min, max, folds}} over the finished folds (sd with ddof=1; NaN values left out)."""
    keys = sorted({k for f in done for k, v in f["metrics"].items() if isinstance(_value(v), float)})
    out = {}
    for key in keys:
        values = np.array([_value(f["metrics"].get(key, math.nan)) for f in done], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size:
            out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                        "min": float(values.min()), "max": float(values.max()), "folds": int(values.size)}
    return out


def pooled_metrics(done: list[dict], classes: list[str], resamples: int, seed: int,
                   confidence: float) -> dict:
    """Metrics of the pooled out-of-fold predictions of `done` (one repeat): {metrics, intervals, counts}."""
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
            per_fold = np.array([float(_value(f["metrics"][f"{level}/threshold"])) for f in done])
            threshold = per_fold[fold_of_patient[patient]]
        for name, values in resampled_metrics(probs, labels, patient, weights, classes, threshold).items():
            metrics[f"{level}/{name}"] = float(values[0])
            if resamples:
                intervals[f"{level}/{name}"] = percentile_interval(values[1:], confidence)
        metrics[f"{level}/n"] = int(len(labels))
    return {"metrics": metrics, "intervals": intervals, "counts": split_counts(arrays, classes, False),
            "folds": [f["name"] for f in done]}


def site_folds(done: list[dict], recording_sites: np.ndarray) -> dict[str, list[dict]]:
    """{site: the finished folds' predictions restricted to that site's recordings} (folds without it left out)."""
    out: dict[str, list[dict]] = {}
    for f in done:
        site_of = recording_sites[f["predictions"]["recording"].astype(np.int64)]
        for site in sorted(set(site_of) - {""}):
            keep = site_of == site
            out.setdefault(site, []).append({**f, "predictions": {k: v[keep] for k, v in f["predictions"].items()}})
    return out


def per_site(done: list[dict], plan: dict, cfg) -> tuple[dict, str]:
    """({site: pooled_metrics of its out-of-fold predictions}, the class-mix warning or ''), first repeat only."""
    from vascdist.data.shards import load_index
    from vascdist.eval.sites import confound_warning, recording_sites
    index = load_index(plan["shards"])
    first = [f for f in done if f["repeat"] == 0]
    sites = {site: pooled_metrics(members, plan["classes"], cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed,
                                  cfg.eval.confidence)
             for site, members in site_folds(first, recording_sites(index)).items()}
    warning = confound_warning({site: s["counts"]["recordings"] for site, s in sites.items()})
    return sites, warning


def aggregate(cv_dir: str | Path) -> dict:
    """Everything `vascdist cv --report` prints, as data; also written to CV_DIR/aggregate.json."""
    from vascdist.config import load_config
    cv_dir = Path(cv_dir)
    plan = load_plan(cv_dir)
    done, missing = fold_status(cv_dir, plan)
    cfg = load_config(plan["config"], plan["overrides"])
    result = {"cv_dir": str(cv_dir), "group_by": plan.get("group_by", "patient"), "folds": plan["folds"],
              "repeats": plan["repeats"], "seed": plan["seed"],
              "classes": plan["classes"], "finished": [f["name"] for f in done],
              "missing": {f["name"]: f["reason"] for f in missing}, "per_fold": {}, "spread": {}, "pooled": {}}
    for f in done:
        result["per_fold"][f["name"]] = {k: _value(v) for k, v in f["metrics"].items() if isinstance(_value(v), float)}
    result["spread"] = fold_spread(done)
    for repeat in range(plan["repeats"]):
        members = [f for f in done if f["repeat"] == repeat]
        if not members:
            continue
        pooled = pooled_metrics(members, plan["classes"], cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed,
                                cfg.eval.confidence)
        pooled["complete"] = len(members) == plan["folds"]
        result["pooled"][str(repeat)] = pooled
    result["sites"], result["site_warning"] = per_site(done, plan, cfg) if done else ({}, "")
    result["confidence"] = cfg.eval.confidence
    from vascdist.fileio import atomic_write_json
    atomic_write_json(CvLayout(cv_dir).aggregate, result)
    return result


def format_aggregate(result: dict) -> str:
    """The text report: folds finished / missing, per-fold rows, mean and spread, per-site rows with intervals,
    pooled table with intervals."""
    classes = result["classes"]
    level = "recording" if any(k.startswith("recording/") for r in result["per_fold"].values() for k in r) else "cycle"
    names = ["balanced_accuracy", "sensitivity", "specificity", "auroc", "auprc", "ece"] if len(classes) == 2 \
        else ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "ece"]
    total = result["folds"] * result["repeats"]
    by_site = result.get("group_by") == "site"
    kind = f"leave-one-site-out over {result['folds']} sites" if by_site else \
        f"{result['folds']} folds x {result['repeats']} repeat(s), seed {result['seed']}"
    lines = [f"cross-validation: {kind}: {len(result['finished'])} of {total} folds finished ({result['cv_dir']})"]
    for name, reason in result["missing"].items():
        lines.append(f"  MISSING {name}: {reason}")
    held_out = "the held-out site" if by_site else "the held-out fold"
    lines.append(f"per fold, {level} level (test = {held_out}; thresholds from each fold's validation):")
    width = max([12] + [len(f) + 2 for f in result["per_fold"]])
    lines.append(f"{'fold':<{width}}" + "".join(f"{n:>19}" for n in names))
    fmt = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.3f}"
    for fold, metrics in result["per_fold"].items():
        lines.append(f"{fold:<{width}}" + "".join(f"{fmt(metrics.get(f'{level}/{n}', math.nan)):>19}" for n in names))
    spread = result["spread"]
    if spread:
        cells = []
        for n in names:
            s = spread.get(f"{level}/{n}")
            cells.append("n/a" if s is None else f"{s['mean']:.3f} ± {fmt(s['sd'])}")
        count = max((spread[k]["folds"] for k in spread), default=0)
        over = "sites" if by_site else "finished folds"
        lines.append(f"{'mean ± sd':<{width}}" + "".join(f"{c:>19}" for c in cells) + f"   (over {count} {over})")
    if result.get("sites"):
        lines.append("")
        lines.append(format_site_rows(result, level, names))
    if result.get("site_warning"):
        lines.append(result["site_warning"])
    for repeat, pooled in result["pooled"].items():
        note = "" if pooled["complete"] else f" -- INCOMPLETE: only {', '.join(pooled['folds'])}"
        what = "out-of-site" if by_site else "out-of-fold"
        lines.append(f"\npooled {what} predictions, repeat {repeat}{note}:")
        lines.append(format_table(pooled["metrics"], classes, pooled["intervals"], pooled["counts"],
                                  result.get("confidence", 0.95)))
    return "\n".join(lines)


def format_site_rows(result: dict, level: str, names: list[str]) -> str:
    """Per site: n per class and each metric as value [lo-hi] (pooled predictions of that site's patients)."""
    from vascdist.eval.assess import format_value
    by_site = result.get("group_by") == "site"
    what = "tested when held out (out-of-site)" if by_site else "out-of-fold predictions of its patients"
    lines = [f"per site, {level} level, {what} [{100 * result.get('confidence', 0.95):.0f} % interval: bootstrap "
             "over the site's patients]:"]
    width = max(16, *(len(s) + 2 for s in result["sites"]))
    lines.append(f"{'site':<{width}}{'n (per class)':>16}" + "".join(f"{n:>19}" for n in names))
    unit = "recordings" if level == "recording" else "cycles"
    for site, pooled in result["sites"].items():
        counts = " / ".join(str(v) for v in pooled["counts"].get(unit, {}).values())
        cells = [format_value(pooled["metrics"].get(f"{level}/{n}"), pooled["intervals"].get(f"{level}/{n}"))
                 for n in names]
        lines.append(f"{site:<{width}}{counts:>16}" + "".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)
