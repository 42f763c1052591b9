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
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import minimize, minimize_scalar
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
def calibration_slope_intercept(pos_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the logistic recalibration fit (module docstring); NaN with one class only."""
    y = (np.asarray(labels).astype(np.int64) == 1).astype(np.float64)
    if y.size == 0 or y.min() == y.max():
        return float("nan"), float("nan")
    p = np.clip(np.asarray(pos_probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    x = np.log(p / (1 - p))

    def nll(params: np.ndarray, slope: float | None) -> tuple[float, np.ndarray]:
        a, b = (params[0], params[1]) if slope is None else (params[0], slope)
        eta = a + b * x
        loss = float(np.sum(np.logaddexp(0, eta) - y * eta))
        r = expit(eta) - y  # 1 / (1 + exp(-eta)) without overflow (the line search tries large steps)
        grad = np.array([r.sum(), (r * x).sum()]) if slope is None else np.array([r.sum()])
        return loss, grad

    full = minimize(nll, np.array([0.0, 1.0]), args=(None,), jac=True, method="BFGS")
    offset = minimize(nll, np.array([0.0]), args=(1.0,), jac=True, method="BFGS")
    return float(full.x[1]), float(offset.x[0])


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


def render_reliability(levels: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
                       notes: dict[str, str] | None = None) -> np.ndarray:
    """One reliability panel per level side by side, as an HxWx3 uint8 image: observed frequency (dots, area ~
    count) against mean prediction, the diagonal, and a histogram of the predictions along the bottom."""
    font = ImageFont.load_default(size=13)
    size, pad, top = 260, 44, 40
    image = Image.new("RGB", (len(levels) * (size + pad) + pad, size + top + 2 * pad + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, fill="black", font=font)
    for i, (level, (probs, labels)) in enumerate(levels.items()):
        binary = np.asarray(probs).shape[1] == 2
        r = reliability_bins(probs, labels)
        x0, y0 = pad + i * (size + pad), top + 20
        to_xy = lambda u, v: (x0 + u * size, y0 + (1 - v) * size)
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(90, 90, 90))
        draw.line([to_xy(0, 0), to_xy(1, 1)], fill=(170, 170, 170), width=1)
        for tick in (0, 0.5, 1):
            draw.text((to_xy(tick, 0)[0], y0 + size + 4), f"{tick:g}", fill="black", font=font, anchor="ma")
            draw.text((x0 - 4, to_xy(0, tick)[1]), f"{tick:g}", fill="black", font=font, anchor="rm")
        total = max(r["count"].sum(), 1)
        for k in range(len(r["count"])):  # histogram of predictions, up to a fifth of the panel
            h = 0.2 * size * r["count"][k] / total
            lo, hi = r["edges"][k], r["edges"][k + 1]
            draw.rectangle([to_xy(lo, 0)[0] + 1, y0 + size - h, to_xy(hi, 0)[0] - 1, y0 + size], fill=(205, 220, 240))
        points = [(to_xy(m, o), c) for m, o, c in zip(r["mean_pred"], r["observed"], r["count"]) if c > 0]
        if len(points) > 1:
            draw.line([p for p, _ in points], fill=(30, 90, 180), width=2)
        for (px, py), c in points:
            radius = 2 + 6 * math.sqrt(c / total)
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=(30, 90, 180))
        xlabel = "mean P(positive)" if binary else "mean confidence"
        ylabel = "observed positive fraction" if binary else "accuracy"
        draw.text((x0 + size / 2, y0 + size + 20), xlabel, fill="black", font=font, anchor="ma")
        draw.text((x0, y0 - 18), f"{level}: {ylabel} (n={int(r['count'].sum())})", fill="black", font=font)
        if notes and level in notes:
            draw.text((x0 + 6, y0 + 6), notes[level], fill=(60, 60, 60), font=font)
    return np.asarray(image, dtype=np.uint8)


def save_png(image: np.ndarray, path) -> None:
    """An HxWx3 uint8 image as a PNG file."""
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
