"""Calibration (temperature scaling, slope and intercept, reliability diagram) and the threshold rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from helpers import run_cli
from vascdist.errors import ConfigError
from vascdist.eval import calibration
from vascdist.eval.evaluate import split_metrics
from vascdist.eval.metrics import expected_calibration_error
from vascdist.eval.thresholds import ThresholdRule
from vascdist.inference import calibrated
from vascdist.train.saved import Progress
from vascdist.train.state import CheckpointManager


def _calibrated_binary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores drawn, then labels drawn with exactly those probabilities: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 1.5, n)
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int64)
    return np.stack([1 - p, p], axis=1), y


def test_temperature_recovers_an_overconfident_scale():
    probs, y = _calibrated_binary(20000)
    over = calibration.apply_temperature(probs, 1 / 3)  # logits x 3: far too confident
    t = calibration.fit_temperature(over, y)
    assert t == pytest.approx(3.0, rel=0.05)
    fixed = calibration.apply_temperature(over, t)
    assert expected_calibration_error(fixed, y) < expected_calibration_error(over, y) / 3
    assert np.allclose(fixed.sum(axis=1), 1) and (fixed.argmax(1) == over.argmax(1)).all()  # argmax unchanged
    assert calibration.fit_temperature(over, np.zeros_like(y)) == 1.0


def test_slope_and_intercept_match_logistic_regression():
    probs, y = _calibrated_binary(5000, seed=1)
    slope, intercept = calibration.calibration_slope_intercept(probs[:, 1], y)
    assert slope == pytest.approx(1.0, abs=0.1) and intercept == pytest.approx(0.0, abs=0.1)
    over = calibration.apply_temperature(probs, 0.5)
    slope, _ = calibration.calibration_slope_intercept(over[:, 1], y)
    x = np.log(over[:, 1] / over[:, 0])[:, None]
    reference = LogisticRegression(C=np.inf).fit(x, y).coef_[0, 0]
    assert slope == pytest.approx(reference, rel=1e-4) and slope == pytest.approx(0.5, abs=0.06)
    assert all(np.isnan(calibration.calibration_slope_intercept(probs[:, 1], np.ones_like(y))))


def test_reliability_diagram_image():
    from vascdist import plots
    probs, y = _calibrated_binary(400)
    figure = calibration.reliability_figure({"recording": (probs, y), "patient": (probs[:50], y[:50])}, "val",
                                            {"recording": "ECE 0.01"})
    image = plots.rgb_array(figure)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[1] > 2 * 260
    assert (image < 128).any()  # something was drawn
    counts = [t.get_text() for ax in figure.axes for t in ax.texts]  # each bin's point carries its count
    bins = calibration.reliability_bins(probs, y)
    assert sorted(counts[:int((bins["count"] > 0).sum())]) == sorted(str(int(n)) for n in bins["count"] if n > 0)
    assert bins["count"].sum() == 400 and np.nanmax(np.abs(bins["observed"] - bins["mean_pred"])) < 0.15


def test_slope_interval_and_the_few_patients_rule():
    from vascdist.eval.bootstrap import patient_weights
    probs, y = _calibrated_binary(2000, seed=3)
    patient = np.arange(2000) // 20  # 100 patients
    slopes, intercepts = calibration.calibration_fits(probs[:, 1], y, patient_weights(100, 200, 0)[:, patient])
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    assert lo < 1.0 < hi and hi - lo < 0.6 and not np.isnan(slopes).any()
    # separable by the score: no finite slope, NaN rather than a huge number
    assert np.isnan(calibration.calibration_slope_intercept(np.array([.1, .2, .8, .9]), np.array([0, 0, 1, 1]))[0])
    assert calibration.calibration_caveat(12) == f"omitted: 12 patients < {calibration.CALIBRATION_MIN_PATIENTS}"
    assert calibration.calibration_caveat(calibration.CALIBRATION_MIN_PATIENTS) == ""


@pytest.mark.parametrize("patients,shown", [(40, True), (12, False)])
def test_the_split_record_carries_slope_intervals_or_the_caveat(patients, shown):
    from vascdist.config import EvalConfig
    from vascdist.eval.assess import calibration_note, split_report
    probs, y = _calibrated_binary(patients * 30, seed=4)
    arrays = {"probs": probs, "y": y, "recording": np.arange(len(y)) // 10, "patient": np.arange(len(y)) // 30}
    metrics = split_metrics(arrays, ["normal", "stenosis"], False, {"cycle": .5, "recording": .5, "patient": .5})
    cfg = EvalConfig(bootstrap_resamples=200)
    report = split_report("test", arrays, ["normal", "stenosis"], False, metrics, cfg, calibration_intervals=True)
    record = report.to_record()
    slope = record["cycle/calibration_slope"]
    if shown:  # {value, lo, hi} around the value, and the note prints them
        assert record["calibration_caveat"] == "" and slope["lo"] < slope["value"] < slope["hi"]
        assert calibration_note(report, "cycle").startswith(f"slope {slope['value']:.2f} [")
    else:  # a bare value (no bootstrap spent on it) and the reason it is not shown
        assert isinstance(slope, float) and record["calibration_caveat"] == "omitted: 12 patients < 30"
        assert calibration_note(report, "patient") == "slope, intercept omitted: 12 patients < 30"


@pytest.mark.parametrize("text,kind,target", [("youden", "youden", 0.5), ("sensitivity:0.9", "sensitivity", 0.9),
                                              ("specificity:0.8", "specificity", 0.8), ("fixed", "fixed", 0.5),
                                              ("fixed:0.3", "fixed", 0.3)])
def test_threshold_rule_parsing(text, kind, target):
    rule = ThresholdRule.parse(text)
    assert (rule.kind, rule.target) == (kind, target)


@pytest.mark.parametrize("bad", ["yuoden", "sensitivity:high", "sensitivity:1.5", "youden:0.3"])
def test_bad_threshold_rule_names_the_key(bad):
    with pytest.raises(ConfigError, match="eval.threshold"):
        ThresholdRule.parse(bad)


def test_target_rules_are_the_extreme_thresholds_that_reach_the_target():
    probs, y = _calibrated_binary(500, seed=2)
    s = probs[:, 1]
    candidates = np.unique(s)
    for kind, target in (("sensitivity", 0.9), ("specificity", 0.8)):
        t = ThresholdRule(kind, target).choose(s, y)
        value = lambda cut: ((s >= cut) & (y == 1)).sum() / (y == 1).sum() if kind == "sensitivity" \
            else ((s < cut) & (y == 0)).sum() / (y == 0).sum()
        assert value(t) >= target
        neighbour = candidates[np.searchsorted(candidates, t) + (1 if kind == "sensitivity" else -1)]
        assert value(neighbour) < target  # one step further and the target is missed


def test_too_few_validation_patients_fall_back_to_half_with_a_warning(capsys):
    rng = np.random.default_rng(0)
    patient = np.repeat(np.arange(6), 10)
    y = (patient >= 4).astype(np.int64)  # 4 normal patients, 2 stenosis patients
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.1, y.size), 0, 1)
    arrays = {"probs": np.stack([1 - p, p], axis=1), "y": y, "recording": patient, "patient": patient}
    out = split_metrics(arrays, ["normal", "stenosis"], False, rule=ThresholdRule("youden"), min_patients=3)
    assert out["recording/threshold"] == 0.5 and out["patient/threshold"] == 0.5
    assert "fallback" in out["threshold_rule"] and "2 stenosis" in out["threshold_rule"]
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line on stderr, not a Python warning's two
    assert line.startswith("warning: threshold rule youden not applied") and "min_patients_per_class=3" in line
    ok = split_metrics(arrays, ["normal", "stenosis"], False, rule=ThresholdRule("youden"), min_patients=2)
    assert ok["threshold_rule"] == "youden on validation" and ok["recording/threshold"] != 0.5


def test_predict_applies_the_checkpoint_temperature():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    assert np.array_equal(calibrated(probs, Progress.from_saved({}).temperature), probs)  # runs from before calibration
    hot = calibrated(probs, Progress.from_saved({"temperature": 2.0}).temperature)
    assert hot[0, 1] == pytest.approx(np.sqrt(0.8) / (np.sqrt(0.8) + np.sqrt(0.2)), rel=1e-6)


@pytest.mark.slow
def test_training_with_temperature_and_a_sensitivity_target(shards_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "quickstart", f"data.shards={shards_dir}", "data.synth_patients=0", "data.batch_size=16",
                     "data.reader_threads=0", "model.width=0.125", "train.epochs=1", "train.max_steps=30",
                     "train.eval_every=15", "eval.calibrate=temperature", "eval.threshold=sensitivity:0.9",
                     "eval.min_patients_per_class=1", "eval.bootstrap_resamples=200", "--run-dir", str(run), "--quiet",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    state = CheckpointManager(run / "checkpoints", 1).load(run / "checkpoints" / "best.pt")
    temperature = state["progress"]["temperature"]
    assert temperature != 1.0 and 0.05 <= temperature <= 20
    assert "threshold rule: sensitivity:0.9 on validation" in result.stdout
    assert f"temperature scaling: T = {temperature:.3f}" in result.stdout
    saved = json.loads((run / "test_metrics.json").read_text())
    assert saved["temperature"] == pytest.approx(temperature) and "recording/calibration_slope" in saved
    assert (run / "test_reliability.png").exists() and (run / "test_predictions.npz").exists()
    assert not torch.is_tensor(temperature)
