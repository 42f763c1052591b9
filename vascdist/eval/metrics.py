"""Evaluation metrics in plain numpy, at cycle, recording and patient level.

Everything here takes numpy arrays that the caller has already gathered from all ranks; nothing imports
torch or torch.distributed. The point metrics come from scikit-learn where it has them (confusion_matrix,
roc_auc_score, average_precision_score); the recording / patient aggregation, ECE and the threshold rule are
ours. Their 95 % intervals are in vascdist.eval.bootstrap.

Conventions (the same everywhere in this module):
- ``probs`` is [N, C] class probabilities (rows sum to 1), ``labels`` is [N] ints in [0, C).
- Binary (C == 2): class 1 is the positive class (stenosis); a sample is predicted positive iff
  ``probs[:, 1] >= threshold``. Multi-class (C > 2): the prediction is the argmax.
- An undefined value is NaN, never an exception: PPV with no positive predictions, sensitivity with no
  positives, AUROC/AUPRC with only one class present, F1 when 2*TP + FP + FN == 0. Macro averages and
  balanced accuracy average over the classes whose value is defined (NaN only if none is), like
  scikit-learn with ``zero_division=np.nan``.
- ECE (expected calibration error) is computed on the confidence of the argmax prediction (the max
  probability) in 15 equal-width bins over [0, 1], bin k holding confidences in (k/15, (k+1)/15]
  (a confidence of exactly 0 goes to bin 0): ECE = sum_k n_k / N * |accuracy_k - mean confidence_k|.
  It measures the calibration of the probabilities themselves, so it ignores the binary threshold.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from vascdist.errors import VascdistError

LEVELS = ("cycle", "recording", "patient")
ECE_BINS = 15


# --------------------------------------------------------------------------------------------- checks
def _check_inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise VascdistError(f"metrics: probs must be [N, C] with C >= 2, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise VascdistError(f"metrics: labels must be [{probs.shape[0]}] to match probs, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise VascdistError(f"metrics: labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    return probs, labels


def _div(num: float, den: float) -> float:
    """num / den, NaN when den == 0 (an undefined rate, not an error)."""
    return float(num) / float(den) if den else float("nan")


def _nanmean(values: np.ndarray) -> float:
    """Mean of the defined (non-NaN) values; NaN if there are none (without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


# --------------------------------------------------------------------------------------------- building blocks
def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C] with rows = true class and columns = predicted class."""
    return skm.confusion_matrix(np.asarray(labels).astype(np.int64), np.asarray(preds).astype(np.int64),
                                labels=np.arange(num_classes))


def _auroc(scores: np.ndarray, is_pos: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn; a tie between a positive and a negative counts one half).
    NaN when only one class is present."""
    if is_pos.all() or not is_pos.any():
        return float("nan")
    return float(skm.roc_auc_score(is_pos, scores))


def _average_precision(scores: np.ndarray, is_pos: np.ndarray) -> float:
    """Average precision, AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn); tied scores
    form one threshold. NaN when there is no positive."""
    if not is_pos.any():
        return float("nan")
    return float(skm.average_precision_score(is_pos, scores))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the argmax prediction over ``n_bins`` equal-width confidence bins (see the module docstring)."""
    probs, labels = _check_inputs(probs, labels)
    if labels.size == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side='left' puts a confidence equal to an upper edge into the bin below: bins are (lo, hi].
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    sum_conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
    # n_k/N * |acc_k - conf_k| == |sum_correct_k - sum_conf_k| / N; empty bins contribute 0.
    return float(np.abs(sum_correct - sum_conf).sum() / labels.size)


def brier_terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-item Brier term: (P(class 1) - y)^2 for 2 classes, sum_k (p_k - [y == k])^2 for more."""
    onehot = np.eye(probs.shape[1])[labels]
    if probs.shape[1] == 2:
        return (probs[:, 1] - onehot[:, 1]) ** 2
    return ((probs - onehot) ** 2).sum(axis=1)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean Brier term (brier_terms); NaN for no samples."""
    probs, labels = _check_inputs(probs, labels)
    return float(brier_terms(probs, labels).mean()) if labels.size else float("nan")


def youden_threshold(pos_scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold on P(class 1) maximising Youden's J = sensitivity + specificity - 1 (binary labels).

    Candidates are the distinct scores themselves (predict positive iff score >= threshold), the same
    candidates as scikit-learn's roc_curve without its '+inf, predict nothing' point (whose J is 0, which
    the lowest score also reaches). Rule for ties in J: the highest threshold wins (the first maximum of
    roc_curve's descending thresholds), i.e. the most conservative cut-off among equally good ones.
    With only one class present J is undefined and 0.5 is returned.
    """
    scores = np.asarray(pos_scores, dtype=np.float64)
    is_pos = np.asarray(labels).astype(np.int64) == 1
    if scores.shape != is_pos.shape or scores.ndim != 1:
        raise VascdistError(f"youden_threshold: scores {scores.shape} and labels {is_pos.shape} must be equal 1-D")
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]  # end of each tie run
    tp = np.cumsum(is_pos[order])[last]
    fp = (last + 1) - tp
    j = tp / n_pos - fp / n_neg
    return float(sorted_scores[last][int(np.argmax(j))])


