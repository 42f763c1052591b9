"""vascdist.eval.metrics against scikit-learn (the aggregation, ECE and thresholds are ours; the test re-derives them)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from vascdist.errors import VascdistError
from vascdist.eval import metrics

TOL = 1e-9
SEEDS = [0, 1, 2, 3]


def _close(actual: float, expected: float) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, equal_nan=True)


def _data(seed: int, n: int, c: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [n, c] (rows sum to 1) and labels; with ties, rows repeat so every column has tied scores."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n)
    probs[np.arange(n), labels] += rng.uniform(0, 0.6, n)  # an informative, imperfect classifier
    probs /= probs.sum(axis=1, keepdims=True)
    if ties:
        # Few distinct rows, each reused many times; a third of the labels are redrawn so that tied
        # scores carry both classes.
        pick = rng.integers(0, n // 6, n)
        probs, labels = probs[pick], labels[pick]
        redraw = rng.random(n) < 1 / 3
        labels[redraw] = rng.integers(0, c, int(redraw.sum()))
    return probs, labels


def _reference_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Plain-loop ECE: bins (lo, hi] on the max probability, |accuracy - confidence| weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.3, 0.62])
def test_binary_metrics_match_sklearn(seed, ties, threshold):
    probs, labels = _data(seed, 300, 2, ties)
    out = metrics.classification_metrics(probs, labels, ["normal", "stenosis"], threshold)
    cut = 0.5 if threshold is None else threshold
    preds = (probs[:, 1] >= cut).astype(int)
    nan = np.nan
    assert out["confusion"] == skm.confusion_matrix(labels, preds, labels=[0, 1]).tolist()
    assert out["n"] == 300 and out["threshold"] == cut
    _close(out["accuracy"], skm.accuracy_score(labels, preds))
    _close(out["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))
    _close(out["sensitivity"], skm.recall_score(labels, preds, pos_label=1, zero_division=nan))
    _close(out["specificity"], skm.recall_score(labels, preds, pos_label=0, zero_division=nan))
    _close(out["ppv"], skm.precision_score(labels, preds, pos_label=1, zero_division=nan))
    _close(out["npv"], skm.precision_score(labels, preds, pos_label=0, zero_division=nan))
    _close(out["f1"], skm.f1_score(labels, preds, pos_label=1, zero_division=nan))
    _close(out["auroc"], skm.roc_auc_score(labels, probs[:, 1]))
    _close(out["auprc"], skm.average_precision_score(labels, probs[:, 1]))
    _close(out["ece"], _reference_ece(probs, labels))
    assert 0.55 < out["auroc"] < 1.0  # the fixture is informative but not perfect
    if ties:  # the fixture really has scores shared by a positive and a negative
        assert set(probs[labels == 1, 1]) & set(probs[labels == 0, 1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_multiclass_metrics_match_sklearn(seed, ties):
    names = ["normal", "mild", "moderate", "severe", "occluded"]
    probs, labels = _data(seed, 400, 5, ties)
    out = metrics.classification_metrics(probs, labels, names)
    preds = probs.argmax(axis=1)
    per_class = dict(labels=list(range(5)), average=None, zero_division=np.nan)
    onehot = label_binarize(labels, classes=list(range(5)))
    assert out["confusion"] == skm.confusion_matrix(labels, preds, labels=list(range(5))).tolist()
    _close(out["accuracy"], skm.accuracy_score(labels, preds))
    _close(out["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))
    recall = skm.recall_score(labels, preds, **per_class)
    precision = skm.precision_score(labels, preds, **per_class)
    f1 = skm.f1_score(labels, preds, **per_class)
    for k, name in enumerate(names):
        _close(out[f"sensitivity/{name}"], recall[k])
        _close(out[f"ppv/{name}"], precision[k])
        _close(out[f"f1/{name}"], f1[k])
        _close(out[f"auroc/{name}"], skm.roc_auc_score(labels == k, probs[:, k]))
        _close(out[f"auprc/{name}"], skm.average_precision_score(labels == k, probs[:, k]))
    _close(out["macro_f1"], skm.f1_score(labels, preds, average="macro", zero_division=np.nan))
    _close(out["macro_auroc"], skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    _close(out["macro_auprc"], skm.average_precision_score(onehot, probs, average="macro"))
    _close(out["ece"], _reference_ece(probs, labels))
    assert "threshold" not in out and out["n"] == 400


def test_ece_bins_are_closed_on_the_right():
    # Confidences exactly on bin edges k/15 and just inside the bin below, with mixed correctness.
    edges = np.linspace(0, 1, 16)
    conf = np.r_[edges[8:], edges[8:] - 0.01]
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.tile([0, 1], conf.size)[: conf.size]  # class 0 is the argmax: every other row is wrong
    _close(metrics.expected_calibration_error(probs, labels), _reference_ece(probs, labels))
    _close(metrics.expected_calibration_error(np.array([[0.0, 0.0]]), np.array([0])), 1.0)  # 0 goes to bin 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_undefined_values_are_nan_not_errors():
    probs, _ = _data(0, 50, 2, False)
    only_negatives = np.zeros(50, dtype=int)
    out = metrics.classification_metrics(probs, only_negatives, ["normal", "stenosis"], threshold=1.1)
    # No positives at all and no positive predictions: these rates have a zero denominator.
    for key in ("sensitivity", "ppv", "f1", "auroc", "auprc"):
        assert np.isnan(out[key]), key
    assert out["specificity"] == 1.0 and out["accuracy"] == 1.0 and out["balanced_accuracy"] == 1.0
    # A class that never occurs in 3-class data: its AUROC and recall are NaN, macro averages skip it.
    probs3, labels3 = _data(1, 90, 3, False)
    labels3[labels3 == 2] = 0
    out3 = metrics.classification_metrics(probs3, labels3, ["a", "b", "c"])
    assert np.isnan(out3["auroc/c"]) and np.isnan(out3["sensitivity/c"])
    _close(out3["macro_auroc"], np.mean([out3["auroc/a"], out3["auroc/b"]]))
    _close(out3["balanced_accuracy"], skm.balanced_accuracy_score(labels3, probs3.argmax(axis=1)))
    with pytest.raises(VascdistError, match="threshold"):
        metrics.classification_metrics(probs3, labels3, ["a", "b", "c"], threshold=0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_youden_threshold_is_roc_curve_best(seed, ties):
    probs, labels = _data(seed, 300, 2, ties)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs[:, 1], drop_intermediate=False)
    # Skip roc_curve's first point (threshold +inf, predict nothing): not a candidate, see the docstring.
    best = thresholds[1:][np.argmax((tpr - fpr)[1:])]
    chosen = metrics.youden_threshold(probs[:, 1], labels)
    assert chosen == best
    out = metrics.classification_metrics(probs, labels, ["normal", "stenosis"], chosen)
    _close(out["sensitivity"] + out["specificity"] - 1, np.max(tpr - fpr))


def test_youden_threshold_degenerate_cases():
    assert metrics.youden_threshold(np.array([0.2, 0.9]), np.array([1, 1])) == 0.5
    # Perfectly separable: the cut is the lowest positive score.
    assert metrics.youden_threshold(np.array([0.1, 0.3, 0.7, 0.8]), np.array([0, 0, 1, 1])) == 0.7


def _manual_groups(probs, labels, groups):
    ids = sorted(set(groups.tolist()))
    mean = np.array([probs[groups == g].mean(axis=0) for g in ids])
    top = np.array([labels[groups == g].max() for g in ids])
    return mean, top, np.array(ids)


def test_aggregate_by_group_matches_manual_loop():
    rng = np.random.default_rng(5)
    probs, labels = _data(5, 200, 3, False)
    groups = rng.choice([7, 3, 42, 11, 0, 19], 200)
    got = metrics.aggregate_by_group(probs, labels, groups)
    want = _manual_groups(probs, labels, groups)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=TOL)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    # Mixed labels: stenosis anywhere in the group makes the group positive.
    _, mixed, _ = metrics.aggregate_by_group(np.full((3, 2), 0.5), np.array([0, 1, 0]), np.array([4, 4, 4]))
    assert mixed.tolist() == [1]


def _levels_fixture(seed=0):
    rng = np.random.default_rng(seed)
    n_patients, recs_per_patient = 30, 3
    patient_label = rng.integers(0, 2, n_patients)
    rec_patient = np.repeat(np.arange(n_patients), recs_per_patient)
    cycles_per_rec = rng.integers(2, 9, rec_patient.size)  # unequal, so the two-stage mean matters
    recording_ids = np.repeat(np.arange(rec_patient.size) * 10 + 1, cycles_per_rec)
    patient_ids = np.repeat(rec_patient + 100, cycles_per_rec)
    labels = np.repeat(patient_label[rec_patient], cycles_per_rec)
    p1 = np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.25, labels.size), 0.01, 0.99)
    return np.stack([1 - p1, p1], axis=1), labels, recording_ids, patient_ids


def test_evaluate_levels_binary_youden_then_fixed():
    probs, labels, recording_ids, patient_ids = _levels_fixture()
    names = ["normal", "stenosis"]
    val = metrics.evaluate_levels(probs, labels, recording_ids, patient_ids, names)
    assert val["cycle/n"] == labels.size and val["recording/n"] == 90 and val["patient/n"] == 30
    rec_probs, rec_labels, rec_ids = _manual_groups(probs, labels, recording_ids)
    pat_of_rec = np.array([patient_ids[recording_ids == r][0] for r in rec_ids])
    pat_probs, pat_labels, _ = _manual_groups(rec_probs, rec_labels, pat_of_rec)
    for level, (lp, ll) in {"cycle": (probs, labels), "recording": (rec_probs, rec_labels),
                            "patient": (pat_probs, pat_labels)}.items():
        assert val[f"{level}/threshold"] == metrics.youden_threshold(lp[:, 1], ll)
        _close(val[f"{level}/auroc"], skm.roc_auc_score(ll, lp[:, 1]))
        preds = (lp[:, 1] >= val[f"{level}/threshold"]).astype(int)
        assert val[f"{level}/confusion"] == skm.confusion_matrix(ll, preds).tolist()
    # Test-time: validation's thresholds are applied unchanged, never re-chosen.
    fixed = metrics.thresholds_from(val)
    t_probs, t_labels, t_rec, t_pat = _levels_fixture(seed=1)
    test = metrics.evaluate_levels(t_probs, t_labels, t_rec, t_pat, names, threshold=fixed)
    assert {level: test[f"{level}/threshold"] for level in metrics.LEVELS} == fixed
    t_preds = (t_probs[:, 1] >= fixed["cycle"]).astype(int)
    assert test["cycle/confusion"] == skm.confusion_matrix(t_labels, t_preds).tolist()
    with pytest.raises(VascdistError, match="lacks levels"):
        metrics.evaluate_levels(t_probs, t_labels, t_rec, t_pat, names, threshold={"cycle": 0.5})


def test_evaluate_levels_multiclass_and_bad_ids():
    probs, labels = _data(2, 120, 4, False)
    recording_ids = np.arange(120) // 4
    patient_ids = recording_ids // 3
    out = metrics.evaluate_levels(probs, labels, recording_ids, patient_ids, ["a", "b", "c", "d"])
    assert "cycle/macro_auroc" in out and "patient/f1/d" in out and "recording/threshold" not in out
    assert out["recording/n"] == 30 and out["patient/n"] == 10
    patient_ids[0] = 99  # recording 0 now spans patients 0 and 99
    with pytest.raises(VascdistError, match="more than one patient"):
        metrics.evaluate_levels(probs, labels, recording_ids, patient_ids, ["a", "b", "c", "d"])


def test_confusion_image_shape_and_content(tmp_path):
    from vascdist import plots
    cm = np.array([[50, 3, 0], [4, 20, 6], [0, 0, 0]])
    figure = plots.confusion(cm, ["normal", "stenosis", "occlusion"], "val / cycle")
    assert [t.get_text() for t in figure.axes[0].texts][:2] == ["50\n94 %", "3\n6 %"]  # count and row share
    image = plots.rgb_array(figure)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert (image < 128).any() and len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # text and shading
    path = plots.save_png(figure, tmp_path / "figs" / "cm.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (image.shape[1], image.shape[0])
