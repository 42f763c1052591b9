"""The typed aggregate of a cross-validation directory (vascdist.cv.aggregate makes it, `vascdist cv` prints it, the
report draws it) and its JSON form, CV_DIR/aggregate.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vascdist.eval.results import Estimate, SplitReport, estimates, split_estimates


@dataclass(frozen=True)
class Spread:
    """One metric over the finished folds: mean, sd (ddof=1; NaN for one fold), min, max and how many folds."""

    mean: float
    sd: float
    min: float
    max: float
    folds: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "min": self.min, "max": self.max, "folds": self.folds}


@dataclass(frozen=True)
class Pooled:
    """The metrics of pooled out-of-fold predictions (of one repeat, or of one site's patients), with patient-
    bootstrap intervals, their counts per level and class, and the folds they come from (`complete`: whether every
    fold of the repeat is there; None for a site)."""

    metrics: dict[str, Estimate]
    counts: dict[str, dict[str, int]]
    folds: list[str]
    complete: bool | None = None

    def report(self, classes: list[str], confidence: float) -> SplitReport:
        """As a SplitReport (its table and the report's metrics table are those of any split)."""
        return SplitReport("pooled", classes, self.metrics, counts=self.counts, confidence=confidence)

    def to_json(self) -> dict:
        values, intervals = split_estimates(self.metrics)
        out = {"metrics": values, "intervals": intervals, "counts": self.counts, "folds": self.folds}
        return out if self.complete is None else {**out, "complete": self.complete}

    @classmethod
    def from_json(cls, entry: dict) -> Pooled:
        metrics = {k: float("nan") if v is None else v for k, v in entry["metrics"].items()}
        intervals = {k: tuple(float("nan") if b is None else b for b in v) for k, v in entry["intervals"].items()}
        return cls(estimates(metrics, intervals), entry["counts"], list(entry["folds"]), entry.get("complete"))


@dataclass(frozen=True)
class CvResult:
    """Everything `vascdist cv --report` prints, as data: the plan's shape, which folds finished and why the others
    are missing, each fold's test metrics, their spread, the pooled out-of-fold metrics per repeat, and per site."""

    cv_dir: str
    group_by: str
    folds: int
    repeats: int
    seed: int
    classes: list[str]
    finished: list[str]
    missing: dict[str, str]
    per_fold: dict[str, dict[str, float]] = field(default_factory=dict)
    spread: dict[str, Spread] = field(default_factory=dict)
    pooled: dict[str, Pooled] = field(default_factory=dict)
    sites: dict[str, Pooled] = field(default_factory=dict)
    site_warning: str = ""
    confidence: float = 0.95

    @property
    def level(self) -> str:
        """The level the per-fold tables show: recording, or cycle for beats."""
        return "recording" if any(k.startswith("recording/") for r in self.per_fold.values() for k in r) else "cycle"

    def to_json(self) -> dict:
        return {"cv_dir": self.cv_dir, "group_by": self.group_by, "folds": self.folds, "repeats": self.repeats,
                "seed": self.seed, "classes": self.classes, "finished": self.finished, "missing": self.missing,
                "per_fold": self.per_fold, "spread": {k: s.to_json() for k, s in self.spread.items()},
                "pooled": {k: p.to_json() for k, p in self.pooled.items()},
                "sites": {k: p.to_json() for k, p in self.sites.items()}, "site_warning": self.site_warning,
                "confidence": self.confidence}

    @classmethod
    def from_json(cls, data: dict) -> CvResult:
        return cls(data["cv_dir"], data.get("group_by", "patient"), data["folds"], data["repeats"], data["seed"],
                   data["classes"], data["finished"], data["missing"], data["per_fold"],
                   {k: Spread(**{f: float("nan") if v is None else v for f, v in s.items()})
                    for k, s in data["spread"].items()},
                   {k: Pooled.from_json(p) for k, p in data["pooled"].items()},
                   {k: Pooled.from_json(p) for k, p in data.get("sites", {}).items()}, data.get("site_warning", ""),
                   data.get("confidence", 0.95))

    @classmethod
    def read(cls, path: str | Path) -> CvResult:
        return cls.from_json(json.loads(Path(path).read_text()))
