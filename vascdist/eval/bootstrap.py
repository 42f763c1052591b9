"""95 % confidence intervals for every metric of vascdist.eval.metrics, from a bootstrap over PATIENTS.

Cycles and recordings of one patient are not independent, so a resample draws patients with replacement
(all their recordings and cycles come along) and the metric of each level is recomputed on the resample;
the interval is the (alpha/2, 1 - alpha/2) percentile of the resampled values (NaN resamples, e.g. one
without a positive patient, are left out). The thresholds stay those of the point estimate.

Vectorised: a resample is a row of per-patient multiplicities W[b, p]. Every counting metric is a function of
confusion counts, ECE bin sums and Brier sums, each a sum over patients, so a resample's counts are W @
(per-patient counts) in one matrix product. AUROC and AUPRC are sums over the runs of tied scores of the
(weighted) positives and negatives in each run: the items are sorted once and a block of resamples is
reduced over those runs at once (tests/test_bootstrap.py checks it against a plain loop over resamples).
"""

from __future__ import annotations

import numpy as np

from vascdist.errors import VascdistError
from vascdist.eval.metrics import ECE_BINS, _patient_of_recording, aggregate_by_group, brier_terms

_BLOCK = 128  # resamples reduced together over the sorted items (memory: _BLOCK x items float32)


def patient_weights(n_patients: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_patients] multiplicities: each row draws n_patients patients with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, (resamples, n_patients))
    flat = draws + n_patients * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n_patients).reshape(resamples, n_patients).astype(np.float64)


def level_items(probs: np.ndarray, labels: np.ndarray, recording_ids: np.ndarray,
                patient_ids: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    """{level: (probs, labels, patient index of each item)} and the number of patients.

    The levels are those of metrics.level_predictions (recordings: mean over cycles; patients: mean over
    recordings); the patient index is in [0, n_patients) in ascending patient-id order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    recording_ids = np.asarray(recording_ids).astype(np.int64)
    pat_ids, cycle_patient = np.unique(np.asarray(patient_ids).astype(np.int64), return_inverse=True)
    rec_probs, rec_labels, rec_ids = aggregate_by_group(probs, labels, recording_ids)
    rec_patient = np.searchsorted(pat_ids, _patient_of_recording(recording_ids, np.asarray(patient_ids), rec_ids))
    pat_probs, pat_labels, _ = aggregate_by_group(rec_probs, rec_labels, rec_patient)
    return {"cycle": (probs, labels, cycle_patient), "recording": (rec_probs, rec_labels, rec_patient),
            "patient": (pat_probs, pat_labels, np.arange(len(pat_ids)))}, len(pat_ids)


# --------------------------------------------------------------------------------------------- per resample
def _per_patient(values: np.ndarray, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """Sums of `values` [N, K] per patient: [n_patients, K]."""
    out = np.zeros((n_patients, values.shape[1]), dtype=np.float64)
    np.add.at(out, patient, values)
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined values; NaN where none is (as metrics._nanmean)."""
    defined = ~np.isnan(values)
    return _safe_div(np.where(defined, values, 0).sum(axis=-1), defined.sum(axis=-1))


def _ranking(scores: np.ndarray, is_pos: np.ndarray, patient: np.ndarray,
             weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of every resample (rows of `weights`), ties as in scikit-learn."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, pos, item_patient = scores[order], is_pos[order], patient[order]
    run_starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]  # one run per distinct score, descending
    # Items along axis 0 (reduceat and cumsum then add whole contiguous rows); float32 holds the integer
    # multiplicities and their sums exactly (below 2^24) at half the memory traffic.
    weights_t = np.ascontiguousarray(weights.T, dtype=np.float32)  # (patients, resamples)
    auroc = np.empty(len(weights))
    ap = np.empty(len(weights))
    for b in range(0, len(weights), _BLOCK):
        w = weights_t[item_patient, b:b + _BLOCK]  # (items, block): each item weighs as its patient
        all_run = np.add.reduceat(w, run_starts, axis=0)
        w[~pos] = 0
        pos_run = np.add.reduceat(w, run_starts, axis=0).astype(np.float64)
        neg_run = all_run - pos_run
        tp, fp = np.cumsum(pos_run, axis=0), np.cumsum(neg_run, axis=0)
        n_pos, n_neg = tp[-1], fp[-1]
        # A positive in run r ranks above every negative of the later runs and ties half of run r's.
        above = (pos_run * (n_neg - fp + 0.5 * neg_run)).sum(axis=0)
        auroc[b:b + _BLOCK] = _safe_div(above, n_pos * n_neg)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)  # NaN only where pos_run is 0 too (nothing predicted yet)
        ap[b:b + _BLOCK] = _safe_div(np.nansum(pos_run * precision, axis=0), n_pos)
    return auroc, ap


