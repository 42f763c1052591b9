"""Cardiac-cycle onsets of a bruit recording: energy envelope -> period by autocorrelation -> beat tracking.

The bruit is continuous but louder in systole, so each beat shows as a rise of the energy envelope. We
 1. form a smoothed energy envelope at cfg.envelope_hz, cut off the recorder's silence at either end (a
    stethoscope records a second or two before it touches the skin) and take its log (bursts and loud sites
    compress);
 2. estimate the heart period from the autocorrelation of that log envelope, after removing what varies more
    slowly than the slowest heart rate (probe pressure, breathing, the step into and out of silence) and
    limiting each sample to 3 robust standard deviations (a motion burst or a clipped thump would otherwise
    own the autocorrelation). Continuous bruit with a shallow pulsatile envelope then shows its period as a
    clear peak instead of sitting on the slowly decaying baseline of the raw log envelope. Only true local
    maxima inside [60/max_bpm, 60/min_bpm] count; the correlation there is the recording's periodicity score,
    and below cfg.min_periodicity the recording is aperiodic (see `segment`);
 3. track beats by dynamic programming over the rising-edge strength (Ellis 2007, as in librosa's beat
    tracker): each beat is rewarded for a strong rise and penalised for an interval far from the period, so
    noise, hum and a motion burst cannot add or remove beats unless the evidence is strong;
 4. move each beat from its steepest rise back to where the energy has risen RISE_FRACTION of the way from
    its diastolic minimum to its systolic maximum (a threshold is steadier on a noisy envelope than a tangent).
    A beat whose diastolic minimum is not inside the recording (the file starts on the rise) is dropped, so
    every recording's first onset is the start of a systolic rise, never the start of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

from vascdist.config import CycleConfig
from vascdist.errors import DataError

MIN_INTERVAL = 0.6  # shortest beat interval the tracker accepts, as a fraction of the period
MAX_INTERVAL = 1.6  # longest
TIGHTNESS = 50.0  # weight of the (log interval / period)^2 penalty, in units of rise strength
STRENGTH_SMOOTHING_S = 0.1  # extra smoothing of the log envelope before taking its slope
SLOPE_SPAN_S = 0.02  # half-span of the slope
LOG_FLOOR = 0.05  # log(envelope + LOG_FLOOR * median): near-silent dips of narrow-band bruit do not dominate
PERIOD_LOG_FLOOR = 1.0  # the period search only needs the rises above the typical level: dips below it are
# noise there (the quiet diastole of a heart-sound recording), so it compresses them harder
SILENCE = 1e-3  # envelope below this fraction of its median (-30 dB) at either end is the recorder's silence
ROBUST_CLIP = 3.0  # detrended log envelope limited to this many robust standard deviations
SIGNIFICANCE = 3.0  # the periodicity must also exceed this many standard errors of a correlation (see below)
SUBHARMONIC_RATIO = 0.5  # a local maximum at a period sub-multiple this well correlated wins over the highest one
RISE_FRACTION = 0.2  # the rise starts where the energy first exceeds this fraction of its systolic rise


@dataclass
class Segmentation:
    """What `segment` found in one recording (sample indices at the signal's rate)."""
    onsets: np.ndarray
    """Cycle onsets (int64, increasing): systolic rises when periodic, fallback window starts otherwise."""
    periodic: bool
    """Whether a heart period was found with periodicity >= cfg.min_periodicity."""
    period_s: float | None
    """Heart period in seconds (None when none was found)."""
    periodicity: float
    """Normalised envelope autocorrelation at the heart period (0 when there is no local maximum)."""
    reason: str
    """Why the recording is aperiodic ('' when periodic)."""
    envelope: np.ndarray
    """Smoothed energy envelope; sample i covers signal samples [i*hop, (i+1)*hop)."""
    hop: int
    active: tuple[int, int]
    """Signal sample range [start, end) that holds sound (recorder silence at either end excluded)."""

    @property
    def heart_rate_bpm(self) -> float | None:
        return 60.0 / self.period_s if self.period_s else None


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average (no delay); the edges average over the samples that exist."""
    if width <= 1:
        return x
    kernel = np.ones(width)
    return np.convolve(x, kernel, mode="same") / np.convolve(np.ones_like(x), kernel, mode="same")


def energy_envelope(signal: np.ndarray, sample_rate: int, cfg: CycleConfig) -> tuple[np.ndarray, int]:
    """Squared signal, block-averaged to ~cfg.envelope_hz and smoothed over cfg.envelope_smoothing_s.

    Returns (envelope, hop): envelope sample i covers signal samples [i*hop, (i+1)*hop).
    """
    hop = max(1, int(round(sample_rate / cfg.envelope_hz)))
    n = len(signal) // hop
    power = (np.asarray(signal[: n * hop], dtype=np.float64) ** 2).reshape(n, hop).mean(axis=1)
    rate = sample_rate / hop
    return _moving_average(power, int(round(cfg.envelope_smoothing_s * rate))), hop


def active_range(env: np.ndarray) -> tuple[int, int]:
    """Envelope index range [start, end) between the leading and trailing recorder silence."""
    loud = np.flatnonzero(env > SILENCE * np.median(env[env > 0])) if np.any(env > 0) else np.zeros(0, int)
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, 0)


def log_envelope(env: np.ndarray, floor: float = LOG_FLOOR) -> np.ndarray:
    """log(env + floor * median(env)): the envelope in (natural) log units, dips below floor x median compressed."""
    return np.log(env + floor * np.median(env) + 1e-12)


def pulsatility(log_env: np.ndarray, rate: float, cfg: CycleConfig) -> np.ndarray:
    """The log envelope without what is slower than the slowest heart beat (a moving median one longest period
    wide), centred and limited to +-ROBUST_CLIP robust standard deviations."""
    width = int(round(rate * 60.0 / cfg.min_bpm)) | 1
    d = log_env - median_filter(log_env, size=width, mode="nearest")
    d = d - np.median(d)
    sigma = 1.4826 * np.median(np.abs(d)) + 1e-12
    return np.clip(d / sigma, -ROBUST_CLIP, ROBUST_CLIP)


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation r[k] (r[0] = 1), each lag averaged over the pairs that overlap (unbiased),
    so a lag of half the recording is not penalised against a short one."""
    n = len(x)
    x = x - x.mean()
    spectrum = np.fft.rfft(x, n=2 * n)
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[:n] / (n - np.arange(n))
    return acf / acf[0] if acf[0] > 0 else np.zeros(n)


def local_maxima(r: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Lags k in [lo, hi] with r[k-1] < r[k] >= r[k+1]: a lag at either edge of the range counts only if it is
    a peak of the whole function, never because the search stopped there."""
    k = np.arange(max(lo, 1), min(hi, len(r) - 2) + 1)
    return k[(r[k] > r[k - 1]) & (r[k] >= r[k + 1])]


def _refine(r: np.ndarray, k: int) -> float:
    """Sub-sample position of the local maximum k by a parabola through k-1, k, k+1; stays within +-0.5."""
    a, b, c = r[k - 1], r[k], r[k + 1]
    denom = a - 2 * b + c
    if denom >= 0:  # flat top: no curvature to interpolate
        return float(k)
    return k + float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))


def estimate_period(z: np.ndarray, rate: float, cfg: CycleConfig) -> tuple[float | None, float, str]:
    """(period in envelope samples or None, periodicity score, reason when None) of a pulsatility signal.

    The period is the best-correlated true local maximum of the autocorrelation between 60/max_bpm and
    60/min_bpm, or the shortest sub-multiple of it that is itself a local maximum nearly as well correlated
    (every multiple of the period also correlates; with beat-to-beat variability 2T can edge out T).
    Lags longer than half the recording are not searched (fewer than two periods to compare).
    """
    lo = int(np.floor(rate * 60.0 / cfg.max_bpm))
    longest = int(np.ceil(rate * 60.0 / cfg.min_bpm))
    hi = min(longest, len(z) // 2)
    if hi <= lo:
        return None, 0.0, f"too short to hold two heart periods at {cfg.max_bpm:g} bpm"
    r = autocorrelation(z)
    peaks = local_maxima(r, lo, hi)
    if not len(peaks):
        slower = "" if hi == longest else f" (only periods up to {hi / rate:.2f} s fit twice)"
        return None, 0.0, f"no autocorrelation peak between {cfg.min_bpm:g} and {cfg.max_bpm:g} bpm{slower}"
    lag = int(peaks[np.argmax(r[peaks])])
    for divisor in (3, 2):
        near = peaks[(peaks >= lag / divisor * 0.9) & (peaks <= lag / divisor * 1.1)]
        if len(near):
            sub = int(near[np.argmax(r[near])])
            if r[sub] > SUBHARMONIC_RATIO * r[lag] and r[sub] > 0:
                lag = sub
                break
    score = float(r[lag])
    chance = chance_correlation(r, lag)
    if score < max(cfg.min_periodicity, chance):
        limit = (f"preprocess.cycles.min_periodicity={cfg.min_periodicity:g}" if cfg.min_periodicity >= chance
                 else f"{chance:.2f}, what chance reaches in {len(z) / rate:.1f} s of sound")
        return None, score, (f"weakly periodic (envelope autocorrelation {score:.2f} at {60 * rate / lag:.0f} bpm, "
                             f"below {limit})")
    return _refine(r, lag), score, ""


def chance_correlation(r: np.ndarray, lag: int) -> float:
    """SIGNIFICANCE standard errors of a correlation measured at `lag`: 1/sqrt(n) for n independent pairs, where
    the pairs that overlap at that lag are independent once they are two half-widths of r's central peak apart.
    A short or slowly varying envelope holds few independent pairs, and chance alone correlates it well."""
    below = np.flatnonzero(r[1:lag] <= 0.5)
    half_width = 1 + int(below[0]) if len(below) else lag
    n_independent = max(1.0, (len(r) - lag) / (2.0 * half_width))
    return SIGNIFICANCE / float(np.sqrt(n_independent))


def _rise_strength(log_env: np.ndarray, rate: float) -> np.ndarray:
    """Positive slope of the log envelope (smoothed over STRENGTH_SMOOTHING_S) across +-SLOPE_SPAN_S, in robust
    units, clipped so a motion burst counts no more than a strong beat."""
    smooth = _moving_average(log_env, int(round(STRENGTH_SMOOTHING_S * rate)))
    k = max(1, int(round(SLOPE_SPAN_S * rate)))
    padded = np.pad(smooth, k, mode="edge")
    slope = np.maximum(padded[2 * k:] - padded[:-2 * k], 0.0)
    scale = np.percentile(slope, 95) + 1e-12
    return np.minimum(slope / scale, 2.0)


def track_beats(strength: np.ndarray, period: float) -> np.ndarray:
    """Dynamic-programming beat tracking: indices maximising rise strength minus interval penalties."""
    n = len(strength)
    local = strength - np.median(strength)  # quiet stretches cost, so chains start and end at real beats
    lo, hi = max(1, int(round(MIN_INTERVAL * period))), int(round(MAX_INTERVAL * period))
    lags = np.arange(lo, hi + 1)
    penalty = TIGHTNESS * np.log(lags / period) ** 2
    score = np.empty(n)
    back = np.full(n, -1)
    for i in range(n):
        prev = i - lags
        ok = prev >= 0
        best = -np.inf
        if ok.any():
            cand = score[prev[ok]] - penalty[ok]
            j = int(np.argmax(cand))
            best = cand[j]
        if best > 0:
            score[i], back[i] = local[i] + best, prev[ok][j]
        else:
            score[i] = local[i]
    i = n - hi - 1 + int(np.argmax(score[max(0, n - hi - 1):])) if n > hi else int(np.argmax(score))
    beats = []
    while i >= 0:
        beats.append(i)
        i = back[i]
    return np.asarray(beats[::-1], dtype=np.int64)


def _rise_start(env: np.ndarray, steep: int, period: float) -> int | None:
    """Start of the rise whose steepest point is near `steep`: the last envelope sample before it that is
    within RISE_FRACTION of the way from the preceding minimum (0.4 period back) to the following maximum.

    None when that minimum is not inside the envelope (the recording starts on this rise): its start is unseen.
    """
    start = steep - int(0.4 * period)
    if start < 0:
        before = env[:steep + 1]
        if not len(before) or int(np.argmin(before)) == 0:
            return None
        start = 0
    end = min(len(env), steep + int(0.15 * period) + 1)
    base = env[start:steep + 1].min()
    level = base + RISE_FRACTION * (env[steep:end].max() - base)
    below = np.flatnonzero(env[start:steep + 1] <= level)
    return start + int(below[-1]) if len(below) else None


def fallback_starts(n_samples: int, sample_rate: int, cfg: CycleConfig) -> np.ndarray:
    """Window starts every cfg.aperiodic_hop_s over [0, n_samples): the fixed-length overlapping windows of
    an aperiodic recording."""
    hop = max(1, int(round(cfg.aperiodic_hop_s * sample_rate)))
    return np.arange(0, max(1, n_samples), hop, dtype=np.int64)


def segment(signal: np.ndarray, sample_rate: int, cfg: CycleConfig) -> Segmentation:
    """Heart period, periodicity and cycle onsets of a prepared signal.

    A recording without a clear heart period (no true autocorrelation peak in the heart-rate range, or a
    periodicity below cfg.min_periodicity) is never cut at guessed beats: with cfg.aperiodic == 'windows' it
    gets fixed-length windows every cfg.aperiodic_hop_s across its sound (periodic=False, with the reason);
    with 'refuse' a DataError names the reason. The caller adds the file path.
    """
    env, hop = energy_envelope(signal, sample_rate, cfg)
    rate = sample_rate / hop
    a, b = active_range(env)
    duration = len(signal) / sample_rate
    period, score, reason = None, 0.0, f"no sound in {duration:.1f} s of audio"
    if b - a >= 3:
        log_env = log_envelope(env[a:b], PERIOD_LOG_FLOOR)
        period, score, reason = estimate_period(pulsatility(log_env, rate, cfg), rate, cfg)
    if period is not None:
        active = env[a:b]
        beats = track_beats(_rise_strength(log_envelope(active), rate), period)
        starts = [_rise_start(active, int(i), period) for i in beats]
        onsets = np.array([a + s for s in starts if s is not None], dtype=np.float64)
        onsets = np.unique(np.round((onsets + 0.5) * hop).astype(np.int64))  # block centre -> sample index
        onsets = onsets[(onsets >= 0) & (onsets < len(signal))]
        if len(onsets):
            return Segmentation(onsets, True, period / rate, score, "", env, hop, (a * hop, b * hop))
        period, reason = None, "no systolic rise found"
    if cfg.aperiodic == "refuse":
        raise DataError(f"aperiodic recording: {reason} (preprocess.cycles.aperiodic=refuse)")
    starts = a * hop + fallback_starts(max(0, b - a) * hop, sample_rate, cfg)
    return Segmentation(starts, False, None, score, reason, env, hop, (a * hop, b * hop))


def find_cycle_onsets(signal: np.ndarray, sample_rate: int, cfg: CycleConfig) -> np.ndarray:
    """Sample indices (int64, increasing) of cardiac-cycle onsets: the start of each beat's systolic rise of
    the bruit energy.

    Raises DataError when the recording has no clear heart period (whatever cfg.aperiodic says: there are no
    cycles to return) or fewer than cfg.min_cycles onsets; the caller adds the file path.
    """
    duration = len(signal) / sample_rate
    seg = segment(signal, sample_rate, cfg)
    if not seg.periodic:
        raise DataError(f"no clear heart period in {duration:.1f} s of audio: {seg.reason}")
    if len(seg.onsets) < cfg.min_cycles:
        raise DataError(f"fewer than {cfg.min_cycles} cardiac cycles found in {duration:.1f} s of audio")
    return seg.onsets
