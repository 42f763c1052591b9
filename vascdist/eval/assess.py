"""What the loop, `vascdist evaluate` and the summary table report about one split, beyond the point metrics:
the split's size (patients / recordings / cycles per class), a bootstrap interval on every metric
(vascdist.eval.bootstrap), and the table that shows them as `0.85 [0.72-0.96]`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vascdist.config import EvalConfig
from vascdist.eval.bootstrap import bootstrap_intervals, interval_scalars, with_intervals
from vascdist.eval.calibration import (calibrate_split, calibration_caveat, calibration_fits, reliability_figure,
                                      with_temperature)
from vascdist.eval.evaluate import split_metrics
from vascdist.eval.metrics import LEVELS, level_predictions, split_counts
from vascdist.eval.thresholds import ThresholdRule
from vascdist.train.layout import RunLayout


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


def validation_metrics(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool,
                       cfg: EvalConfig) -> tuple[dict[str, np.ndarray], dict, float]:
    """Validation: (arrays after eval.calibrate, their metrics with thresholds by eval.threshold, temperature)."""
    arrays, temperature = calibrate_split(arrays, cfg.calibrate)
    metrics = split_metrics(arrays, classes, per_beat, rule=ThresholdRule.parse(cfg.threshold),
                            min_patients=cfg.min_patients_per_class)
    if cfg.calibrate != "none":
        metrics["temperature"] = temperature
    return arrays, metrics, temperature


def test_metrics(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool, thresholds: dict | None,
                 temperature: float) -> tuple[dict[str, np.ndarray], dict]:
    """Test (or any split after validation): (arrays at the validation temperature, metrics at its thresholds)."""
    arrays = with_temperature(arrays, temperature)
    metrics = split_metrics(arrays, classes, per_beat, thresholds)
    if temperature != 1.0:
        metrics["temperature"] = temperature
    return arrays, metrics


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


def assess_split(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool, metrics: dict,
                 cfg: EvalConfig, calibration_intervals: bool = False) -> dict:
    """{'intervals': {key: (lo, hi)}, 'counts': split_counts, 'calibration': calibration_metrics' values,
    'levels': level_arrays, 'record': metrics and calibration with {value, lo, hi}, counts, confidence and
    'calibration_caveat' (the JSON form)}. `calibration_intervals`: bootstrap the calibration slope and
    intercept too (a logistic fit per resample: done for the test split, not at every validation)."""
    intervals = split_intervals(arrays, classes, per_beat, metrics, cfg)
    counts = split_counts(arrays, classes, per_beat)
    levels = level_arrays(arrays, per_beat)
    calibration, calibration_bounds, caveat = calibration_metrics(arrays, per_beat, cfg, calibration_intervals)
    intervals = {**intervals, **calibration_bounds}
    record = {**with_intervals({**metrics, **calibration}, intervals), "counts": counts, "confidence": cfg.confidence}
    if calibration:
        record["calibration_caveat"] = caveat
    return {"intervals": intervals, "counts": counts, "calibration": calibration, "levels": levels, "record": record}


def calibration_note(record: dict, level: str) -> str:
    """'slope 0.92 [0.70-1.15], intercept -0.10 [...]' of a record's level, or the caveat that omits them."""
    if f"{level}/calibration_slope" not in record:
        return ""
    if record.get("calibration_caveat"):
        return f"slope, intercept {record['calibration_caveat']}"
    cell = lambda key: format_value(*_value_interval(record.get(f"{level}/{key}")))
    return f"slope {cell('calibration_slope')}, intercept {cell('calibration_intercept')}"


def _value_interval(v) -> tuple:
    """(value, (lo, hi) or None) of a record entry ({value, lo, hi} or a bare value)."""
    return (v["value"], (v["lo"], v["hi"])) if isinstance(v, dict) else (v, None)


def reliability_image(levels: dict[str, tuple[np.ndarray, np.ndarray]], record: dict, title: str):
    """The reliability diagram (a matplotlib Figure) of {level: (probs, labels)}, each panel noting the record's
    ECE, Brier and calibration slope and intercept (or why they are omitted)."""
    notes = {}
    for level in levels:
        ece, brier = (_value_interval(record.get(f"{level}/{k}", float("nan")))[0] for k in ("ece", "brier"))
        notes[level] = f"ECE {format_value(ece)}, Brier {format_value(brier)}"
        slope = calibration_note(record, level)
        if slope:
            notes[level] += "\n" + slope
    return reliability_figure(levels, title, notes)


