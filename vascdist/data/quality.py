"""Per-recording level normalisation and quality control: heart rate, periodicity, level, clipping, SNR.

Loudness: recorders normalise peaks and set gains by hand, so a recording's absolute level says nothing about
the access. Every signal is therefore scaled so that its typical frame energy (the median of the cycle
envelope over its sound) is REFERENCE_POWER before the mel transform. That makes the model input exactly
independent of the gain for every gain that does not clip: the filters, the resampler and the segmentation
are linear or scale-free, and the log-mel of a scaled signal is the same after the scaling is undone. Random-
gain augmentation would only teach the model approximately what this guarantees, so there is none. The median
(rather than the RMS) keeps a motion burst or a clipped thump from setting the level of a whole recording.
"""

from __future__ import annotations

import math

import numpy as np

from vascdist.data.audio import AudioStats
from vascdist.data.cycles import Segmentation

REFERENCE_POWER = 1e-2  # typical frame energy after normalisation (-20 dB re full scale)
NOISE_PERCENTILE = 5  # the quietest 5 % of envelope frames bound the noise floor from above
CLIPPING_WARN = 0.001  # warn when more than 0.1 % of the samples are at full scale
# Fields of a quality record that are compared with the training data's range (name -> unit for messages).
RANGE_FIELDS = {"heart_rate_bpm": "bpm", "periodicity": "", "level_dbfs": "dBFS", "snr_db": "dB",
                "clipping_fraction": ""}


def typical_power(seg: Segmentation) -> float:
    """Median envelope energy over the recording's sound (recorder silence at either end excluded)."""
    a, b = seg.active[0] // seg.hop, max(seg.active[0] // seg.hop + 1, seg.active[1] // seg.hop)
    env = seg.envelope[a:b]
    return float(np.median(env)) if len(env) else 0.0


def normalise_level(signal: np.ndarray, seg: Segmentation) -> np.ndarray:
    """`signal` scaled so that its typical frame energy is REFERENCE_POWER (see the module docstring)."""
    power = typical_power(seg)
    if power <= 0:
        return signal
    return (signal * np.float32(math.sqrt(REFERENCE_POWER / power))).astype(np.float32)


def quality_record(signal: np.ndarray, seg: Segmentation, sample_rate: int, stats: AudioStats | None) -> dict:
    """The numbers a researcher checks before trusting a verdict on this recording (JSON-ready).

    level_dbfs: typical frame energy of the band-passed signal in dB re full scale; snr_db: mean envelope
    energy over its NOISE_PERCENTILE-th percentile, a lower bound on the SNR (continuous bruit keeps flowing in
    diastole, so its quietest frames are partly bruit, not only sensor noise).
    """
    a, b = seg.active[0] // seg.hop, max(seg.active[0] // seg.hop + 1, seg.active[1] // seg.hop)
    env = seg.envelope[a:b]
    power = typical_power(seg)
    floor = float(np.percentile(env, NOISE_PERCENTILE)) if len(env) else 0.0
    mean = float(env.mean()) if len(env) else 0.0
    return {
        "heart_rate_bpm": round(seg.heart_rate_bpm, 2) if seg.heart_rate_bpm else None,
        "periodicity": round(seg.periodicity, 4),
        "periodic": bool(seg.periodic),
        "aperiodic_reason": seg.reason,
        "level_dbfs": round(10 * math.log10(power), 2) if power > 0 else None,
        "snr_db": round(10 * math.log10(mean / floor), 2) if floor > 0 and mean > 0 else None,
        "clipping_fraction": round(stats.clipping_fraction, 6) if stats else None,
        "sound_s": round((seg.active[1] - seg.active[0]) / sample_rate, 2),
        "duration_s": round(len(signal) / sample_rate, 2),
        "onsets": int(len(seg.onsets)),
    }


def quality_range(records: list[dict]) -> dict:
    """Per RANGE_FIELDS field: [min, max] over the given (training) recordings' quality records."""
    out = {}
    for name in RANGE_FIELDS:
        values = [r[name] for r in records if r.get(name) is not None]
        if values:
            out[name] = [float(min(values)), float(max(values))]
    return out


def quality_warnings(record: dict, trained: dict) -> list[str]:
    """Why this recording's verdict deserves suspicion: outside the training data's range, aperiodic, clipped."""
    warnings = []
    if not record.get("periodic", True):
        warnings.append(f"aperiodic ({record.get('aperiodic_reason')}): cut into fixed windows, not cycles")
    clipping = record.get("clipping_fraction")
    if clipping is not None and clipping > CLIPPING_WARN:
        warnings.append(f"clipped: {100 * clipping:.2f} % of the samples at full scale")
    for name, unit in RANGE_FIELDS.items():
        value, span = record.get(name), trained.get(name)
        if value is None or not span:
            continue
        if value < span[0] or value > span[1]:
            warnings.append(f"{name} {value:g}{(' ' + unit) if unit else ''} outside the training data's "
                            f"{span[0]:g}..{span[1]:g}")
    return warnings
