"""`vascdist inspect FILE.wav`: one PNG of what preprocessing did to a recording (drawn by vascdist.plots'
matplotlib figures).

Panels, top to bottom: the band-passed waveform with the detected onsets and the windows cut from them; the
log energy envelope with the same onsets (both against time in seconds); the autocorrelation the heart period
was taken from (the searched lag range shaded, the chosen lag marked); the log-mel spectrograms of the first
few windows, as the model sees them before the train-split normalisation, against time within the window and
mel band, with a colour bar in dB. The header gives heart rate, periodicity and the quality record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vascdist import plots
from vascdist.config import PreprocessConfig
from vascdist.data import cycles as cyc
from vascdist.data.audio import load_audio_stats
from vascdist.data.preprocess import analyse_recording
from vascdist.data.spectrogram import window_samples

ONSET = "#c81e1e"
WINDOW_COLOURS = ("#4682dc", "#5abe78")


def render(path: str | Path, cfg: PreprocessConfig, n_mels_shown: int = 4):
    """The inspection picture of one recording (see the module docstring), a matplotlib Figure."""
    signal, stats = load_audio_stats(path, cfg.audio)
    rate = cfg.audio.sample_rate
    seg = cyc.segment(signal, rate, cfg.cycles)
    spec, cycles, quality = analyse_recording(signal, cfg, stats)

    fig = plots.figure(14.0, 13.0)
    fig.suptitle(_header(Path(path).name, len(signal) / rate, seg, len(spec), quality, stats, cfg), fontsize=11)
    top, bottom = fig.subfigures(2, 1, height_ratios=(3, 1.25))
    wave_ax, env_ax, acf_ax = top.subplots(3, 1)
    _draw_waveform(wave_ax, env_ax, signal, seg, cycles, cfg)
    _draw_autocorrelation(acf_ax, seg, cfg)
    for ax in (wave_ax, env_ax, acf_ax):
        ax.grid(alpha=0.25)
    _draw_windows(bottom, spec[:n_mels_shown, 0], seg, cycles, cfg, n_mels_shown)
    return fig


def _header(name: str, duration: float, seg, n_windows: int, quality: dict, stats, cfg: PreprocessConfig) -> str:
    """The figure's title: length, heart rate, periodicity, windows and the quality record."""
    hr = f"{quality['heart_rate_bpm']:.1f} bpm" if quality["heart_rate_bpm"] else "no heart rate"
    state = "periodic" if seg.periodic else f"APERIODIC: {seg.reason}; fixed windows every {cfg.cycles.aperiodic_hop_s:g} s"
    return (f"{name}: {duration:.1f} s ({quality['sound_s']:.1f} s of sound), heart rate {hr}, "
            f"periodicity {seg.periodicity:.2f} ({state}); {len(seg.onsets)} onsets -> {n_windows} windows\n"
            f"level {quality['level_dbfs']} dBFS, SNR >= {quality['snr_db']} dB, clipping "
            f"{quality['clipping_fraction']}, source {stats.source_rate} Hz")


def _draw_waveform(wave_ax, env_ax, signal: np.ndarray, seg, cycles, cfg: PreprocessConfig) -> None:
    """Waveform with the windows cut as alternating bands along the top; the log envelope below; onsets in red
    on both."""
    rate = cfg.audio.sample_rate
    duration = len(signal) / rate
    peak = float(np.abs(signal).max()) or 1.0
    wave_ax.plot(np.arange(len(signal)) / rate, signal / peak, color="#555555", lw=0.4)
    length = window_samples(cfg.spectrogram)
    for k, c in enumerate(cycles):
        start = seg.onsets[c] / rate
        end = min(seg.onsets[c] + length, len(signal)) / rate
        band = 1.08 + 0.1 * (k % 2)
        wave_ax.plot([start, end], [band, band], color=WINDOW_COLOURS[k % 2], lw=3, solid_capstyle="butt")
    for ax in (wave_ax, env_ax):
        for t in seg.onsets / rate:
            ax.axvline(t, color=ONSET, lw=0.7, alpha=0.8)
        ax.set_xlim(0, duration)
        ax.set_xlabel("time (s)")
    wave_ax.set(ylim=(-1.05, 1.28), ylabel="amplitude / peak",
                title="band-passed waveform; bars: the windows cut (alternating colours); red: onsets")
    env_t = (np.arange(len(seg.envelope)) + 0.5) * seg.hop / rate
    env_ax.plot(env_t, 10 * np.log10(seg.envelope + 1e-12), color="#222222", lw=0.9)
    env_ax.set(ylabel="dB", title="log energy envelope with onsets")


