"""Aggregating a cross-validation directory: per-fold metrics, their mean and spread, and the metrics of the
pooled out-of-fold predictions with a patient-bootstrap interval.

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
from vascdist.train.layout import RunLayout

PLAN = "cv.json"
FAILURES = "failures.json"


def load_plan(cv_dir: str | Path) -> dict:
    path = Path(cv_dir) / PLAN
    if not path.is_file():
        raise VascdistError(f"{cv_dir}: no {PLAN} (not a directory made by `vascdist cv`)")
    return json.loads(path.read_text())


def fold_status(cv_dir: Path, plan: dict) -> tuple[list[dict], list[dict]]:
    """(finished folds with their metrics and predictions, missing folds with a reason)."""
    failures = json.loads((cv_dir / FAILURES).read_text()) if (cv_dir / FAILURES).is_file() else {}
    done, missing = [], []
    for entry in plan["entries"]:
        run = cv_dir / entry["dir"]
        metrics_path, preds_path = RunLayout(run).test_metrics, RunLayout(run).test_predictions
        if metrics_path.is_file() and preds_path.is_file():
            with np.load(preds_path) as npz:
                done.append({**entry, "metrics": json.loads(metrics_path.read_text()),
                             "predictions": {k: npz[k] for k in npz.files}})
        else:
            reason = failures.get(entry["name"]) or f"no test_metrics.json in {run} (still running, or failed: see its log)"
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


def aggregate(cv_dir: str | Path) -> dict:
    """Everything `vascdist cv --report` prints, as data; also written to CV_DIR/aggregate.json."""
    from vascdist.config import load_config
    cv_dir = Path(cv_dir)
    plan = load_plan(cv_dir)
    done, missing = fold_status(cv_dir, plan)
    cfg = load_config(plan["config"], plan["overrides"])
    result = {"cv_dir": str(cv_dir), "folds": plan["folds"], "repeats": plan["repeats"], "seed": plan["seed"],
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
    result["confidence"] = cfg.eval.confidence
    from vascdist.fileio import atomic_write_json
    atomic_write_json(cv_dir / "aggregate.json", result)
    return result


def format_aggregate(result: dict) -> str:
    """The text report: folds finished / missing, per-fold rows, mean and spread, pooled table with intervals."""
    classes = result["classes"]
    level = "recording" if any(k.startswith("recording/") for r in result["per_fold"].values() for k in r) else "cycle"
    names = ["balanced_accuracy", "sensitivity", "specificity", "auroc", "auprc", "ece"] if len(classes) == 2 \
        else ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "ece"]
    total = result["folds"] * result["repeats"]
    lines = [f"cross-validation: {result['folds']} folds x {result['repeats']} repeat(s), seed {result['seed']}: "
             f"{len(result['finished'])} of {total} folds finished ({result['cv_dir']})"]
    for name, reason in result["missing"].items():
        lines.append(f"  MISSING {name}: {reason}")
    lines.append(f"per fold, {level} level (test = the held-out fold; thresholds from each fold's validation):")
    lines.append(f"{'fold':<12}" + "".join(f"{n:>19}" for n in names))
    fmt = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.3f}"
    for fold, metrics in result["per_fold"].items():
        lines.append(f"{fold:<12}" + "".join(f"{fmt(metrics.get(f'{level}/{n}', math.nan)):>19}" for n in names))
    spread = result["spread"]
    if spread:
        cells = []
        for n in names:
            s = spread.get(f"{level}/{n}")
            cells.append("n/a" if s is None else f"{s['mean']:.3f} ± {fmt(s['sd'])}")
        count = max((spread[k]["folds"] for k in spread), default=0)
        lines.append(f"{'mean ± sd':<12}" + "".join(f"{c:>19}" for c in cells) + f"   (over {count} finished folds)")
    for repeat, pooled in result["pooled"].items():
        note = "" if pooled["complete"] else f" -- INCOMPLETE: only {', '.join(pooled['folds'])}"
        lines.append(f"\npooled out-of-fold predictions, repeat {repeat}{note}:")
        lines.append(format_table(pooled["metrics"], classes, pooled["intervals"], pooled["counts"],
                                  result.get("confidence", 0.95)))
    return "\n".join(lines)