# --------------------------------------------------------------------------------------------- metric sets
def _per_class_rates(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recall (sensitivity), precision (PPV) and F1 per class from a confusion matrix; NaN where undefined."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    recall = np.array([_div(t, s) for t, s in zip(tp, support)])
    precision = np.array([_div(t, p) for t, p in zip(tp, predicted)])
    # F1 = 2TP / (2TP + FP + FN): defined (0) even when precision is not, as in scikit-learn.
    f1 = np.array([_div(2 * t, s + p) for t, s, p in zip(tp, support, predicted)])
    return recall, precision, f1


def _one_vs_rest_negatives(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Specificity TN / (TN + FP) and NPV TN / (TN + FN) of each class against the rest; NaN where undefined."""
    total = cm.sum()
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    tn = total - support - predicted + tp
    specificity = np.array([_div(n, total - s) for n, s in zip(tn, support)])
    npv = np.array([_div(n, total - p) for n, p in zip(tn, predicted)])
    return specificity, npv


def _binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | list]:
    scores = probs[:, 1]
    preds = (scores >= threshold).astype(np.int64)
    cm = confusion_matrix(labels, preds, 2)
    recall, precision, f1 = _per_class_rates(cm)
    is_pos = labels == 1
    return {
        "accuracy": _div(np.trace(cm), labels.size),
        "balanced_accuracy": _nanmean(recall),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "ppv": float(precision[1]),
        "npv": float(precision[0]),
        "f1": float(f1[1]),
        "auroc": _auroc(scores, is_pos),
        "auprc": _average_precision(scores, is_pos),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "confusion": cm.tolist(),
        "n": int(labels.size),
        "threshold": float(threshold),
    }


def _multiclass_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float | list]:
    cm = confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
    recall, precision, f1 = _per_class_rates(cm)
    specificity, npv = _one_vs_rest_negatives(cm)
    auroc = np.array([_auroc(probs[:, k], labels == k) for k in range(probs.shape[1])])
    auprc = np.array([_average_precision(probs[:, k], labels == k) for k in range(probs.shape[1])])
    out: dict[str, float | list] = {
        "accuracy": _div(np.trace(cm), labels.size),
        "balanced_accuracy": _nanmean(recall),
    }
    for name, values in (("sensitivity", recall), ("specificity", specificity), ("ppv", precision), ("npv", npv),
                         ("f1", f1), ("auroc", auroc), ("auprc", auprc)):
        for class_name, value in zip(class_names, values):
            out[f"{name}/{class_name}"] = float(value)
    out.update({
        "macro_f1": _nanmean(f1),
        "macro_auroc": _nanmean(auroc),
        "macro_auprc": _nanmean(auprc),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "confusion": cm.tolist(),
        "n": int(labels.size),
    })
    return out


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                           threshold: float | None = None) -> dict[str, float | list]:
    """All metrics of one set of predictions (see the module docstring for conventions).

    Binary: accuracy, balanced_accuracy, sensitivity, specificity, ppv, npv, f1, auroc, auprc, ece, brier,
    confusion, n, threshold (default 0.5). Multi-class: accuracy, balanced_accuracy, per-class
    'sensitivity/<name>', 'specificity/<name>', 'ppv/<name>', 'npv/<name>' (one-vs-rest), 'f1/<name>',
    'auroc/<name>' (one-vs-rest), 'auprc/<name>',
    macro_f1, macro_auroc, macro_auprc, ece, brier, confusion, n; a threshold is an error there.
    """
    probs, labels = _check_inputs(probs, labels)
    if len(class_names) != probs.shape[1]:
        raise VascdistError(f"metrics: {len(class_names)} class names {class_names} "
                            f"for {probs.shape[1]} columns of probs")
    if probs.shape[1] == 2:
        return _binary_metrics(probs, labels, 0.5 if threshold is None else float(threshold))
    if threshold is not None:
        raise VascdistError(f"metrics: a threshold ({threshold}) only applies to 2 classes, got {probs.shape[1]}")
    return _multiclass_metrics(probs, labels, class_names)


# --------------------------------------------------------------------------------------------- levels
def aggregate_by_group(probs: np.ndarray, labels: np.ndarray,
                       groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probability and max label per group; returns (probs_g [G, C], labels_g [G], group_ids [G]).

    Groups come out in ascending id order. A group with mixed labels takes the largest label: with
    'normal' = 0 and 'stenosis' = 1, a stenosis anywhere makes the recording / patient positive.
    """
    probs, labels = _check_inputs(probs, labels)
    groups = np.asarray(groups).astype(np.int64)
    if groups.shape != labels.shape:
        raise VascdistError(f"aggregate_by_group: groups {groups.shape} must match labels {labels.shape}")
    group_ids, index = np.unique(groups, return_inverse=True)
    counts = np.bincount(index, minlength=group_ids.size).astype(np.float64)
    sums = np.zeros((group_ids.size, probs.shape[1]), dtype=np.float64)
    np.add.at(sums, index, probs)
    labels_g = np.full(group_ids.size, -1, dtype=np.int64)
    np.maximum.at(labels_g, index, labels)
    return sums / counts[:, None], labels_g, group_ids


def _patient_of_recording(recording_ids: np.ndarray, patient_ids: np.ndarray, rec_g: np.ndarray) -> np.ndarray:
    """The patient of each aggregated recording; a recording split across two patients is an error."""
    pairs = np.unique(np.stack([recording_ids, patient_ids], axis=1), axis=0)
    if len(pairs) != len(rec_g):
        dup = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
        raise VascdistError(f"evaluate_levels: recording id {dup} belongs to more than one patient id")
    return pairs[:, 1]  # pairs are sorted by recording id, as rec_g is


def level_predictions(probs: np.ndarray, labels: np.ndarray, recording_ids: np.ndarray,
                      patient_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(probs, labels) at each level: cycles as given, recordings = mean over their cycles, patients =
    mean over their recordings (each recording counts once, however many cycles it has)."""
    probs, labels = _check_inputs(probs, labels)
    recording_ids = np.asarray(recording_ids).astype(np.int64)
    patient_ids = np.asarray(patient_ids).astype(np.int64)
    if recording_ids.shape != labels.shape or patient_ids.shape != labels.shape:
        raise VascdistError(f"evaluate_levels: recording_ids {recording_ids.shape} and patient_ids "
                            f"{patient_ids.shape} must both match labels {labels.shape}")
    rec_probs, rec_labels, rec_ids = aggregate_by_group(probs, labels, recording_ids)
    rec_patient = _patient_of_recording(recording_ids, patient_ids, rec_ids)
    pat_probs, pat_labels, _ = aggregate_by_group(rec_probs, rec_labels, rec_patient)
    return {"cycle": (probs, labels), "recording": (rec_probs, rec_labels), "patient": (pat_probs, pat_labels)}


def split_counts(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool) -> dict[str, dict[str, int]]:
    """{'patients' | 'recordings' | 'cycles': {class: count}} of the split the arrays hold (a patient or
    recording with several labels counts under its largest, as in aggregate_by_group)."""
    y = np.asarray(arrays["y"]).astype(np.int64)
    if per_beat:
        return {"cycles": dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))}
    levels = level_predictions(arrays["probs"], y, arrays["recording"], arrays["patient"])
    names = {"cycle": "cycles", "recording": "recordings", "patient": "patients"}
    return {names[lv]: dict(zip(classes, np.bincount(levels[lv][1], minlength=len(classes)).tolist()))
            for lv in ("patient", "recording", "cycle")}


def evaluate_levels(probs: np.ndarray, labels: np.ndarray, recording_ids: np.ndarray, patient_ids: np.ndarray,
                    class_names: list[str], threshold: dict[str, float] | None = None,
                    choose=youden_threshold) -> dict[str, float | list]:
    """Metrics at cycle, recording and patient level in one flat dict ('<level>/<metric>').

    Binary with ``threshold=None`` (validation): each level's threshold is chosen by ``choose(scores, labels)``
    (default youden_threshold; see vascdist.eval.thresholds for the others) on that level's own predictions
    and reported as '<level>/threshold'. With ``threshold`` a dict
    {level: value} (taken from validation, see thresholds_from) the values are applied unchanged (test).
    Multi-class predicts the argmax; passing a threshold there is an error.
    """
    binary = len(class_names) == 2
    if threshold is not None and not binary:
        raise VascdistError(f"evaluate_levels: thresholds only apply to 2 classes, got {len(class_names)}")
    if threshold is not None and set(LEVELS) - set(threshold):
        raise VascdistError(f"evaluate_levels: threshold dict lacks levels {sorted(set(LEVELS) - set(threshold))}")
    out: dict[str, float | list] = {}
    for level, (level_probs, level_labels) in level_predictions(probs, labels, recording_ids, patient_ids).items():
        level_threshold = None
        if binary:
            level_threshold = (choose(level_probs[:, 1], level_labels) if threshold is None
                               else float(threshold[level]))
        for key, value in classification_metrics(level_probs, level_labels, class_names, level_threshold).items():
            out[f"{level}/{key}"] = value
    return out


def thresholds_from(results: dict[str, float | list]) -> dict[str, float]:
    """The {level: threshold} dict of an evaluate_levels result, to apply unchanged to another split."""
    missing = [level for level in LEVELS if f"{level}/threshold" not in results]
    if missing:
        raise VascdistError(f"thresholds_from: no '<level>/threshold' for {missing} (multi-class results?)")
    chosen: dict = {level: float(results[f"{level}/threshold"]) for level in LEVELS}
    if "threshold_rule" in results:  # how they were chosen, for the test table
        chosen["rule"] = results["threshold_rule"]
    return chosen
