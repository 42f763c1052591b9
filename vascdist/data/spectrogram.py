"""Cardiac-cycle windows -> log-mel spectrograms of shape (1, n_mels, n_frames)."""

from __future__ import annotations

import numpy as np
import torch

from vascdist.compat import import_torchaudio
from vascdist.config import SpectrogramConfig

torchaudio = import_torchaudio()


def window_samples(cfg: SpectrogramConfig) -> int:
    """Samples per cycle window: with center=True framing, hop*(n_frames-1) samples give exactly n_frames frames."""
    return cfg.hop_length * (cfg.n_frames - 1)


def cycle_windows(signal: np.ndarray, onsets: np.ndarray, cfg: SpectrogramConfig, pad_fraction: float = 0.0,
                  period: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a fixed-length window starting at each onset.

    A window running past the end of `signal` is kept if at most `pad_fraction` of it is missing; the missing
    part continues the sound one `period` (samples) earlier, i.e. with the same phase of the previous cycle
    (without a period: the last samples repeated), so a short clip keeps its last beat and no window ends in
    an artificial silence that only short clips would show. Windows missing more are dropped.

    Returns (windows [N, L] float32, kept cycle numbers [N]). A cycle longer than the window is cropped,
    a shorter one runs into the next cycle's start: every window has the same duration, so the frequency
    and time axes mean the same thing in every spectrogram.
    """
    length = window_samples(cfg)
    n = len(signal)
    kept = [i for i, start in enumerate(onsets) if 0 <= start < n and start + length - n <= pad_fraction * length]
    if not kept:
        return np.zeros((0, length), np.float32), np.zeros(0, np.int64)
    windows = np.empty((len(kept), length), np.float32)
    for row, i in enumerate(kept):
        idx = np.arange(onsets[i], onsets[i] + length)
        over = idx >= n
        if over.any():
            missing = int(over.sum())
            step = min(n, period if period else missing)  # repeat whole periods, never reach before the start
            idx[over] = n - step + (idx[over] - n) % step
        windows[row] = signal[idx]
    return windows, np.asarray(kept, np.int64)


class LogMel(torch.nn.Module):
    """torchaudio MelSpectrogram + AmplitudeToDB, applied per window so top_db clips each cycle on its own."""

    def __init__(self, cfg: SpectrogramConfig, sample_rate: int):
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
            f_min=cfg.f_min, f_max=cfg.f_max, power=2.0, center=True)
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=cfg.top_db)

    @torch.no_grad()
    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (N, L) -> (N, 1, n_mels, n_frames) in dB."""
        # (N, 1, L) -> (N, 1, F, T): amplitude_to_DB takes its top_db reference over dims (-3, -2, -1),
        # so the singleton channel keeps that reference per window rather than per batch.
        spec = self.to_db(self.mel(windows.unsqueeze(1)))
        return spec[..., : self.cfg.n_frames]


def input_features(spec: np.ndarray) -> np.ndarray:
    """A recording's input features (abstain.InputProfile: per band, the mean log-mel and its mean spread within a
    window; what predict compares with the training recordings'): spec [N, 1, n_mels, n_frames] -> [2 * n_mels]."""
    x = np.asarray(spec, np.float64)[:, 0]  # (N, M, T)
    return np.concatenate([x.mean(axis=(0, 2)), x.std(axis=2).mean(axis=0)])
