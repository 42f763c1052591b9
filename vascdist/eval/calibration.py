"""Calibration: how far predicted probabilities are from observed frequencies, and temperature scaling.

- Reliability diagram: predictions binned by P(class 1) (binary) or by the argmax confidence (more classes);
  observed frequency against mean prediction per bin, the diagonal being perfect calibration.
- Calibration slope and intercept (binary): the logistic recalibration fit y ~ a + b logit(p). The slope b is
  the unconstrained fit (< 1: predictions too extreme, > 1: too timid); the intercept is a with b fixed at 1
  ("calibration-in-the-large": < 0 means the model over-predicts the positive class). Ideal: 1 and 0.
- Temperature scaling (eval.calibrate=temperature): softmax(logits / T), one T fitted on the validation cycles
  by maximum likelihood. The loop keeps softmax probabilities only, but log(p) differs from the logits by a
  per-row constant, which softmax ignores, so softmax(log(p) / T) is exactly softmax(logits / T).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

_EPS = 1e-12
RELIABILITY_BINS = 10


# --------------------------------------------------------------------------------------------- temperature
def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T) row-wise; T = 1 returns the probabilities unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or probs.size == 0:
        return probs
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the negative log-likelihood of `labels` under apply_temperature(probs, T).
    1.0 when there is nothing to fit (no samples, or one class only)."""
    labels = np.asarray(labels).astype(np.int64)
    if labels.size == 0 or np.unique(labels).size < 2:
        return 1.0
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))

    def nll(log_t: float) -> float:
        z = log_p / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(labels.size), labels].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def calibrate_split(arrays: dict[str, np.ndarray], method: str) -> tuple[dict[str, np.ndarray], float]:
    """Validation: (arrays with calibrated probs, the temperature fitted on them); 'none' leaves them as they are."""
    if method == "none":
        return arrays, 1.0
    temperature = fit_temperature(arrays["probs"], arrays["y"])
    return with_temperature(arrays, temperature), temperature


def with_temperature(arrays: dict[str, np.ndarray], temperature: float) -> dict[str, np.ndarray]:
    """The arrays with probs = apply_temperature(probs, temperature) (a new dict; the input is not changed)."""
    return {**arrays, "probs": apply_temperature(arrays["probs"], temperature)}


# --------------------------------------------------------------------------------------------- slope / intercept
CALIBRATION_MIN_PATIENTS = 30
"""Below this many patients in a split the calibration slope and intercept are not shown as numbers (the report
and the table say so instead): a logistic fit on a dozen patients swings by an order of magnitude between
resamples (a slope of 18.6 from 12 patients), and their interval would be the only honest content."""


def calibration_caveat(n_patients: int) -> str:
    """'' when a split of `n_patients` patients is large enough for slope and intercept, else the reason."""
    if n_patients >= CALIBRATION_MIN_PATIENTS:
        return ""
    return f"omitted: {n_patients} patients < {CALIBRATION_MIN_PATIENTS}"


