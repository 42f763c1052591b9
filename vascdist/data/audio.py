"""Recording -> float32 mono signal at the configured rate, band-passed to the bruit band.

Files are read block by block and resampled as they are read (`StreamResampler`), so a 10-minute 192 kHz
24-bit recording never sits in memory at its own rate: only the 4 kHz result does.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import hashlib

import numpy as np
import soundfile as sf
from scipy import signal as sps

from vascdist.config import AudioConfig
from vascdist.errors import DataError
from vascdist.fileio import not_a_readable_file

SYNTH_MARK = "vascdist synth"
"""Written into the comment of every file `vascdist synth` makes, so that a shard set knows its source."""
CLIP_LEVEL = 0.999  # a sample at or beyond this fraction of full scale counts as clipped
READ_BLOCK = 1 << 18  # frames read per block (about 1.4 s at 192 kHz)


class NoSignal(DataError):
    """A readable recording with nothing in it (no frames, or silent): predict gives it no verdict."""


@dataclass
class AudioStats:
    """What the raw samples say about the recorder, before any filtering."""
    source_rate: int
    frames: int
    clipping_fraction: float
    """Fraction of samples (after the channel mix) at or beyond CLIP_LEVEL of full scale."""
    peak_dbfs: float
    band_fraction: float = 1.0
    """Fraction of the signal's power (after DC removal, at the configured rate) inside the band-pass band."""
    synthetic: bool = False
    """Whether the file carries the mark `vascdist synth` writes (SYNTH_MARK in its comment)."""
    content_sha256: str = ""
    """sha256 of the decoded samples (float64, after the channel mix): equal for the same audio in any container."""


def bandpass(x: np.ndarray, sample_rate: int, cfg: AudioConfig) -> np.ndarray:
    """Forward-backward 2nd-order Butterworth band-pass (second-order sections, scipy's sosfiltfilt): 4th-order
    (24 dB/octave) skirts, -6 dB at each corner, and no phase shift, so envelope timing (cycle onsets) is
    preserved. Second-order sections stay stable at low corners relative to the rate and do not clip."""
    if len(x) < 16:  # shorter than the filter's edge padding: nothing to band-pass
        return x
    sos = sps.butter(2, [cfg.bandpass_low_hz, cfg.bandpass_high_hz], btype="bandpass", fs=sample_rate, output="sos")
    return sps.sosfiltfilt(sos, x, padlen=min(len(x) - 1, 3 * 2 * len(sos) + 1))


