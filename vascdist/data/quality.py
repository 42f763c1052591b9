"""Per-recording level normalisation and quality control: heart rate, periodicity, level, clipping, SNR, hum.

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

from dataclasses import dataclass

import numpy as np
from scipy import signal as sps

from vascdist.config import AudioConfig
from vascdist.data.audio import AudioStats
from vascdist.data.cycles import Segmentation

REFERENCE_POWER = 1e-2  # typical frame energy after normalisation (-20 dB re full scale)
NOISE_PERCENTILE = 5  # the quietest 5 % of envelope frames bound the noise floor from above
CLIPPING_WARN = 0.001  # warn when more than 0.1 % of the samples are at full scale
MAINS_HZ = (50.0, 60.0)  # the two mains frequencies; a hum line sits at one of them and its harmonics
HUM_HARMONICS = 3  # the fundamental and the next two harmonics carry nearly all of a hum's power


@dataclass(frozen=True)
class RangeField:
    """A quality field compared with the training data's range, widened by `margin` on each side that is checked.

    The margins are in the field's unit and say how far a recording may lie beyond every training recording
    before the model has not seen its like (predict abstains): a held-out recording of the training population
    lands a little outside its min..max by chance, a recording of another kind lands far outside.
    """
    unit: str
    margin: float
    low: bool = True
    high: bool = True


RANGE_FIELDS = {
    "heart_rate_bpm": RangeField("bpm", 10.0),  # cycle windows are cut at the heart period
    "periodicity": RangeField("", 0.1),
    # The model never sees the gain (normalise_level); only a level far below the training data's, where the
    # recorder's own noise starts to shape the spectrum, is a reason to doubt.
    "level_dbfs": RangeField("dBFS", 20.0, high=False),
    "snr_db": RangeField("dB", 3.0),
    "clipping_fraction": RangeField("", 0.01, low=False),
    "hum_db": RangeField("dB", 10.0, low=False),  # no hum at all is never a reason to doubt
}

# Physically absurd recordings: no recorder, stethoscope or vascular access produces them (preprocess excludes
# them, predict gives no verdict).
RECORDER_FLOOR_DBFS = -100.0
"""Below this typical band level only quantisation noise is left: a 16-bit converter's noise is -101 dBFS."""
FULLY_CLIPPED = 0.5
"""A recording with at least this fraction of its samples at full scale is clipping, not sound."""
MIN_BAND_FRACTION = 1e-4
"""Below this fraction (-40 dB) of its power in the band-pass band a recording holds nothing the model reads."""


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
        "hum_db": hum_db(signal[seg.active[0]:seg.active[1]], sample_rate),
        "band_fraction": round(stats.band_fraction, 6) if stats else None,
        "source_rate": stats.source_rate if stats else None,
    }


def hum_db(signal: np.ndarray, sample_rate: int) -> float | None:
    """How far a mains line stands above the spectrum around it (dB; about 0 without hum, 40+ for pure hum).

    Welch power spectrum at 1 Hz resolution; for 50 and 60 Hz, the power of the fundamental and its first
    harmonics (HUM_HARMONICS, those below Nyquist) over the median power of the bins 3-15 Hz away from each,
    i.e. what the line adds to the local spectrum. The larger of the two mains frequencies counts.
    """
    if len(signal) < sample_rate:  # under a second: no 1 Hz resolution
        return None
    freqs, power = sps.welch(signal.astype(np.float64), fs=sample_rate, nperseg=int(sample_rate))
    best = None
    for mains in MAINS_HZ:
        line = around = 0.0
        for k in range(1, HUM_HARMONICS + 1):
            f = k * mains
            if f + 15 >= sample_rate / 2:
                break
            near = np.abs(freqs - f)
            line += float(power[near <= 1].sum())
            around += float(np.median(power[(near >= 3) & (near <= 15)])) * int((near <= 1).sum())
        if around > 0:
            value = 10 * math.log10(max(line, 1e-30) / around)
            best = value if best is None else max(best, value)
    return round(best, 2) if best is not None else None


def absurd_reasons(record: dict, audio: AudioConfig) -> list[str]:
    """Why a recording cannot be a recording of sound in the configured band at all (empty when it can be):
    level below a recorder's floor, a sample rate too low to hold the band, fully clipped, no energy in the band.
    """
    reasons = []
    rate = record.get("source_rate")
    if rate is not None and rate / 2 < audio.bandpass_high_hz:
        reasons.append(f"sample rate {rate:g} Hz holds frequencies up to {rate / 2:g} Hz, below the band's upper edge "
                       f"preprocess.audio.bandpass_high_hz={audio.bandpass_high_hz:g}")
    level = record.get("level_dbfs")
    if level is None or level < RECORDER_FLOOR_DBFS:
        reasons.append(f"level {'-inf' if level is None else f'{level:g}'} dBFS, below a recorder's floor "
                       f"({RECORDER_FLOOR_DBFS:g} dBFS)")
    clipping = record.get("clipping_fraction")
    if clipping is not None and clipping >= FULLY_CLIPPED:
        reasons.append(f"fully clipped: {100 * clipping:.0f} % of the samples at full scale")
    band = record.get("band_fraction")
    if band is not None and band < MIN_BAND_FRACTION:
        reasons.append(f"no energy in the band: {10 * math.log10(max(band, 1e-30)):.0f} dB of its power lies in "
                       f"{audio.bandpass_low_hz:g}..{audio.bandpass_high_hz:g} Hz")
    return reasons


def quality_range(records: list[dict]) -> dict:
    """Per RANGE_FIELDS field: [min, max] over the given (training) recordings' quality records."""
    out = {}
    for name in RANGE_FIELDS:
        values = [r[name] for r in records if r.get(name) is not None]
        if values:
            out[name] = [float(min(values)), float(max(values))]
    return out


def quality_warnings(record: dict) -> list[str]:
    """Reasons to look twice that are no reason to withhold a verdict: a little clipping."""
    clipping = record.get("clipping_fraction")
    if clipping is not None and CLIPPING_WARN < clipping:
        return [f"clipped: {100 * clipping:.2f} % of the samples at full scale"]
    return []


def outside_training_range(record: dict, trained: dict) -> list[str]:
    """The quality fields of `record` beyond the training data's range (`trained`: quality_range) by more than
    their RangeField margin, one reason each."""
    reasons = []
    for name, check in RANGE_FIELDS.items():
        value, span = record.get(name), trained.get(name)
        if value is None or not span:
            continue
        low, high = span[0] - check.margin, span[1] + check.margin
        if (check.low and value < low) or (check.high and value > high):
            unit = f" {check.unit}" if check.unit else ""
            reasons.append(f"{name} {value:g}{unit} outside the training data's {span[0]:g}..{span[1]:g}{unit} "
                           f"(margin {check.margin:g})")
    return reasons