def _loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Weighted negative log-likelihood of y ~ a + b x, one per row."""
    eta = a[:, None] + b[:, None] * x
    return (w * (np.logaddexp(0, eta) - y * eta)).sum(1)


def _newton(x: np.ndarray, y: np.ndarray, w: np.ndarray, free_slope: bool,
            iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Weighted logistic fits y ~ a + b x, one per row of the weights w [R, N], by Newton's method with step
    halving (all rows at once, each until its gradient vanishes); b is fitted when `free_slope`, else fixed at
    1. Returns (a [R], b [R]); NaN where a fit does not converge (separable data: the slope is infinite)."""
    rows = w.shape[0]
    a, b = np.zeros(rows), np.ones(rows)
    active = np.arange(rows)
    scale = np.maximum(w.sum(1), 1.0)
    done = np.zeros(rows, bool)
    for _ in range(iterations):
        wa, ra, rb = w[active], a[active], b[active]
        p = expit(ra[:, None] + rb[:, None] * x)
        r, v = wa * (p - y), wa * p * (1 - p)
        g_a, h_aa = r.sum(1), v.sum(1) + 1e-12
        if free_slope:
            g_b, h_ab, h_bb = (r * x).sum(1), (v * x).sum(1), (v * x * x).sum(1) + 1e-12
            det = np.maximum(h_aa * h_bb - h_ab ** 2, 1e-12)
            step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
            converged = np.abs(g_a) + np.abs(g_b) < 1e-7 * scale[active]
        else:
            step_a, step_b = g_a / h_aa, np.zeros(len(active))
            converged = np.abs(g_a) < 1e-7 * scale[active]
        done[active[converged]] = True
        keep = ~converged
        active, wa, ra, rb, step_a, step_b = (active[keep], wa[keep], ra[keep], rb[keep], step_a[keep],
                                              step_b[keep])
        if not active.size:
            break
        before = _loss(x, y, wa, ra, rb)
        t = np.ones(len(active))
        for _ in range(30):  # halve the step of each row until its loss does not rise
            worse = _loss(x, y, wa, ra - t * step_a, rb - t * step_b) > before + 1e-12 * np.abs(before)
            if not worse.any():
                break
            t[worse] /= 2
        a[active], b[active] = ra - t * step_a, rb - t * step_b
    return np.where(done, a, np.nan), np.where(done, b, np.nan)


def calibration_fits(pos_probs: np.ndarray, labels: np.ndarray,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(slopes, intercepts) of the logistic recalibration fit (module docstring), one per row of `weights`
    [R, N] (item multiplicities of bootstrap resamples; None: the data as it is, R = 1). NaN where a row
    holds one class only, its classes are separable by the score (the slope would be infinite) or its fit does not
    converge."""
    y = (np.asarray(labels).astype(np.int64) == 1).astype(np.float64)
    p = np.clip(np.asarray(pos_probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    x = np.log(p / (1 - p))
    w = np.ones((1, y.size)) if weights is None else np.asarray(weights, dtype=np.float64)
    if y.size == 0:
        return np.full(len(w), np.nan), np.full(len(w), np.nan)
    positives = (w * y).sum(1)
    both = (positives > 0) & (positives < w.sum(1))
    # Separable rows (every negative below every positive) have no finite slope: NaN, not a huge number.
    drawn = w > 0
    separable = (np.where(drawn & (y == 0), x, -np.inf).max(1) <= np.where(drawn & (y == 1), x, np.inf).min(1))
    _, slope = _newton(x, y, w, free_slope=True)
    slope = np.where(separable, np.nan, slope)
    intercept, _ = _newton(x, y, w, free_slope=False)
    return np.where(both, slope, np.nan), np.where(both, intercept, np.nan)


def calibration_slope_intercept(pos_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the logistic recalibration fit (module docstring); NaN with one class only."""
    slope, intercept = calibration_fits(pos_probs, labels)
    return float(slope[0]), float(intercept[0])


# --------------------------------------------------------------------------------------------- reliability
def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin (lo, hi]: count, mean prediction and observed frequency (NaN in empty bins).
    Binary: the prediction is P(class 1), observed = fraction positive; else the argmax confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.shape[1] == 2:
        pred, hit = probs[:, 1], (labels == 1).astype(np.float64)
    else:
        pred, hit = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, pred, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(bins, weights=pred, minlength=n_bins) / count
        observed = np.bincount(bins, weights=hit, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_pred": mean_pred, "observed": observed}


def reliability_figure(levels: dict[str, tuple[np.ndarray, np.ndarray]], title: str,
                       notes: dict[str, str] | None = None):
    """The reliability diagram (vascdist.plots.reliability) of {level: (probs, labels)}."""
    from vascdist import plots
    bins = {level: {**reliability_bins(probs, labels), "binary": np.asarray(probs).shape[1] == 2}
            for level, (probs, labels) in levels.items()}
    return plots.reliability(bins, title, notes)
