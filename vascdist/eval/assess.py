"""What the loop, `vascdist evaluate` and the report know about one split, beyond the point metrics: the split's
size (patients / recordings / cycles per class), a bootstrap interval on every metric (vascdist.eval.bootstrap) and
the calibration slope and intercept, all in one typed SplitReport (vascdist.eval.results); its text is
vascdist.eval.table's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vascdist.config import EvalConfig
from vascdist.eval.bootstrap import bootstrap_intervals
from vascdist.eval.calibration import (calibrate_split, calibration_caveat, calibration_fits, reliability_figure,
                                      with_temperature)
from vascdist.eval.evaluate import split_metrics
from vascdist.eval.metrics import LEVELS, level_predictions, split_counts
from vascdist.eval.results import SplitReport, estimates
from vascdist.eval.table import format_estimate, format_value
from vascdist.eval.thresholds import ThresholdRule


def split_intervals(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool, metrics: dict,
                    cfg: EvalConfig) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of `metrics` (a split_metrics result; its thresholds are kept); {} when
    eval.bootstrap_resamples is 0 or the split is empty."""
    if cfg.bootstrap_resamples == 0 or len(arrays["y"]) == 0:
        return {}
    levels = ("cycle",) if per_beat else LEVELS
    thresholds = {lv: metrics[f"{lv}/threshold"] for lv in levels} if len(classes) == 2 else None
    if per_beat:  # beats carry no patients: each beat is its own unit of resampling
        ids = np.arange(len(arrays["y"]))
        recording, patient = ids, ids
    else:
        recording, patient = arrays["recording"], arrays["patient"]
    return bootstrap_intervals(arrays["probs"], arrays["y"], recording, patient, classes, thresholds,
                               cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence, levels)


