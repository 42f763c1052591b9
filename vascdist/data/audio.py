"""Recording -> float32 mono signal at the configured rate, band-passed to the bruit band."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from vascdist.compat import import_torchaudio
from vascdist.config import AudioConfig
from vascdist.errors import DataError

AF = import_torchaudio().functional

# torchaudio's biquads run through lfilter, which clamps its output to [-1, 1]. The filters are linear, so we
# filter a copy scaled to this peak (headroom for overshoot) and scale the result back.
_FILTER_PEAK = 0.25


def _zero_phase(x: torch.Tensor, biquad) -> torch.Tensor:
    """Apply a biquad forward then backward: zero phase (cycle onsets are not delayed) and twice the roll-off."""
    return biquad(biquad(x).flip(-1)).flip(-1)


def bandpass(x: torch.Tensor, sample_rate: int, cfg: AudioConfig) -> torch.Tensor:
    """Forward-backward 2nd-order Butterworth high-pass and low-pass: 4th-order (24 dB/octave) skirts, -6 dB
    at each corner, and no phase shift, so envelope timing (cycle onsets) is preserved."""
    peak = float(x.abs().max())
    if peak == 0.0:
        return x
    scale = _FILTER_PEAK / peak
    y = x * scale
    y = _zero_phase(y, lambda v: AF.highpass_biquad(v, sample_rate, cfg.bandpass_low_hz))
    y = _zero_phase(y, lambda v: AF.lowpass_biquad(v, sample_rate, cfg.bandpass_high_hz))
    return y / scale


def prepare_audio(samples: np.ndarray, source_rate: int, cfg: AudioConfig) -> np.ndarray:
    """In-memory samples (frames,) or (frames, channels) at source_rate -> float32 mono at cfg.sample_rate,
    band-passed between cfg.bandpass_low_hz and cfg.bandpass_high_hz.

    Raises DataError (without a file name; load_audio adds it) for empty or silent input.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)  # channels -> mono
    elif x.ndim != 1:
        raise DataError(f"expected samples shaped (frames,) or (frames, channels), got shape {x.shape}")
    if x.size == 0:
        raise DataError("empty recording (0 frames)")
    if not np.all(np.isfinite(x)):
        raise DataError("recording contains NaN or infinite samples")
    x = x - x.mean()
    rms = float(np.sqrt(np.mean(x ** 2)))
    if rms < cfg.min_rms:
        raise DataError(f"silent recording (RMS {rms:.2e} after removing DC is below "
                        f"preprocess.audio.min_rms={cfg.min_rms:g})")
    wave = torch.from_numpy(x)
    if source_rate != cfg.sample_rate:
        wave = AF.resample(wave, int(source_rate), int(cfg.sample_rate))
    return bandpass(wave, cfg.sample_rate, cfg).numpy().astype(np.float32)


def check_wav_length(path: Path) -> None:
    """A RIFF/WAVE file whose data chunk claims more bytes than the file holds is a truncated copy: libsndfile
    reads what is there without a word, so say it. Other formats are left to libsndfile."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        while True:  # walk the chunks to 'data'
            header = fh.read(8)
            if len(header) < 8:
                return  # no data chunk: libsndfile will say what is wrong
            chunk, length = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                held = size - fh.tell()
                if length > held and length != 0xFFFFFFFF:  # 0xFFFFFFFF: a stream writer's "unknown length"
                    raise DataError(f"{path}: truncated WAV file: its header promises {length} bytes of audio, "
                                    f"the file holds {held} ({held / length:.0%}); copy it again from the source")
                return
            fh.seek(length + (length & 1), 1)  # chunks are padded to an even length


def load_audio(path: str | Path, cfg: AudioConfig) -> np.ndarray:
    """Read any file soundfile reads -> float32 mono at cfg.sample_rate, band-passed (see prepare_audio).

    Every problem (missing, unreadable, empty, silent) is a DataError starting with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    check_wav_length(path)
    try:
        samples, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", "") or str(exc).splitlines()[0] or type(exc).__name__
        raise DataError(f"{path}: unreadable audio file ({reason})") from None
    try:
        return prepare_audio(samples, rate, cfg)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
