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


def cycle_windows(signal: np.ndarray, onsets: np.ndarray, cfg: SpectrogramConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cut a fixed-length window starting at each onset; windows running past the end are dropped.

    Returns (windows [N, L] float32, kept cycle numbers [N]). A cycle longer than the window is cropped,
    a shorter one runs into the next cycle's start: every window has the same duration, so the frequency
    and time axes mean the same thing in every spectrogram.
    """
    length = window_samples(cfg)
    kept = [i for i, start in enumerate(onsets) if start >= 0 and start + length <= len(signal)]
    if not kept:
        return np.zeros((0, length), np.float32), np.zeros(0, np.int64)
    starts = np.asarray(onsets)[kept]
    windows = np.stack([signal[s:s + length] for s in starts]).astype(np.float32)
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