def _draw_autocorrelation(acf_ax, seg, cfg: PreprocessConfig) -> None:
    """Autocorrelation of the pulsatility signal over lags 0..2 x the longest period: the searched range shaded,
    the chosen period in red."""
    env_rate = cfg.audio.sample_rate / seg.hop
    a, b = seg.active[0] // seg.hop, seg.active[1] // seg.hop
    max_lag_s = 2 * 60.0 / cfg.cycles.min_bpm
    acf_ax.set(xlim=(0, max_lag_s), xlabel="lag (s)", ylabel="autocorrelation",
               title="autocorrelation of the pulsatile log envelope; shaded: heart rates searched; red: the period")
    if b - a <= 3:
        return
    z = cyc.pulsatility(cyc.log_envelope(seg.envelope[a:b], cyc.PERIOD_LOG_FLOOR), env_rate, cfg.cycles)
    r = cyc.autocorrelation(z)[: int(max_lag_s * env_rate)]
    acf_ax.axvspan(60.0 / cfg.cycles.max_bpm, 60.0 / cfg.cycles.min_bpm, color="#dfe7f7")
    acf_ax.axhline(0, color="#bbbbbb", lw=0.8)
    acf_ax.plot(np.arange(len(r)) / env_rate, r, color="#222222", lw=1)
    if seg.period_s:
        acf_ax.axvline(seg.period_s, color=ONSET, lw=1.2)


def _draw_windows(bottom, shown: np.ndarray, seg, cycles, cfg: PreprocessConfig, n_shown: int) -> None:
    """Log-mel of the first windows (K, n_mels, n_frames), on one colour scale, with a colour bar."""
    spec_cfg, rate = cfg.spectrogram, cfg.audio.sample_rate
    window_s = spec_cfg.hop_length * (spec_cfg.n_frames - 1) / rate
    bottom.suptitle(f"log-mel of the first {len(shown)} windows ({spec_cfg.n_mels} mel bands, "
                    f"{spec_cfg.f_min:g}-{spec_cfg.f_max:g} Hz, x {spec_cfg.n_frames} frames)", fontsize=10)
    tiles = bottom.subplots(1, max(n_shown, 1), squeeze=False)[0]
    lo, hi = (float(shown.min()), float(shown.max())) if len(shown) else (0.0, 1.0)
    image = None
    for k, ax in enumerate(tiles):
        if k >= len(shown):
            ax.axis("off")
            continue
        image = ax.imshow(shown[k], origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi,
                          extent=(0, window_s, 0, spec_cfg.n_mels))
        ax.set(title=f"window {k} at {seg.onsets[cycles[k]] / rate:.2f} s", xlabel="time in window (s)")
        ax.set_ylabel("mel band" if k == 0 else "")
    if image is not None:
        bottom.colorbar(image, ax=list(tiles), label="log-mel (dB)", shrink=0.9)


def inspect_file(path: str | Path, cfg: PreprocessConfig, out: str | Path | None = None) -> Path:
    """Render `path` and write the PNG (default: next to the recording, FILE.inspect.png); returns its path."""
    out_path = Path(out) if out else Path(path).with_suffix(".inspect.png")
    return plots.save_png(render(path, cfg), out_path)

