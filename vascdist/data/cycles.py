"""Cardiac-cycle onsets of a bruit recording: energy envelope -> period by autocorrelation -> beat tracking.

The bruit is continuous but louder in systole, so each beat shows as a rise of the energy envelope. We
 1. form a smoothed energy envelope at cfg.envelope_hz and take its log (bursts and loud sites compress);
 2. estimate the heart period from the envelope's autocorrelation within [60/max_bpm, 60/min_bpm];
 3. track beats by dynamic programming over the rising-edge strength (Ellis 2007, as in librosa's beat
    tracker): each beat is rewarded for a strong rise and penalised for an interval far from the period, so
    noise, hum and a motion burst cannot add or remove beats unless the evidence is strong;
 4. move each beat from its steepest rise back to where the energy has risen RISE_FRACTION of the way from
    its diastolic minimum to its systolic maximum (a threshold is steadier on a noisy envelope than a tangent).
"""

from __future__ import annotations

import numpy as np

from vascdist.config import CycleConfig
from vascdist.errors import DataError

MIN_INTERVAL = 0.6  # shortest beat interval the tracker accepts, as a fraction of the period
MAX_INTERVAL = 1.6  # longest
TIGHTNESS = 50.0  # weight of the (log interval / period)^2 penalty, in units of rise strength
STRENGTH_SMOOTHING_S = 0.1  # extra smoothing of the log envelope before taking its slope
SLOPE_SPAN_S = 0.02  # half-span of the slope
LOG_FLOOR = 0.05  # log(envelope + LOG_FLOOR * median): near-silent dips of narrow-band bruit do not dominate
SUBHARMONIC_RATIO = 0.5  # a period sub-multiple this well correlated wins over the autocorrelation peak
RISE_FRACTION = 0.2  # the rise starts where the energy first exceeds this fraction of its systolic rise


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


def estimate_period(log_env: np.ndarray, rate: float, cfg: CycleConfig) -> float | None:
    """Heart period (envelope samples) at the autocorrelation maximum within the allowed heart rates.

    None when there is no periodicity, or when the best lag is where the search was cut short because the
    envelope cannot hold two longer periods (the true period may be longer: too few cycles to tell).
    """
    lo = int(np.floor(rate * 60.0 / cfg.max_bpm))
    longest = int(np.ceil(rate * 60.0 / cfg.min_bpm))
    hi = min(longest, len(log_env) // 2)
    if hi <= lo:
        return None
    x = log_env - log_env.mean()
    spectrum = np.fft.rfft(x, n=2 * len(x))
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[: len(x)]
    lag = lo + int(np.argmax(acf[lo:hi + 1]))
    if acf[lag] <= 0 or (lag == hi < longest):
        return None
    # Every multiple of the period also correlates; with beat-to-beat variability 2T can edge out T. Prefer the
    # shortest sub-multiple whose correlation is nearly as high (at T/2 a true pulse train is anti-correlated).
    for divisor in (3, 2):
        a, b = int(np.floor(lag / divisor * 0.9)), int(np.ceil(lag / divisor * 1.1))
        if a >= lo and b <= hi:
            sub = a + int(np.argmax(acf[a:b + 1]))
            if acf[sub] > SUBHARMONIC_RATIO * acf[lag]:
                lag = sub
                break
    # Parabolic interpolation around the peak for a sub-sample period.
    if lo < lag < hi:
        a, b, c = acf[lag - 1], acf[lag], acf[lag + 1]
        denom = a - 2 * b + c
        if denom < 0:
            return lag + 0.5 * (a - c) / denom
    return float(lag)


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


def _rise_start(env: np.ndarray, steep: int, period: float) -> int:
    """Start of the rise whose steepest point is near `steep`: the last envelope sample before it that is
    within RISE_FRACTION of the way from the preceding minimum (0.4 period back) to the following maximum."""
    start = max(0, steep - int(0.4 * period))
    end = min(len(env), steep + int(0.15 * period) + 1)
    base = env[start:steep + 1].min()
    level = base + RISE_FRACTION * (env[steep:end].max() - base)
    below = np.flatnonzero(env[start:steep + 1] <= level)
    return start + int(below[-1]) if len(below) else steep


def find_cycle_onsets(signal: np.ndarray, sample_rate: int, cfg: CycleConfig) -> np.ndarray:
    """Sample indices (int64, increasing) of cardiac-cycle onsets: the start of each beat's systolic rise of
    the bruit energy.

    Raises DataError("fewer than {min_cycles} cardiac cycles found in {dur} s of audio") when too few; the
    caller adds the file path.
    """
    duration = len(signal) / sample_rate
    too_few = DataError(f"fewer than {cfg.min_cycles} cardiac cycles found in {duration:.1f} s of audio")
    env, hop = energy_envelope(signal, sample_rate, cfg)
    rate = sample_rate / hop
    if len(env) < 3 or not np.any(env > 0):
        raise too_few
    log_env = np.log(env + LOG_FLOOR * np.median(env) + 1e-12)
    period = estimate_period(log_env, rate, cfg)
    if period is None:
        raise too_few
    beats = track_beats(_rise_strength(log_env, rate), period)
    onsets = np.array([_rise_start(env, b, period) for b in beats])
    onsets = np.unique(np.round((onsets + 0.5) * hop).astype(np.int64))  # block centre -> sample index
    onsets = onsets[(onsets >= 0) & (onsets < len(signal))]
    if len(onsets) < cfg.min_cycles:
        raise too_few
    return onsets
