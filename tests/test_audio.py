"""load_audio / prepare_audio on real files written to tmp_path: format handling, band-pass, and bad input."""

import numpy as np
import pytest
import soundfile as sf

from vascdist.config import AudioConfig
from vascdist.data.audio import load_audio, prepare_audio
from vascdist.errors import DataError

CFG = AudioConfig()


def _tone_power(x: np.ndarray, rate: int, hz: float) -> float:
    """Power of the FFT bin nearest `hz` (x is an integer number of periods long in these tests)."""
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    return float(spectrum[int(round(hz * len(x) / rate))])


def test_multichannel_float_44k1_loads_as_mono_4k(tmp_path):
    rate, seconds = 44100, 2.0
    t = np.arange(int(rate * seconds)) / rate
    left = 0.3 * np.sin(2 * np.pi * 200 * t)
    right = 0.3 * np.sin(2 * np.pi * 200 * t) + 0.2 * np.sin(2 * np.pi * 5 * t)  # 5 Hz: below the band
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1).astype(np.float32), rate, subtype="FLOAT")

    x = load_audio(path, CFG)

    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == int(seconds * CFG.sample_rate)
    # The 200 Hz tone is in band: mean of the channels keeps it at amplitude 0.3 (RMS 0.212).
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)
    # The 5 Hz component (right channel only) is removed by the 25 Hz high-pass.
    assert _tone_power(x, CFG.sample_rate, 5) < 1e-3 * _tone_power(x, CFG.sample_rate, 200)


def test_bandpass_removes_out_of_band_tone_in_memory():
    rate = 8000
    t = np.arange(rate * 2) / rate
    x = prepare_audio(0.2 * np.sin(2 * np.pi * 300 * t) + 0.2 * np.sin(2 * np.pi * 1950 * t), rate, CFG)
    # 1950 Hz is above the 1800 Hz corner and (after resampling to 4 kHz) near Nyquist: strongly attenuated.
    assert _tone_power(x, CFG.sample_rate, 1950) < 0.01 * _tone_power(x, CFG.sample_rate, 300)


def test_loud_signal_is_not_clipped_by_the_filters():
    rate = 4000
    t = np.arange(rate * 2) / rate
    x = prepare_audio(0.99 * np.sign(np.sin(2 * np.pi * 100 * t)), rate, CFG)  # square wave at full scale
    assert np.abs(x).max() > 1.0  # torchaudio's lfilter would have clamped the Gibbs overshoot to 1


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"),
    ("corrupt", "unreadable"),
    ("zero_bytes", "empty"),
    ("no_frames", "empty"),
    ("silent", "silent"),
])
def test_bad_files_raise_dataerror_naming_the_file(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "no_frames":
        sf.write(path, np.zeros((0, 1), np.float32), 4000)
    elif kind == "silent":
        sf.write(path, np.full(8000, 0.25, np.float32), 4000, subtype="FLOAT")  # pure DC is silent

    with pytest.raises(DataError) as info:
        load_audio(path, CFG)
    message = str(info.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message