def save_predictions(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The split's predictions as an .npz (written atomically)."""
    from vascdist.fileio import atomic_write
    keep = {k: np.asarray(arrays[k]) for k in ("probs", "y", "recording", "patient") if k in arrays}
    atomic_write(path, lambda fh: np.savez(fh, **keep))


def validation_report(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool, cfg: EvalConfig,
                      loss: float | None = None, calibration_intervals: bool = False
                      ) -> tuple[dict[str, np.ndarray], SplitReport, float]:
    """Validation: (arrays after eval.calibrate, their report with thresholds chosen by eval.threshold, the fitted
    temperature: 1.0 without eval.calibrate). `loss`: the validation loss, carried in the report;
    `calibration_intervals` as in split_report."""
    arrays, temperature = calibrate_split(arrays, cfg.calibrate)
    metrics = split_metrics(arrays, classes, per_beat, rule=ThresholdRule.parse(cfg.threshold),
                            min_patients=cfg.min_patients_per_class)
    report = split_report("val", arrays, classes, per_beat, metrics, cfg,
                          temperature=temperature if cfg.calibrate != "none" else None, loss=loss,
                          calibration_intervals=calibration_intervals)
    return arrays, report, temperature


def applied_report(split: str, arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool,
                   thresholds: dict | None, temperature: float, cfg: EvalConfig,
                   step: int | None = None, calibration_intervals: bool = True
                   ) -> tuple[dict[str, np.ndarray], SplitReport]:
    """Test (or any split after validation): (arrays at the validation temperature, their report at its thresholds).
    `step`: the step of the weights that made the predictions; `calibration_intervals` as in split_report."""
    arrays = with_temperature(arrays, temperature)
    metrics = split_metrics(arrays, classes, per_beat, thresholds)
    report = split_report(split, arrays, classes, per_beat, metrics, cfg, temperature=None if temperature == 1.0
                          else temperature, calibration_intervals=calibration_intervals, step=step)
    return arrays, report


def level_arrays(arrays: dict[str, np.ndarray], per_beat: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{level: (probs, labels)} of the split (cycles only for beats)."""
    if per_beat:
        return {"cycle": (np.asarray(arrays["probs"]), np.asarray(arrays["y"]))}
    return level_predictions(arrays["probs"], arrays["y"], arrays["recording"], arrays["patient"])


def calibration_metrics(arrays: dict[str, np.ndarray], per_beat: bool, cfg: EvalConfig,
                        intervals: bool) -> tuple[dict[str, float], dict[str, tuple[float, float]], str]:
    """Binary only (see calibration.py): ({'<level>/calibration_slope' | '_intercept': value}, their bootstrap
    intervals over patients (only when `intervals` and the split has enough patients to show them), the caveat
    ('' or why the report omits them: too few patients)). Multi-class: ({}, {}, '')."""
    from vascdist.eval.bootstrap import level_items, patient_weights, percentile_interval
    if np.asarray(arrays["probs"]).shape[1] != 2 or len(arrays["y"]) == 0:
        return {}, {}, ""
    if per_beat:  # beats carry no patients: each beat is its own unit (as in split_intervals)
        ids = np.arange(len(arrays["y"]))
        items, n_units = {"cycle": (np.asarray(arrays["probs"]), np.asarray(arrays["y"]), ids)}, len(ids)
    else:
        items, n_units = level_items(arrays["probs"], arrays["y"], arrays["recording"], arrays["patient"])
    caveat = calibration_caveat(n_units)
    resamples = cfg.bootstrap_resamples if intervals and not caveat else 0
    weights = np.vstack([np.ones((1, n_units)), patient_weights(n_units, resamples, cfg.bootstrap_seed)])
    values, bounds = {}, {}
    for level, (probs, labels, patient) in items.items():
        slopes, intercepts = calibration_fits(probs[:, 1], labels, weights[:, patient])
        for name, fitted in (("calibration_slope", slopes), ("calibration_intercept", intercepts)):
            values[f"{level}/{name}"] = float(fitted[0])
            if resamples:
                bounds[f"{level}/{name}"] = percentile_interval(fitted[1:], cfg.confidence)
    return values, bounds, caveat


def split_report(split: str, arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool, metrics: dict,
                 cfg: EvalConfig, temperature: float | None = None, loss: float | None = None,
                 calibration_intervals: bool = False, step: int | None = None) -> SplitReport:
    """The SplitReport of `metrics` (a split_metrics result) on `arrays`: bootstrap intervals, counts per level and
    class, calibration slope and intercept (`calibration_intervals`: bootstrapped too, a logistic fit per resample:
    done for the test split, not at every validation)."""
    intervals = split_intervals(arrays, classes, per_beat, metrics, cfg)
    calibration, calibration_bounds, caveat = calibration_metrics(arrays, per_beat, cfg, calibration_intervals)
    metrics = dict(metrics)
    rule = metrics.pop("threshold_rule", None)
    confusion = {k.split("/")[0]: metrics.pop(k) for k in [k for k in metrics if k.endswith("/confusion")]}
    return SplitReport(split, list(classes), estimates(metrics, intervals), confusion,
                       split_counts(arrays, classes, per_beat), cfg.confidence, step, rule, temperature, loss,
                       estimates(calibration, calibration_bounds), caveat if calibration else None)


def calibration_note(report: SplitReport, level: str) -> str:
    """'slope 0.92 [0.70-1.15], intercept -0.10 [...]' of a report's level, or the caveat that omits them."""
    if f"{level}/calibration_slope" not in report.calibration:
        return ""
    if report.calibration_caveat:
        return f"slope, intercept {report.calibration_caveat}"
    cell = lambda key: format_estimate(report.calibration.get(f"{level}/{key}"))
    return f"slope {cell('calibration_slope')}, intercept {cell('calibration_intercept')}"


def reliability_image(levels: dict[str, tuple[np.ndarray, np.ndarray]], report: SplitReport, title: str):
    """The reliability diagram (a matplotlib Figure) of {level: (probs, labels)}, each panel noting the report's
    ECE, Brier and calibration slope and intercept (or why they are omitted)."""
    notes = {}
    for level in levels:
        ece, brier = (report.metrics[f"{level}/{k}"].value if f"{level}/{k}" in report.metrics else float("nan")
                      for k in ("ece", "brier"))
        notes[level] = f"ECE {format_value(ece)}, Brier {format_value(brier)}"
        slope = calibration_note(report, level)
        if slope:
            notes[level] += "\n" + slope
    return reliability_figure(levels, title, notes)
