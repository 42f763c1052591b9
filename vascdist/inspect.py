"""`vascdist inspect FILE.wav`: one PNG of what preprocessing did to a recording, drawn with Pillow.

Panels, top to bottom: the band-passed waveform with the detected onsets and the windows cut from them; the
log energy envelope with the same onsets; the autocorrelation the heart period was taken from (the searched
lag range shaded, the chosen lag marked); the log-mel spectrograms of the first few windows, as the model
sees them before the train-split normalisation. The header gives heart rate, periodicity and the quality record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vascdist.config import PreprocessConfig
from vascdist.data import cycles as cyc
from vascdist.data.audio import load_audio_stats
from vascdist.data.preprocess import analyse_recording
from vascdist.data.spectrogram import window_samples
from vascdist.fileio import atomic_write

WIDTH = 1400
PANEL = 170  # height of each signal panel
MARGIN = 50
ONSET = (200, 30, 30)
WINDOW_COLOURS = ((70, 130, 220), (90, 190, 120))
INK = (20, 20, 20)
GRID = (215, 215, 215)


def _frame(draw: ImageDraw.ImageDraw, top: int, title: str) -> tuple[int, int, int, int]:
    box = (MARGIN, top + 16, WIDTH - MARGIN // 2, top + PANEL)
    draw.rectangle(box, outline=GRID)
    draw.text((MARGIN, top + 2), title, fill=INK)
    return box


def _trace(draw, box, x: np.ndarray, y: np.ndarray, x_range: tuple[float, float], colour=INK) -> None:
    """Polyline of (x, y) scaled into box; y by its own min/max."""
    x0, y0, x1, y1 = box
    lo, hi = float(np.min(y)), float(np.max(y))
    span = hi - lo or 1.0
    px = x0 + (x - x_range[0]) / (x_range[1] - x_range[0]) * (x1 - x0)
    py = y1 - 4 - (y - lo) / span * (y1 - y0 - 8)
    draw.line(list(zip(px.tolist(), py.tolist())), fill=colour, width=1)


def _vlines(draw, box, times: np.ndarray, duration: float, colour) -> None:
    x0, y0, x1, y1 = box
    for t in times:
        px = x0 + t / duration * (x1 - x0)
        draw.line([(px, y0), (px, y1)], fill=colour, width=1)


def _colour_map(z: np.ndarray) -> np.ndarray:
    """[0, 1] -> a dark-blue..yellow RGB ramp (uint8), readable in print."""
    stops = np.array([[10, 10, 60], [60, 40, 140], [190, 60, 90], [250, 170, 40], [250, 250, 160]], float)
    pos = np.clip(z, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def render(path: str | Path, cfg: PreprocessConfig, n_mels_shown: int = 4) -> Image.Image:
    """The inspection picture of one recording (see the module docstring)."""
    signal, stats = load_audio_stats(path, cfg.audio)
    rate = cfg.audio.sample_rate
    seg = cyc.segment(signal, rate, cfg.cycles)
    spec, cycles, quality = analyse_recording(signal, cfg, stats)
    duration = len(signal) / rate
    height = 70 + 3 * (PANEL + 10) + 190
    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    hr = f"{quality['heart_rate_bpm']:.1f} bpm" if quality["heart_rate_bpm"] else "no heart rate"
    state = "periodic" if seg.periodic else f"APERIODIC: {seg.reason}; fixed windows every {cfg.cycles.aperiodic_hop_s:g} s"
    draw.text((MARGIN, 8), f"{path}", fill=INK)
    draw.text((MARGIN, 24), f"{duration:.1f} s ({quality['sound_s']:.1f} s of sound), heart rate {hr}, periodicity "
              f"{seg.periodicity:.2f} ({state}); {len(seg.onsets)} onsets -> {len(spec)} windows", fill=INK)
    draw.text((MARGIN, 40), f"level {quality['level_dbfs']} dBFS, SNR >= {quality['snr_db']} dB, clipping "
              f"{quality['clipping_fraction']}, source {stats.source_rate} Hz", fill=INK)

    # Waveform: min/max per pixel column, windows as bands above it, onsets as red lines.
    top = 60
    box = _frame(draw, top, "band-passed waveform; bands: the windows cut (alternating colours), red: onsets")
    x0, y0, x1, y1 = box
    cols = x1 - x0
    edges = np.linspace(0, len(signal), cols + 1).astype(int)
    peak = float(np.abs(signal).max()) or 1.0
    mid = (y0 + y1) / 2
    for c in range(cols):
        part = signal[edges[c]:max(edges[c + 1], edges[c] + 1)]
        draw.line([(x0 + c, mid - part.max() / peak * (mid - y0 - 12)), (x0 + c, mid - part.min() / peak * (mid - y0 - 12))],
                  fill=(90, 90, 90))
    length = window_samples(cfg.spectrogram)
    for k, c in enumerate(cycles):
        a = x0 + seg.onsets[c] / len(signal) * cols
        b = x0 + min(seg.onsets[c] + length, len(signal)) / len(signal) * cols
        band = y0 + 2 + 5 * (k % 2)
        draw.rectangle((a, band, b, band + 4), fill=WINDOW_COLOURS[k % 2])
    _vlines(draw, box, seg.onsets / rate, duration, ONSET)

    # Log envelope with onsets.
    top += PANEL + 10
    box = _frame(draw, top, "log energy envelope (dB) with onsets")
    env_t = (np.arange(len(seg.envelope)) + 0.5) * seg.hop / rate
    _trace(draw, box, env_t, 10 * np.log10(seg.envelope + 1e-12), (0.0, duration))
    _vlines(draw, box, seg.onsets / rate, duration, ONSET)

    # Autocorrelation of the pulsatility signal, over lags 0..2 x the longest period.
    top += PANEL + 10
    env_rate = rate / seg.hop
    a, b = seg.active[0] // seg.hop, seg.active[1] // seg.hop
    max_lag_s = 2 * 60.0 / cfg.cycles.min_bpm
    title = "autocorrelation of the pulsatile log envelope; shaded: heart rates searched; red: the period"
    box = _frame(draw, top, title)
    if b - a > 3:
        z = cyc.pulsatility(cyc.log_envelope(seg.envelope[a:b], cyc.PERIOD_LOG_FLOOR), env_rate, cfg.cycles)
        r = cyc.autocorrelation(z)[: int(max_lag_s * env_rate)]
        lo_s, hi_s = 60.0 / cfg.cycles.max_bpm, 60.0 / cfg.cycles.min_bpm
        bx0, by0, bx1, by1 = box
        scale = (bx1 - bx0) / max_lag_s
        draw.rectangle((bx0 + lo_s * scale, by0 + 1, bx0 + hi_s * scale, by1 - 1), fill=(235, 240, 250))
        zero = by1 - 4 - (0 - r.min()) / ((r.max() - r.min()) or 1) * (by1 - by0 - 8)
        draw.line([(bx0, zero), (bx1, zero)], fill=GRID)
        _trace(draw, box, np.arange(len(r)) / env_rate, r, (0.0, max_lag_s))
        if seg.period_s:
            _vlines(draw, box, np.array([seg.period_s]), max_lag_s, ONSET)
        draw.text((bx1 - 160, by0 + 4), f"lags 0..{max_lag_s:.1f} s", fill=INK)

    # Log-mel of the first windows.
    top += PANEL + 10
    draw.text((MARGIN, top), f"log-mel of the first {min(n_mels_shown, len(spec))} windows "
              f"({cfg.spectrogram.n_mels} mel bands x {cfg.spectrogram.n_frames} frames, low frequencies at the bottom)",
              fill=INK)
    shown = spec[:n_mels_shown, 0]
    lo, hi = float(shown.min()), float(shown.max())
    for k, m in enumerate(shown):
        tile = _colour_map((m[::-1] - lo) / ((hi - lo) or 1.0))
        tile = Image.fromarray(tile).resize((300, 150), Image.NEAREST)
        img.paste(tile, (MARGIN + k * 320, top + 18))
        draw.text((MARGIN + k * 320, top + 170), f"window {k} at {seg.onsets[cycles[k]] / rate:.2f} s", fill=INK)
    return img


def inspect_file(path: str | Path, cfg: PreprocessConfig, out: str | Path | None = None) -> Path:
    """Render `path` and write the PNG (default: next to the recording, FILE.inspect.png); returns its path."""
    out_path = Path(out) if out else Path(path).with_suffix(".inspect.png")
    image = render(path, cfg)
    atomic_write(out_path, lambda fh: image.save(fh, format="PNG"))
    return out_path

