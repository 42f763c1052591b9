"""find_cycle_onsets against the true onsets of synthetic recordings, and its refusal of too-short audio."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from vascdist.config import AudioConfig, CycleConfig
from vascdist.data.audio import load_audio, prepare_audio
from vascdist.data.cycles import find_cycle_onsets
from vascdist.data.synth import draw_patient, render_recording, synthesize
from vascdist.errors import DataError

AUDIO, CYCLES = AudioConfig(), CycleConfig()


def _recall(true_s: np.ndarray, found_s: np.ndarray, tolerance_s: float = 0.05) -> tuple[int, int]:
    """(true onsets with a detected onset within tolerance, true onsets)."""
    nearest = np.abs(true_s[:, None] - found_s[None, :]).min(axis=1)
    return int((nearest <= tolerance_s).sum()), len(true_s)


def test_recovers_true_onsets_at_default_snr(tmp_path):
    manifest = synthesize(tmp_path, n_patients=4, seed=11)
    truth = json.loads((tmp_path / "onsets.json").read_text())
    hits = total = 0
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            signal = load_audio(tmp_path / row["path"], AUDIO)
            onsets = find_cycle_onsets(signal, AUDIO.sample_rate, CYCLES)
            assert onsets.dtype == np.int64 and np.all(np.diff(onsets) > 0)
            h, n = _recall(np.array(truth[row["recording_id"]]), onsets / AUDIO.sample_rate)
            hits, total = hits + h, total + n
    print(f"onset recall within 50 ms: {hits / total:.3f} ({hits}/{total})")
    assert hits / total >= 0.95


def test_clear_recording_is_tracked_beat_for_beat():
    rng = np.random.default_rng(5)
    patient = dataclasses.replace(draw_patient(rng, "p"), heart_rate_bpm=72.0, severity=0.6, diastolic_fraction=0.2)
    samples, truth = render_recording(rng, patient, "mid_fistula", 4000, 12.0, snr_db=20.0)
    onsets = find_cycle_onsets(prepare_audio(samples, 4000, AUDIO), 4000, CYCLES)
    hits, total = _recall(truth, onsets / 4000)
    # One beat here starts under a motion burst (100x the median energy); every other beat is found, and no
    # extra ones are invented.
    assert hits >= total - 1 and abs(len(onsets) - total) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_too_short_for_two_cycles_raises(seed):
    rng = np.random.default_rng(seed)
    patient = dataclasses.replace(draw_patient(rng, "p"), heart_rate_bpm=60.0)
    samples, _ = render_recording(rng, patient, "mid_fistula", 4000, 1.0)  # one beat at 60 bpm
    with pytest.raises(DataError, match=r"fewer than 2 cardiac cycles found in 1\.0 s of audio"):
        find_cycle_onsets(prepare_audio(samples, 4000, AUDIO), 4000, CYCLES)


def test_noise_without_heartbeats_or_a_blip_is_rejected():
    with pytest.raises(DataError, match="fewer than 2 cardiac cycles"):
        find_cycle_onsets(np.zeros(400, np.float32), 4000, CYCLES)
