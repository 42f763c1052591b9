"""Every figure vascdist draws, with matplotlib: learning curves, ROC and precision-recall curves, reliability
diagrams, confusion matrices, and the axes helpers `vascdist inspect` builds its picture from.

Figures are made with `matplotlib.figure.Figure` directly, never pyplot: no backend is chosen, no display is
needed, no global figure state is kept (Agg renders them). Legends sit outside the axes, below them, so they
never cover data; constrained layout keeps tick labels, axis titles and legends apart. A figure becomes PNG
bytes (report.html embeds them), an RGB array (TensorBoard) or a PNG file (written atomically).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
BLUE, RED, GREY = "#1f77b4", "#d62728", "#7f7f7f"
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# --------------------------------------------------------------------------------------------- output
def figure(width_in: float, height_in: float) -> Figure:
    """An empty figure with constrained layout (labels and legends kept apart) and a white background."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained", facecolor="white")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.06)
    FigureCanvasAgg(fig)  # rendered by Agg, whatever backend matplotlib would pick for pyplot
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def rgb_array(fig: Figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 array (what TensorBoard's image logging takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG file, atomically (parent folders are created); returns the path."""
    from vascdist.fileio import atomic_write
    data = png_bytes(fig)
    atomic_write(path, lambda fh: fh.write(data))
    return Path(path)


def legend_below(ax, ncol: int = 1) -> None:
    """The axes' legend under the axes (outside them: it never covers data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=9,
                  frameon=False)


# --------------------------------------------------------------------------------------------- line charts
@dataclass
class Series:
    """One line: x, y and its legend label (NaN points are left out)."""
    x: np.ndarray
    y: np.ndarray
    label: str


def line_chart(series: list[Series], title: str, xlabel: str, ylabel: str,
               vline: tuple[float, str] | None = None) -> Figure:
    """Lines on one pair of axes, markers on every point (a line hidden under another stays visible), the
    legend below; `vline` = (x, label) draws a dashed vertical line (the best step)."""
    fig = figure(6.0, 4.2)
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        x, y = np.asarray(s.x, float), np.asarray(s.y, float)
        keep = np.isfinite(x) & np.isfinite(y)
        ax.plot(x[keep], y[keep], color=CYCLE[i % len(CYCLE)], lw=1.6 if i == 0 else 1.3,
                marker="o" if keep.sum() < 60 else None, ms=3.5, label=s.label, alpha=0.9)
    if vline is not None:
        ax.axvline(vline[0], color=GREY, ls="--", lw=1.2, label=vline[1])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    legend_below(ax, ncol=2)
    return fig


# --------------------------------------------------------------------------------------------- ROC and PR
@dataclass
class Curve:
    """Scores and binary labels of one set of predictions, drawn as one ROC and one PR line."""
    scores: np.ndarray
    labels: np.ndarray
    label: str
    thin: bool = False  # a fold beside the pooled curve


@dataclass
class OperatingPoint:
    """Where the reported metrics sit: sensitivity, 1 - specificity and PPV at the chosen threshold(s)."""
    sensitivity: float
    false_positive_rate: float
    ppv: float
    label: str


def roc_pr(curves: list[Curve], title: str, point: OperatingPoint | None = None) -> Figure:
    """ROC (left) and precision-recall (right) of each curve, AUC / AP in the legend. Chance lines: the
    diagonal in ROC, the prevalence of the first curve's labels in PR (a classifier that ignores its input
    has precision = prevalence at every recall). The operating point is ringed on both."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
    fig = figure(10.0, 4.8)
    fig.suptitle(title, fontsize=12)
    roc_ax, pr_ax = fig.subplots(1, 2)
    scored = []
    for c in curves:
        labels = np.asarray(c.labels).astype(int)
        scored.append((c, labels, roc_auc_score(labels, c.scores), average_precision_score(labels, c.scores)))
    thin = [(auc, ap) for c, _, auc, ap in scored if c.thin]
    span = lambda values: f"{min(values):.2f}" if len(set(values)) == 1 else f"{min(values):.2f}-{max(values):.2f}"
    first_thin = True
    for i, (c, labels, auc, ap) in enumerate(scored):
        colour = GREY if c.thin else CYCLE[i % len(CYCLE)]
        style = {"color": colour, "lw": 0.9 if c.thin else 2.0, "alpha": 0.6 if c.thin else 1.0}
        fpr, tpr, _ = roc_curve(labels, c.scores)
        precision, recall, _ = precision_recall_curve(labels, c.scores)
        if c.thin:  # one legend entry for all of them, with the range of their areas
            roc_label = f"{c.label} (AUC {span([a for a, _ in thin])})" if first_thin else None
            pr_label = f"{c.label} (AP {span([p for _, p in thin])})" if first_thin else None
            first_thin = False
        else:
            roc_label, pr_label = f"{c.label} (AUC {auc:.2f})", f"{c.label} (AP {ap:.2f})"
        roc_ax.plot(fpr, tpr, **style, label=roc_label)
        pr_ax.step(recall, precision, where="post", **style, label=pr_label)
    prevalence = float(np.mean(np.asarray(curves[0].labels) == 1))
    roc_ax.plot([0, 1], [0, 1], color=GREY, ls=":", lw=1, label="chance")
    pr_ax.axhline(prevalence, color=GREY, ls=":", lw=1, label=f"chance (prevalence {prevalence:.2f})")
    if point is not None:
        ring = {"s": 90, "facecolors": "none", "edgecolors": "black", "linewidths": 1.8, "zorder": 5,
                "clip_on": False}
        roc_ax.scatter([point.false_positive_rate], [point.sensitivity], **ring, label=point.label)
        if not math.isnan(point.ppv):
            pr_ax.scatter([point.sensitivity], [point.ppv], **ring, label=point.label)
    roc_ax.set(title="ROC", xlabel="1 - specificity", ylabel="sensitivity")
    pr_ax.set(title="precision-recall", xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    for ax in (roc_ax, pr_ax):
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        ax.grid(alpha=0.3)
        legend_below(ax)
    return fig


# --------------------------------------------------------------------------------------------- calibration
def reliability(levels: dict[str, dict], title: str, notes: dict[str, str] | None = None) -> Figure:
    """One column per level: observed frequency against mean prediction per bin (the diagonal is perfect
    calibration), each point labelled with its count, and the counts per bin as bars underneath.

    `levels` maps a level to calibration.reliability_bins' result plus 'binary' (bool); `notes` are printed
    under each column's title (ECE, Brier, slope)."""
    fig = figure(max(4.2 * len(levels), 5.0), 5.6)
    fig.suptitle(title, fontsize=12)
    grid = fig.add_gridspec(2, len(levels), height_ratios=(3, 1))
    for i, (level, r) in enumerate(levels.items()):
        ax = fig.add_subplot(grid[0, i])
        bars = fig.add_subplot(grid[1, i], sharex=ax)
        filled = r["count"] > 0
        ax.plot([0, 1], [0, 1], color=GREY, ls=":", lw=1, label="perfect calibration")
        ax.plot(r["mean_pred"][filled], r["observed"][filled], color=BLUE, marker="o", lw=1.5, label="observed")
        for x, y, n in zip(r["mean_pred"][filled], r["observed"][filled], r["count"][filled]):
            ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7, color="#333")
        heading = f"{level} (n={int(r['count'].sum())})"
        ax.set_title(heading + (f"\n{notes[level]}" if notes and level in notes else ""), fontsize=10)
        ax.set(xlim=(0, 1), ylim=(-0.03, 1.03),
               ylabel="observed positive fraction" if r["binary"] else "accuracy")
        ax.tick_params(labelbottom=False)
        ax.grid(alpha=0.3)
        edges = r["edges"]
        bars.bar(edges[:-1], r["count"], width=np.diff(edges), align="edge", color="#aec7e8", edgecolor="white")
        bars.set(xlabel="mean P(positive)" if r["binary"] else "mean confidence", ylabel="count")
        bars.set_ylim(0, max(float(r["count"].max()), 1.0) * 1.15)
        if i == 0:
            legend_below(bars, ncol=2)
    return fig


# --------------------------------------------------------------------------------------------- confusion
def confusion(cm: np.ndarray, classes: list[str], title: str) -> Figure:
    """Rows true, columns predicted; cells shaded by the row fraction, each with its count and row percentage."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = 1.2 + 1.1 * n
    fig = figure(size + 1.4, size)
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{100 * fraction[i, j]:.0f} %", ha="center", va="center", fontsize=10,
                    color="white" if fraction[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), classes, rotation=30 if n > 2 else 0, ha="right" if n > 2 else "center")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    return fig
