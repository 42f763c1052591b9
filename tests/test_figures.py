"""The figures of vascdist.plots: each one decodes as a PNG and carries what it claims (chance lines, operating
point, counts, time axes, colour bar); `vascdist inspect` on a synthesized recording."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from vascdist import plots


def _decodes(figure) -> Image.Image:
    image = Image.open(io.BytesIO(plots.png_bytes(figure)))
    image.load()
    assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    return image


def test_roc_pr_chance_at_prevalence_and_the_operating_point():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.2).astype(int)  # prevalence 0.2, far from the ROC diagonal's 0.5
    scores = np.clip(0.3 * labels + rng.normal(0.4, 0.2, 200), 0, 1)
    point = plots.OperatingPoint(0.7, 0.25, 0.4, "operating point (threshold 0.50)")
    figure = plots.roc_pr([plots.Curve(scores, labels, "test")], "test, per recording", point)
    roc_ax, pr_ax = figure.axes
    chance = [line for line in pr_ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and np.allclose(chance[0].get_ydata(), labels.mean())
    (ring,) = pr_ax.collections
    assert np.allclose(ring.get_offsets(), [[0.7, 0.4]])
    assert np.allclose(roc_ax.collections[0].get_offsets(), [[0.25, 0.7]])
    for ax in (roc_ax, pr_ax):  # legends sit below the axes, outside the data
        figure.canvas.draw()
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    _decodes(figure)


def test_line_chart_confusion_and_reliability_decode(tmp_path):
    series = [plots.Series(np.arange(5), np.linspace(1, 0.2, 5), "train loss"),
              plots.Series(np.arange(5), np.array([1, 0.5, np.nan, 0.4, 0.45]), "validation loss")]
    _decodes(plots.line_chart(series, "loss", "step", "loss", (3, "best step 3")))
    path = plots.save_png(plots.confusion(np.array([[5, 1], [2, 7]]), ["normal", "stenosis"], "t"), tmp_path / "c.png")
    assert Image.open(path).format == "PNG"


@pytest.mark.slow
def test_inspect_on_a_synthesized_recording(synth_dir, tmp_path):
    from vascdist.config import PreprocessConfig
    from vascdist.inspect import render
    wav = sorted((synth_dir / "wav").rglob("*.wav"))[0]
    figure = render(wav, PreprocessConfig())
    labels = {ax.get_xlabel() for ax in figure.axes}
    assert {"time (s)", "lag (s)", "time in window (s)"} <= labels
    assert any(ax.get_ylabel() == "log-mel (dB)" for ax in figure.axes)  # the colour bar
    assert str(wav.parent) not in figure.texts[0].get_text() + "".join(f.get_suptitle() for f in figure.subfigs)
    out = tmp_path / "x.png"
    result = run_cli("inspect", str(wav), "--out", str(out))
    assert result.returncode == 0 and f"wrote {out}" in result.stdout, result.stderr
    assert Image.open(out).size[0] >= 1000