def log_split(log, step: int, split: str, arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool,
              metrics: dict, cfg: EvalConfig, save_dir=None, checkpoint_step: int | None = None, **fields) -> dict:
    """Assess a split and log it: TensorBoard scalars '<split>/<key>' (value) and '<split>/<key>/lo|hi', the
    calibration scalars, the image '<split>/reliability', and one metrics.jsonl record with {value, lo, hi} per
    metric. With `save_dir` (the main rank's run directory) also <split>_reliability.png and the predictions,
    <split>_predictions.npz (probs, y, recording, patient; what `vascdist cv` pools and the report plots), and
    the calibration intervals. `checkpoint_step`: the step of the weights that made the predictions when it is
    not `step` (the test of the best checkpoint); it is recorded and named in the figure's title.
    Returns assess_split's result."""
    from vascdist import plots
    assessed = assess_split(arrays, classes, per_beat, metrics, cfg, calibration_intervals=save_dir is not None)
    drawn_at = step if checkpoint_step is None else checkpoint_step
    if checkpoint_step is not None:
        assessed["record"]["checkpoint_step"] = checkpoint_step
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    scalars.update(interval_scalars(metrics, assessed["intervals"]))
    scalars.update(assessed["calibration"])
    log.scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
    if log.active or save_dir is not None:
        what = "best checkpoint, " if checkpoint_step is not None else ""
        figure = reliability_image(assessed["levels"], assessed["record"],
                                   f"{split}: reliability ({what}step {drawn_at})")
        log.image(f"{split}/reliability", step, plots.rgb_array(figure))
        if save_dir is not None:
            layout = RunLayout(save_dir)
            plots.save_png(figure, layout.reliability(split))
            save_predictions(layout.predictions(split), arrays)
    log.jsonl({"step": step, **fields, "split": split, **assessed["record"]})
    return assessed


# --------------------------------------------------------------------------------------------- the table
def format_value(value, interval: tuple[float, float] | None = None) -> str:
    """'0.85 [0.72-0.96]', '0.85' without an interval, 'n/a' for NaN / None, integers as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if interval is None or any(math.isnan(b) for b in interval):
        return f"{value:.2f}"
    return f"{value:.2f} [{interval[0]:.2f}-{interval[1]:.2f}]"


def table_rows(classes: list[str]) -> list[str]:
    """The metrics the summary table shows, one row each."""
    if len(classes) == 2:
        return ["balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc", "ece",
                "brier", "n"]
    per_class = [f"{m}/{c}" for c in classes for m in ("sensitivity", "ppv")]
    return ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "macro_auprc", "ece", "brier", *per_class, "n"]


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    """'12 patients (7 normal / 5 stenosis), 35 recordings (20 / 15), 1234 cycles (700 / 534)'."""
    parts = []
    for i, (unit, per_class) in enumerate(counts.items()):
        split = " / ".join(f"{n} {c}" if i == 0 else str(n) for c, n in per_class.items())
        parts.append(f"{sum(per_class.values())} {unit} ({split})")
    return ", ".join(parts)


def describe_excluded(metrics: dict) -> str:
    """'excluded in preprocessing: 2 recordings, 1 patient' (data.shards.excluded_counts: left out of the split,
    with no prediction; the reasons are in the metrics JSON); '' when the metrics do not count them."""
    if "recording/excluded" not in metrics:
        return ""
    return (f"excluded in preprocessing: {metrics['recording/excluded']} recordings, "
            f"{metrics.get('patient/excluded', 0)} patients")


def split_summary(split: str, classes: list[str], best_step: int, metrics: dict, intervals: dict | None,
                  counts: dict | None, confidence: float) -> str:
    """A split's header line and its table: what `vascdist train` prints for test and `vascdist evaluate` for any
    split (validation's thresholds are its own; every other split's come from validation)."""
    source = "this set" if split == "val" else "validation"
    return "\n".join([f"{split} set ({', '.join(classes)}), thresholds chosen on {source}; best step {best_step}",
                      format_table(metrics, classes, intervals, counts, confidence)])


def format_table(metrics: dict, classes: list[str], intervals: dict | None = None, counts: dict | None = None,
                 confidence: float = 0.95) -> str:
    """Metrics as rows, levels as columns, each cell `value [lo-hi]`."""
    intervals = intervals or {}
    levels = [lv for lv in LEVELS if f"{lv}/accuracy" in metrics]
    lines = []
    excluded = describe_excluded(metrics)
    if counts:
        lines.append(f"n = {describe_counts(counts)}" + (f"; {excluded}" if excluded else ""))
    elif excluded:
        lines.append(excluded)
    if intervals:
        lines.append(f"[{100 * confidence:.0f} % interval: bootstrap over patients]")
    width = max(len(r) for r in table_rows(classes)) + 2
    lines.append(f"{'':<{width}}" + "".join(f"{lv:>20}" for lv in levels))
    rows = table_rows(classes)
    if any(f"{lv}/calibration_slope" in metrics for lv in levels):
        rows = rows[:-1] + ["calibration_slope", "calibration_intercept", rows[-1]]
    if any(f"{lv}/threshold" in metrics for lv in levels):
        rows = rows + ["threshold"]
    for row in rows:
        cells = [format_value(metrics.get(f"{lv}/{row}"), intervals.get(f"{lv}/{row}")) for lv in levels]
        lines.append(f"{row:<{width}}" + "".join(f"{c:>20}" for c in cells))
    if "threshold_rule" in metrics:
        lines.append(f"threshold rule: {metrics['threshold_rule']}")
    if "temperature" in metrics:
        lines.append(f"temperature scaling: T = {metrics['temperature']:.3f} (fitted on validation)")
    return "\n".join(lines)
