"""The vectorised patient bootstrap (vascdist.eval.bootstrap) against a plain loop over resamples that
rebuilds each resampled data set and calls metrics.classification_metrics on it."""

from __future__ import annotations

import numpy as np
import pytest

from vascdist.eval import bootstrap, metrics


def _patients(seed: int, n_patients: int, c: int) -> tuple[np.ndarray, ...]:
    """Cycles of 2-3 recordings per patient, each patient with one label, an informative imperfect classifier;
    scores rounded to 2 decimals so that ties occur."""
    rng = np.random.default_rng(seed)
    probs, labels, recs, pats = [], [], [], []
    rec = 0
    for p in range(n_patients):
        label = p % c
        for _ in range(rng.integers(2, 4)):
            n = rng.integers(3, 8)
            x = rng.dirichlet(np.ones(c), n)
            x[:, label] += rng.uniform(0, 0.5)
            x = np.round(x / x.sum(axis=1, keepdims=True), 2)
            x[:, -1] = 1 - x[:, :-1].sum(axis=1)
            probs.append(x)
            labels += [label] * n
            recs += [rec] * n
            pats += [100 + 3 * p] * n  # ids need not be 0..P-1
            rec += 1
    return np.concatenate(probs), np.array(labels), np.array(recs), np.array(pats)


def _reference(items, weights, names, threshold):
    """One classification_metrics call per resample, on the items repeated as often as their patient is drawn."""
    probs, labels, patient = items
    rows = []
    for w in weights.astype(int):
        repeat = w[patient]
        rows.append(metrics.classification_metrics(np.repeat(probs, repeat, axis=0), np.repeat(labels, repeat),
                                                   names, threshold))
    return rows


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("level", ["cycle", "recording", "patient"])
def test_vectorised_bootstrap_equals_a_loop_over_resamples(c, level):
    names = ["normal", "stenosis"] if c == 2 else ["a", "b", "c"]
    probs, labels, recs, pats = _patients(c, 14, c)
    items, n_patients = bootstrap.level_items(probs, labels, recs, pats)
    assert n_patients == 14
    weights = bootstrap.patient_weights(n_patients, 40, seed=5)
    assert (weights.sum(axis=1) == n_patients).all()
    threshold = 0.43 if c == 2 else None
    fast = bootstrap.resampled_metrics(*items[level], weights, names, threshold)
    slow = _reference(items[level], weights, names, threshold)
    keys = [k for k, v in slow[0].items() if isinstance(v, float) and k != "threshold"]
    assert set(keys) <= set(fast) and "auroc" in "".join(keys) and "ece" in keys and "brier" in keys
    for key in keys:
        np.testing.assert_allclose(fast[key], [row[key] for row in slow], rtol=0, atol=1e-9, equal_nan=True,
                                   err_msg=f"{level}/{key}")


def test_identity_weights_give_the_point_estimate():
    probs, labels, recs, pats = _patients(1, 10, 2)
    items, n = bootstrap.level_items(probs, labels, recs, pats)
    point = metrics.evaluate_levels(probs, labels, recs, pats, ["normal", "stenosis"])
    for level in ("cycle", "recording", "patient"):
        values = bootstrap.resampled_metrics(*items[level], np.ones((1, n)), ["normal", "stenosis"],
                                             point[f"{level}/threshold"])
        for key, v in values.items():
            np.testing.assert_allclose(v[0], point[f"{level}/{key}"], atol=1e-12, equal_nan=True, err_msg=key)


def test_intervals_contain_the_value_are_seeded_and_shrink_with_more_patients():
    names = ["normal", "stenosis"]
    widths = []
    for n_patients in (12, 120):
        probs, labels, recs, pats = _patients(2, n_patients, 2)
        thresholds = {lv: 0.5 for lv in metrics.LEVELS}
        point = metrics.evaluate_levels(probs, labels, recs, pats, names, thresholds)
        ci = bootstrap.bootstrap_intervals(probs, labels, recs, pats, names, thresholds, resamples=300, seed=3)
        again = bootstrap.bootstrap_intervals(probs, labels, recs, pats, names, thresholds, resamples=300, seed=3)
        assert ci == again
        lo, hi = ci["recording/balanced_accuracy"]
        assert lo <= point["recording/balanced_accuracy"] <= hi
        widths.append(hi - lo)
        table = bootstrap.with_intervals(point, ci)
        assert set(table["patient/auroc"]) == {"value", "lo", "hi"} and table["patient/n"] == n_patients
    assert widths[1] < widths[0] / 2  # 10x the patients: about 1/sqrt(10) the width


def test_resamples_without_positives_are_left_out():
    values = np.array([np.nan, 0.2, 0.4, np.nan, 0.6])
    lo, hi = bootstrap.percentile_interval(values, 0.95)
    assert 0.2 <= lo < hi <= 0.6
    assert np.isnan(bootstrap.percentile_interval(np.full(4, np.nan), 0.95)[0])