class StreamResampler:
    """Polyphase resampling (scipy's resample_poly) of a signal that arrives in blocks, with bounded memory.

    Each block is resampled with `margin` input samples of its neighbours on either side and the outputs that
    belong to the margins are dropped, so the result equals resampling the whole signal at once up to the
    FIR filter's edge effects at the very start and end (the margin is longer than the filter's half-length).
    """

    def __init__(self, source_rate: int, target_rate: int):
        g = gcd(int(source_rate), int(target_rate))
        self.up, self.down = int(target_rate) // g, int(source_rate) // g
        half = 10 * max(self.up, self.down)  # resample_poly's default filter half-length, in upsampled samples
        self.margin = self.down * (half // self.up // self.down + 2)  # input samples, a multiple of down
        self.pending = np.zeros(0)  # input not yet consumed (the next block's left margin included)
        self.left = np.zeros(0)
        self.out: list[np.ndarray] = []

    def _emit(self, block: np.ndarray, final: bool) -> None:
        """Resample `block` = left margin + body + right margin; keep only the body's output."""
        y = sps.resample_poly(block, self.up, self.down)
        start = len(self.left) * self.up // self.down
        stop = len(y) if final else len(y) - self.margin * self.up // self.down
        self.out.append(y[start:stop])

    def feed(self, x: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, x])
        step = max(self.down, (READ_BLOCK // self.down) * self.down)
        while len(self.pending) >= step + self.margin:
            body = self.pending[:step]
            self._emit(np.concatenate([self.left, body, self.pending[step:step + self.margin]]), final=False)
            self.left = body[-self.margin:] if len(body) >= self.margin else body
            self.pending = self.pending[step:]

    def finish(self) -> np.ndarray:
        if len(self.pending):
            self._emit(np.concatenate([self.left, self.pending]), final=True)
        return np.concatenate(self.out) if self.out else np.zeros(0)


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
    if source_rate != cfg.sample_rate:
        resampler = StreamResampler(source_rate, cfg.sample_rate)
        resampler.feed(x)
        x = resampler.finish()
    return _finish(x, cfg)


def _finish(x: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """DC removal, silence check and band-pass of a signal already at cfg.sample_rate."""
    if x.size == 0:
        raise NoSignal("empty recording (0 frames)")
    x = x - x.mean()
    rms = float(np.sqrt(np.mean(x ** 2)))
    if rms < cfg.min_rms:
        raise NoSignal(f"silent recording (RMS {rms:.2e} after removing DC is below "
                        f"preprocess.audio.min_rms={cfg.min_rms:g})")
    return bandpass(x, cfg.sample_rate, cfg).astype(np.float32)


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


def load_audio_stats(path: str | Path, cfg: AudioConfig) -> tuple[np.ndarray, AudioStats]:
    """Read any file soundfile reads, block by block -> (float32 mono at cfg.sample_rate, band-passed; the raw
    samples' AudioStats). Memory holds one block at the file's rate plus the result at cfg.sample_rate.

    Every problem (missing, unreadable, empty, silent, NaN) is a DataError starting with the path.
    """
    path = Path(path)
    problem = not_a_readable_file(path)  # a loop, a directory or a FIFO is named as such (a FIFO would block)
    if problem:
        raise DataError(f"{path}: {problem}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    check_wav_length(path)
    try:
        with sf.SoundFile(str(path)) as fh:
            rate = fh.samplerate
            resampler = StreamResampler(rate, cfg.sample_rate) if rate != cfg.sample_rate else None
            parts, frames, clipped, peak = [], 0, 0, 0.0
            content = hashlib.sha256()
            for block in fh.blocks(blocksize=READ_BLOCK, dtype="float64", always_2d=True):
                x = block.mean(axis=1)
                if not np.all(np.isfinite(x)):
                    raise DataError(f"{path}: recording contains NaN or infinite samples")
                frames += len(x)
                content.update(x.tobytes())
                clipped += int(np.count_nonzero(np.abs(block) >= CLIP_LEVEL))
                peak = max(peak, float(np.abs(block).max(initial=0.0)))
                if resampler is None:
                    parts.append(x)
                else:
                    resampler.feed(x)
            channels = fh.channels
            synthetic = SYNTH_MARK in (fh.comment or "")
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", "") or str(exc).splitlines()[0] or type(exc).__name__
        raise DataError(f"{path}: unreadable audio file ({reason})") from None
    if frames == 0:
        raise NoSignal(f"{path}: empty recording (0 frames)")
    x = resampler.finish() if resampler is not None else np.concatenate(parts)
    try:
        y = _finish(x, cfg)
    except NoSignal as exc:
        raise NoSignal(f"{path}: {exc}") from None
    raw_power = float(np.var(x))  # the power _finish band-passes, after its DC removal
    band = float(np.mean(np.square(y, dtype=np.float64))) / raw_power if raw_power > 0 else 0.0
    stats = AudioStats(rate, frames, clipped / (frames * channels), 20 * np.log10(max(peak, 1e-12)),
                       min(band, 1.0), synthetic, content.hexdigest())
    return y, stats


def load_audio(path: str | Path, cfg: AudioConfig) -> np.ndarray:
    """Read any file soundfile reads -> float32 mono at cfg.sample_rate, band-passed (see load_audio_stats)."""
    return load_audio_stats(path, cfg)[0]
