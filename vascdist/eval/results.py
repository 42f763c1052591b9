"""The typed results that cross module boundaries: what one evaluated split reports (SplitReport) and what a training
run returns (RunResult). The loop and `vascdist evaluate` make them (vascdist.eval.assess); the runner, the CLI,
`vascdist cv`, the report and the TensorBoard logging read them; the text is vascdist.eval.table's, a function of them.

Metric names are '<level>/<metric>' (eval.metrics: levels cycle, recording, patient); every metric is an Estimate,
its point value with the bootstrap interval when one was computed. The JSON form (`to_record`, `from_record`) is
test_metrics.json's, eval-SPLIT.json's and a metrics.jsonl line's: a metric with an interval as {value, lo, hi}, a
bare value otherwise; NaN is written as null (fileio.json_safe) and read back as NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vascdist.eval.metrics import LEVELS

CALIBRATION = ("calibration_slope", "calibration_intercept")
EXCLUDED_KEYS = ("recording/excluded", "patient/excluded", "excluded_per_class", "excluded_recordings")
_OWN_KEYS = {"counts", "confidence", "calibration_caveat", "checkpoint_step", "threshold_rule", "temperature", "loss",
             "sites", *EXCLUDED_KEYS}


def _number(value: Any) -> Any:
    """A JSON number back: null (how NaN is written) is NaN."""
    return math.nan if value is None else value


@dataclass(frozen=True)
class Estimate:
    """One metric: its point value (an int for a count such as 'n') and, when bootstrapped, its (lo, hi) interval."""

    value: float | int
    interval: tuple[float, float] | None = None

    def to_json(self) -> Any:
        """{value, lo, hi} with an interval, the bare value without."""
        if self.interval is None:
            return self.value
        return {"value": self.value, "lo": self.interval[0], "hi": self.interval[1]}

    @classmethod
    def from_json(cls, value: Any) -> Estimate:
        if isinstance(value, dict):
            return cls(_number(value["value"]), (_number(value["lo"]), _number(value["hi"])))
        return cls(_number(value))


def estimates(values: dict[str, Any], intervals: dict[str, tuple[float, float]]) -> dict[str, Estimate]:
    """{key: Estimate} of point values and their intervals (keys without an interval get none)."""
    return {k: Estimate(v, tuple(intervals[k]) if k in intervals else None) for k, v in values.items()}


def split_estimates(metrics: dict[str, Estimate]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """({key: point value}, {key: [lo, hi]}): the form of a site row and of the CV aggregate's pooled metrics."""
    return ({k: e.value for k, e in metrics.items()},
            {k: list(e.interval) for k, e in metrics.items() if e.interval is not None})


@dataclass(frozen=True)
class Excluded:
    """What a split lost in preprocessing (data.shards.excluded_counts): recordings left out with no prediction, the
    patients left with none, their counts per class and every recording with its reason."""

    recordings: int
    patients: int
    per_class: dict[str, int]
    items: list[dict]

    @classmethod
    def from_fields(cls, fields: dict) -> Excluded:
        """From excluded_counts' result (or a metrics JSON holding its keys)."""
        return cls(int(fields["recording/excluded"]), int(fields.get("patient/excluded", 0)),
                   dict(fields.get("excluded_per_class", {})), list(fields.get("excluded_recordings", [])))

    def fields(self) -> dict:
        """The metrics-JSON entries (as excluded_counts names them)."""
        return {"recording/excluded": self.recordings, "patient/excluded": self.patients,
                "excluded_per_class": self.per_class, "excluded_recordings": self.items}


@dataclass(frozen=True)
class SiteRow:
    """One site's metrics within a split (vascdist.eval.sites): recording and patient level at the split's
    thresholds, with patient-bootstrap intervals, and its recordings per class."""

    metrics: dict[str, Estimate]
    confusion: dict[str, list[list[int]]]
    counts: dict[str, int]

    def to_json(self) -> dict:
        """{metric key: value, '<level>/confusion', 'intervals': {key: [lo, hi]}, 'counts': {class: recordings}}."""
        values, intervals = split_estimates(self.metrics)
        out = {**values, **{f"{lv}/confusion": m for lv, m in self.confusion.items()}}
        if intervals:
            out["intervals"] = intervals
        return {**out, "counts": self.counts}

    @classmethod
    def from_json(cls, entry: dict) -> SiteRow:
        intervals = entry.get("intervals", {})
        metrics, confusion = {}, {}
        for key, value in entry.items():
            if key in ("intervals", "counts"):
                continue
            if key.endswith("/confusion"):
                confusion[key.split("/")[0]] = value
            else:
                interval = intervals.get(key)
                metrics[key] = Estimate(_number(value), tuple(_number(b) for b in interval) if interval else None)
        return cls(metrics, confusion, dict(entry.get("counts", {})))


