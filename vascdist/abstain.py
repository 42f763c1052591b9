"""When `vascdist predict` gives no verdict: the recording is not of the kind the model was trained on.

A classifier answers every input with probabilities, and a softmax is as confident on white noise as on a
fistula, so confidence is no test. Instead a verdict needs evidence that the recording lies where the training
recordings lay. The rule, in the order it is checked:

1. Physically absurd (quality.absurd_reasons): below a recorder's floor, a sample rate that cannot hold the band,
   fully clipped, no energy in the band. No model has seen such a thing.
2. The source: a model trained only on synthetic recordings (`vascdist synth`) gives no verdict on a real one,
   and a model trained only on real recordings none on a synthetic one: the two are different distributions.
3. Aperiodic: no heart period was found, so the windows are not cardiac cycles and the model's cycle-averaged
   verdict has no cycles to average.
4. Fewer usable cycle windows than AbstainRule.min_cycles: too little evidence to average.
5. A quality field (heart rate, periodicity, level, SNR, clipping, hum) beyond the training recordings' range by
   more than its margin (quality.RANGE_FIELDS).
6. The input statistics: the recording's per-band log-mel mean and spread (its spectral shape after level
   normalisation, what the model reads) lie further from the training recordings' than any training recording's
   (each measured out of sample), by more than the factor AbstainRule.spectral_margin (`InputProfile`).

Every reason that applies is reported, not only the first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # numpy and the quality checks are imported where used: the CLI reads AbstainRule's defaults
    import numpy as np

    from vascdist.config import AudioConfig
    from vascdist.data.provenance import Provenance

FOLDS = 10
"""The training recordings' own distances are cross-fitted: each from a fit on the other FOLDS - 1 folds of
patients, so that they are out-of-sample distances, as a new recording's is."""
MIN_RECORDINGS = 10
"""Fewer training recordings than this give no input profile (the spectral check is then skipped, and said)."""


@dataclass(frozen=True)
class AbstainRule:
    """The configurable part of the rule (predict's --min-cycles and --spectral-margin)."""
    min_cycles: int = 5
    """A verdict averages per-cycle probabilities; under this many windows there is too little to average."""
    spectral_margin: float = 1.5
    """A recording's spectral distance may be up to this factor times the largest of the training recordings'."""


@dataclass(frozen=True)
class InputProfile:
    """The training recordings' input statistics, stored in the checkpoint's data entry (`input_profile`).

    Features of a recording (data.spectrogram.input_features): per mel band, the mean log-mel over its windows and frames (its
    spectral shape after level normalisation) and the mean over windows of the log-mel's spread over a window's
    frames (how much each band is modulated within a cycle). Distance: the Mahalanobis distance from the training
    recordings' mean under their Ledoit-Wolf shrunk covariance (bands are strongly correlated: a spectral tilt
    moves all of them), divided by the square root of the number of features so that it does not grow with them.
    """
    mean: list[float]
    precision: list[list[float]]
    max_distance: float
    """The largest cross-fitted distance of a training recording (see FOLDS)."""
    recordings: int

    def distance(self, features) -> float:
        import numpy as np
        return _distance(np.asarray(features, np.float64), np.asarray(self.mean), np.asarray(self.precision))

    def to_dict(self) -> dict:
        return asdict(self)


def _distance(x, mean, precision) -> float:
    import numpy as np
    d = x - mean
    return float(np.sqrt(max(float(d @ precision @ d), 0.0) / len(d)))


def input_profile(recordings: list[dict]) -> InputProfile | None:
    """The profile of the given (training) recordings' `input_features` entries; None when fewer than
    MIN_RECORDINGS have them (shards preprocessed before vascdist stored them, or a tiny set)."""
    import numpy as np
    from sklearn.covariance import LedoitWolf
    rows = [r for r in recordings if r.get("input_features")]
    if len(rows) < MIN_RECORDINGS:
        return None
    x = np.asarray([r["input_features"] for r in rows], np.float64)
    patients = sorted({r.get("patient", i) for i, r in enumerate(rows)}, key=str)
    fold = np.array([patients.index(r.get("patient", i)) % FOLDS for i, r in enumerate(rows)])
    worst = 0.0
    for k in np.unique(fold):
        fit = x[fold != k]
        if len(fit) < 2:
            continue
        precision = LedoitWolf().fit(fit).precision_
        worst = max(worst, max(_distance(row, fit.mean(axis=0), precision) for row in x[fold == k]))
    return InputProfile(x.mean(axis=0).round(5).tolist(), LedoitWolf().fit(x).precision_.round(8).tolist(),
                        round(worst, 4), len(rows))


def profile_from_info(info: dict) -> InputProfile | None:
    """The InputProfile stored in a checkpoint's data entry (None for a checkpoint from before it was stored)."""
    stored = info.get("input_profile")
    return InputProfile(**stored) if stored else None


class TrainedOn(Protocol):
    """What the rule knows of the training data (a checkpoint's train.saved.DataInfo)."""
    provenance: Provenance
    quality_range: dict
    input_profile: InputProfile | None


def abstain_reasons(quality: dict, windows: int, features: np.ndarray | None, info: TrainedOn, audio: AudioConfig,
                    rule: AbstainRule, synthetic: bool | None = None) -> list[str]:
    """Why this recording gets no verdict from the model whose checkpoint's data entry is `info` (empty: a verdict).

    `quality`: the recording's quality record; `windows`: its usable cycle windows; `features`: input_features
    of its spectrograms (None when it has none); `synthetic`: whether `vascdist synth` made it.
    """
    from vascdist.data.quality import absurd_reasons, outside_training_range
    reasons = list(absurd_reasons(quality, audio))
    source = info.provenance.source
    if synthetic is not None and source in ("synthetic", "real") and synthetic != (source == "synthetic"):
        reasons.append("a real recording, and the model was trained on synthetic recordings (vascdist synth) only"
                       if source == "synthetic" else
                       "a synthetic recording (vascdist synth), and the model was trained on real recordings only")
    if not quality.get("periodic", True):
        reasons.append(f"aperiodic ({quality.get('aperiodic_reason')}): no cardiac cycles to average over")
    if windows < rule.min_cycles:
        reasons.append(f"{windows} usable cycle window(s), fewer than the minimum of {rule.min_cycles} "
                       f"(predict --min-cycles)")
    reasons += outside_training_range(quality, info.quality_range)
    profile = info.input_profile
    if profile is not None and features is not None:
        distance, limit = profile.distance(features), rule.spectral_margin * profile.max_distance
        if distance > limit:
            reasons.append(f"spectrum unlike the training recordings': distance {distance:.2f} of its per-band "
                           f"log-mel mean and spread from theirs, beyond {limit:.2f} ({rule.spectral_margin:g} x the "
                           f"farthest of the {profile.recordings} training recordings)")
    return reasons