def _calibration_sums(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per item: one-hot ECE bin of the confidence, confidence and correctness spread over the bins, and
    the squared error of Brier: columns [count_k (bins), conf_k (bins), correct_k (bins), brier]."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, ECE_BINS - 1)
    onehot = np.eye(ECE_BINS)[bins]
    return np.hstack([onehot, onehot * confidence[:, None], onehot * correct[:, None],
                      brier_terms(probs, labels)[:, None]])


def resampled_metrics(probs: np.ndarray, labels: np.ndarray, patient: np.ndarray, weights: np.ndarray,
                      class_names: list[str], threshold: float | None) -> dict[str, np.ndarray]:
    """Every metric of metrics.classification_metrics (and 'brier') for each resample: {name: [resamples]}.

    `patient` is each item's patient index (a column of `weights`); `threshold` as in classification_metrics.
    """
    c = len(class_names)
    n_patients = weights.shape[1]
    preds = (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64) if c == 2 \
        else probs.argmax(axis=1)
    cells = np.eye(c * c)[labels * c + preds]  # one-hot (true, pred) cell per item
    cm = (weights @ _per_patient(cells, patient, n_patients)).reshape(len(weights), c, c)
    tp, support, predicted = np.einsum("bkk->bk", cm), cm.sum(axis=2), cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))
    recall, precision = _safe_div(tp, support), _safe_div(tp, predicted)
    f1 = _safe_div(2 * tp, support + predicted)
    tn = total[:, None] - support - predicted + tp
    specificity, npv = _safe_div(tn, total[:, None] - support), _safe_div(tn, total[:, None] - predicted)

    sums = weights @ _per_patient(_calibration_sums(probs, labels), patient, n_patients)
    count, conf, correct = sums[:, :ECE_BINS], sums[:, ECE_BINS:2 * ECE_BINS], sums[:, 2 * ECE_BINS:3 * ECE_BINS]
    n = count.sum(axis=1)
    out = {"accuracy": _safe_div(tp.sum(axis=1), total), "balanced_accuracy": _nanmean_rows(recall),
           "ece": _safe_div(np.abs(correct - conf).sum(axis=1), n), "brier": _safe_div(sums[:, -1], n)}
    if c == 2:
        auroc, ap = _ranking(probs[:, 1], labels == 1, patient, weights)
        out.update({"sensitivity": recall[:, 1], "specificity": recall[:, 0], "ppv": precision[:, 1],
                    "npv": precision[:, 0], "f1": f1[:, 1], "auroc": auroc, "auprc": ap})
        return out
    ranking = [_ranking(probs[:, k], labels == k, patient, weights) for k in range(c)]
    auroc = np.stack([r[0] for r in ranking], axis=1)
    ap = np.stack([r[1] for r in ranking], axis=1)
    for name, values in (("sensitivity", recall), ("specificity", specificity), ("ppv", precision), ("npv", npv),
                         ("f1", f1), ("auroc", auroc), ("auprc", ap)):
        for k, class_name in enumerate(class_names):
            out[f"{name}/{class_name}"] = values[:, k]
    out.update({"macro_f1": _nanmean_rows(f1), "macro_auroc": _nanmean_rows(auroc), "macro_auprc": _nanmean_rows(ap)})
    return out


# --------------------------------------------------------------------------------------------- intervals
def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """(lo, hi) percentiles of the defined values; NaN, NaN when none is defined."""
    values = values[~np.isnan(values)]
    if not values.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, recording_ids: np.ndarray, patient_ids: np.ndarray,
                        class_names: list[str], thresholds: dict[str, float] | None, resamples: int = 1000,
                        seed: int = 0, confidence: float = 0.95,
                        levels: tuple[str, ...] = ("cycle", "recording", "patient")) -> dict[str, tuple[float, float]]:
    """{'<level>/<metric>': (lo, hi)} for every metric at every level, from `resamples` patient resamples.

    `thresholds` is {level: threshold} (binary) or None (multi-class). The same resampled patients serve
    every level and metric, so intervals of one split are comparable with each other.
    """
    if resamples < 1:
        raise VascdistError(f"bootstrap: resamples must be >= 1, got {resamples}")
    items, n_patients = level_items(probs, labels, recording_ids, patient_ids)
    weights = patient_weights(n_patients, resamples, seed)
    out = {}
    for level in levels:
        level_probs, level_labels, patient = items[level]
        threshold = None if thresholds is None else float(thresholds[level])
        for name, values in resampled_metrics(level_probs, level_labels, patient, weights, class_names,
                                              threshold).items():
            out[f"{level}/{name}"] = percentile_interval(values, confidence)
    return out


def with_intervals(metrics: dict, intervals: dict[str, tuple[float, float]]) -> dict:
    """The metrics dict with every value that has an interval as {value, lo, hi} (the JSON / jsonl form)."""
    return {k: ({"value": v, "lo": intervals[k][0], "hi": intervals[k][1]} if k in intervals else v)
            for k, v in metrics.items()}