@dataclass(frozen=True)
class SplitReport:
    """Everything reported about one split: the metrics with intervals, the confusion matrices, the split's size per
    level and class, the thresholds' rule, calibration, what preprocessing excluded and the metrics per site.

    `metrics` holds '<level>/<metric>' (with '<level>/n' and '<level>/threshold'); `calibration` the calibration
    slope and intercept per level (binary only; `calibration_caveat` says why they are not shown, '' when they are).
    `step` is the step of the weights that made the predictions when it is not the step logged (the test of the
    best checkpoint); `loss` the validation loss (validation only); `sites` None when they were not computed.
    """

    split: str
    classes: list[str]
    metrics: dict[str, Estimate]
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    confidence: float = 0.95
    step: int | None = None
    threshold_rule: str | None = None
    temperature: float | None = None
    loss: float | None = None
    calibration: dict[str, Estimate] = field(default_factory=dict)
    calibration_caveat: str | None = None
    excluded: Excluded | None = None
    sites: dict[str, SiteRow] | None = None

    # ----------------------------------------------------------------------------------------- reading
    @property
    def levels(self) -> list[str]:
        """The levels this split has metrics for (cycle only for beats)."""
        return [lv for lv in LEVELS if f"{lv}/accuracy" in self.metrics]

    @property
    def has_intervals(self) -> bool:
        return any(e.interval is not None for e in self.metrics.values())

    def value(self, key: str) -> float:
        """The point value of metric `key` ('recording/auroc'); KeyError when it was not measured."""
        return self.metrics[key].value

    @property
    def thresholds(self) -> dict[str, float]:
        """{level: decision threshold} (binary tasks; empty otherwise)."""
        return {lv: float(self.value(f"{lv}/threshold")) for lv in self.levels if f"{lv}/threshold" in self.metrics}

    def threshold_state(self) -> dict:
        """The thresholds as a checkpoint keeps them (progress.val_thresholds; what evaluate_levels applies to another
        split): {level: threshold, 'rule': how they were chosen}."""
        chosen: dict = dict(self.thresholds)
        if self.threshold_rule is not None:
            chosen["rule"] = self.threshold_rule
        return chosen

    def selection_values(self) -> dict[str, float]:
        """The values train.early_stop_metric may name: every float metric, the temperature and the loss."""
        out = {k: float(e.value) for k, e in self.metrics.items() if isinstance(e.value, float)}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.loss is not None:
            out["loss"] = self.loss
        return out

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: every selection value, '<key>/lo' and '<key>/hi' where it has an interval, and the
        calibration values."""
        out = self.selection_values()
        for k, e in self.metrics.items():
            if e.interval is not None and k in out:
                out.update({f"{k}/lo": e.interval[0], f"{k}/hi": e.interval[1]})
        out.update({k: e.value for k, e in self.calibration.items()})
        return out

    def with_excluded(self, excluded: Excluded) -> SplitReport:
        return replace(self, excluded=excluded)

    def with_sites(self, sites: dict[str, SiteRow]) -> SplitReport:
        return replace(self, sites=sites)

    # ----------------------------------------------------------------------------------------- the JSON form
    def to_record(self) -> dict:
        """The JSON form: the metrics (with intervals as {value, lo, hi}), the confusion matrices, the rule and
        temperature, calibration, counts, confidence, the checkpoint step, what was excluded and the sites."""
        out: dict[str, Any] = {k: e.to_json() for k, e in self.metrics.items()}
        out.update({f"{lv}/confusion": m for lv, m in self.confusion.items()})
        optional = {"threshold_rule": self.threshold_rule, "temperature": self.temperature, "loss": self.loss}
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update({k: e.to_json() for k, e in self.calibration.items()})
        out.update({"counts": self.counts, "confidence": self.confidence})
        if self.calibration_caveat is not None:
            out["calibration_caveat"] = self.calibration_caveat
        if self.step is not None:
            out["checkpoint_step"] = self.step
        if self.excluded is not None:
            out.update(self.excluded.fields())
        if self.sites is not None:
            out["sites"] = {site: row.to_json() for site, row in self.sites.items()}
        return out

    @classmethod
    def from_record(cls, record: dict, split: str, classes: list[str] | None = None) -> SplitReport:
        """Read a `to_record` back (a run's test_metrics.json, a fold's in `vascdist cv`); the classes are the
        counts' when not given."""
        metrics, confusion, calibration = {}, {}, {}
        for key, value in record.items():
            if key in _OWN_KEYS:
                continue
            if key.endswith("/confusion"):
                confusion[key.split("/")[0]] = value
            elif key.rsplit("/", 1)[-1] in CALIBRATION:
                calibration[key] = Estimate.from_json(value)
            else:
                metrics[key] = Estimate.from_json(value)
        counts = record.get("counts", {})
        if classes is None:
            classes = list(next(iter(counts.values()))) if counts else []
        optional = {k: _number(record[k]) if k in record else None for k in ("temperature", "loss")}
        sites = record.get("sites")
        return cls(split, classes, metrics, confusion, counts, record.get("confidence", 0.95),
                   record.get("checkpoint_step"), record.get("threshold_rule"), optional["temperature"],
                   optional["loss"], calibration, record.get("calibration_caveat"),
                   Excluded.from_fields(record) if "recording/excluded" in record else None,
                   None if sites is None else {site: SiteRow.from_json(e) for site, e in sites.items()})

    @classmethod
    def read(cls, path: str | Path, split: str = "test", classes: list[str] | None = None) -> SplitReport:
        """A metrics JSON file (test_metrics.json, eval-SPLIT.json) as a SplitReport."""
        return cls.from_record(json.loads(Path(path).read_text()), split, classes)


@dataclass(frozen=True)
class RunResult:
    """What a training run returns: where it ran, how it ended and a SplitReport per evaluated split.

    `stopped`: a stop was requested (preemption) and the run checkpointed to resume, untested; `complete`: the run
    had finished and been reported before this call, nothing was trained or tested now; otherwise it finished
    (`finished` says why) and `reports['test']` is the best checkpoint on the test split."""

    run_dir: Path
    step: int
    stopped: bool = False
    complete: bool = False
    finished: str = ""
    best_step: int = -1
    best_val: float = math.nan
    classes: list[str] = field(default_factory=list)
    reports: dict[str, SplitReport] = field(default_factory=dict)
    signal: str | None = None  # the signal that stopped the run ('SIGUSR2', 'SIGTERM'), None otherwise

    @property
    def test(self) -> SplitReport | None:
        return self.reports.get("test")

    def with_report(self, report: SplitReport) -> RunResult:
        return replace(self, reports={**self.reports, report.split: report})
