"""Cycle segmentation against the true onsets of synthetic recordings and on the two shared real recordings:
period only at true autocorrelation peaks, periodicity score, aperiodic fallback, first-window phase."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from vascdist.config import AudioConfig, CycleConfig, PreprocessConfig
from vascdist.data.audio import load_audio, prepare_audio
from vascdist.data.cycles import _refine, find_cycle_onsets, local_maxima, segment
from vascdist.data.preprocess import analyse_recording
from vascdist.data.synth import draw_patient, render_recording, synthesize
from vascdist.errors import DataError

AUDIO, CYCLES = AudioConfig(), CycleConfig()
# The README there: 65-72 bpm, about 41-45 cycles in each 37.5-s file (arterial strongly, venous weakly periodic).
REAL_BPM, REAL_CYCLES = (65.0, 72.0), (41, 45)


def _recall(true_s: np.ndarray, found_s: np.ndarray, tolerance_s: float = 0.05) -> tuple[int, int]:
    """(true onsets with a detected onset within tolerance, true onsets)."""
    nearest = np.abs(true_s[:, None] - found_s[None, :]).min(axis=1)
    return int((nearest <= tolerance_s).sum()), len(true_s)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cycles")
    manifest = synthesize(out, n_patients=4, seed=11)
    truth = json.loads((out / "onsets.json").read_text())
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(load_audio(out / r["path"], AUDIO), np.array(truth[r["recording_id"]])) for r in rows]


def test_recovers_true_onsets_at_default_snr(synth_set):
    """Onset recall over the recordings found periodic; the damped venous-side ones may be flagged aperiodic
    (then they get fallback windows), but only a minority, and never cut at guessed beats."""
    hits = total = aperiodic = 0
    for signal, truth in synth_set:
        seg = segment(signal, AUDIO.sample_rate, CYCLES)
        if not seg.periodic:
            aperiodic += 1
            assert np.all(np.diff(seg.onsets) == int(CYCLES.aperiodic_hop_s * AUDIO.sample_rate))
            continue
        onsets = find_cycle_onsets(signal, AUDIO.sample_rate, CYCLES)
        assert onsets.dtype == np.int64 and np.all(np.diff(onsets) > 0)
        h, n = _recall(truth, onsets / AUDIO.sample_rate)
        hits, total = hits + h, total + n
    print(f"onset recall within 50 ms: {hits / total:.3f} ({hits}/{total}); {aperiodic} of {len(synth_set)} aperiodic")
    assert hits / total >= 0.95 and aperiodic <= len(synth_set) // 4


def test_first_window_starts_at_a_systolic_rise_not_at_the_file_start(synth_set):
    """Every synthetic recording starts at a random phase of the heartbeat; its first window must start at the
    start of a systolic rise (the same cardiac event in every recording), never simply at the file start."""
    cfg = PreprocessConfig()
    phases = []
    for signal, truth in synth_set:
        seg = segment(signal, AUDIO.sample_rate, CYCLES)
        if seg.periodicity < 0.4:  # the damped venous-side recordings: beats tracked, but less exactly
            continue
        _, cycles, _ = analyse_recording(signal, cfg)
        first = seg.onsets[cycles[0]] / AUDIO.sample_rate
        rr = float(np.median(np.diff(truth)))
        known = np.concatenate([[truth[0] - rr], truth])  # the beat in progress at t=0 started about rr earlier
        previous = known[known <= first + rr / 2].max()
        phases.append((first - previous) / rr)  # 0: at a true onset; the file start would be anywhere in [0, 1)
    phases = np.array(phases)
    print(f"first-window phase, fraction of a beat after the true onset: {np.round(phases, 3).tolist()}")
    assert np.all(np.abs(phases) < 0.1)


def test_clear_recording_is_tracked_beat_for_beat():
    rng = np.random.default_rng(5)
    patient = dataclasses.replace(draw_patient(rng, "p"), heart_rate_bpm=72.0, severity=0.6, diastolic_fraction=0.2)
    samples, truth = render_recording(rng, patient, "mid_fistula", 4000, 12.0, snr_db=20.0)
    onsets = find_cycle_onsets(prepare_audio(samples, 4000, AUDIO), 4000, CYCLES)
    hits, total = _recall(truth, onsets / 4000)
    # One beat here starts under a motion burst (100x the median energy); every other beat is found, and no
    # extra ones are invented.
    assert hits >= total - 1 and abs(len(onsets) - total) <= 1


@pytest.mark.parametrize("name", ["arterial", "venous"])
def test_shared_real_recordings(name, real_recordings):
    """The measured failure: 117 'cycles' at 194 bpm in the arterial file. Now the heart rate of the README,
    and a cycle count within 10 % of its reference."""
    signal = load_audio(real_recordings / f"{name}_20190923.wav", AUDIO)
    seg = segment(signal, AUDIO.sample_rate, CYCLES)
    print(f"{name}: {seg.heart_rate_bpm:.1f} bpm, periodicity {seg.periodicity:.2f}, {len(seg.onsets)} cycles")
    assert seg.periodic and REAL_BPM[0] <= seg.heart_rate_bpm <= REAL_BPM[1]
    assert 0.9 * REAL_CYCLES[0] <= len(seg.onsets) <= 1.1 * REAL_CYCLES[1]
    intervals = np.diff(seg.onsets) / AUDIO.sample_rate
    assert np.median(np.abs(intervals - seg.period_s)) < 0.1 * seg.period_s


def test_arterial_is_more_periodic_than_venous(real_recordings):
    scores = {n: segment(load_audio(real_recordings / f"{n}_20190923.wav", AUDIO), AUDIO.sample_rate, CYCLES).periodicity
              for n in ("arterial", "venous")}
    assert scores["arterial"] > scores["venous"] > CYCLES.min_periodicity


def test_only_true_local_maxima_count_and_interpolation_stays_in_the_bracket():
    r = np.linspace(1.0, 0.2, 50)  # the slope of a continuous bruit's baseline: no peak anywhere
    assert len(local_maxima(r, 10, 40)) == 0
    r[30] = 0.9  # one true peak; the lower edge (10) is higher but only a slope
    assert local_maxima(r, 10, 40).tolist() == [30]
    r = np.array([0.0, 0.5, 1.0, 0.99, 0.0])
    assert 2.0 <= _refine(r, 2) <= 2.5
    assert _refine(np.array([0.0, 1.0, 1.0, 0.0]), 1) == pytest.approx(1.5)


def _modulated_noise(rng, seconds):
    """Noise whose energy wanders at random (0.2-s correlation) but with no heartbeat in it."""
    x = rng.standard_normal(int(seconds * 4000))
    level = np.exp(0.5 * np.convolve(rng.standard_normal(len(x)), np.ones(800) / np.sqrt(800), "same"))
    return prepare_audio(0.1 * x * level, 4000, AUDIO)


@pytest.mark.parametrize("seconds", [2.0, 8.0, 30.0])
def test_noise_is_flagged_aperiodic_and_gets_fallback_windows(seconds):
    signal = _modulated_noise(np.random.default_rng(int(seconds)), seconds)
    seg = segment(signal, 4000, CYCLES)
    assert not seg.periodic and seg.reason
    assert np.all(np.diff(seg.onsets) == int(CYCLES.aperiodic_hop_s * 4000))  # fixed-length overlapping windows
    with pytest.raises(DataError, match="aperiodic recording: .*preprocess.cycles.aperiodic=refuse"):
        segment(signal, 4000, dataclasses.replace(CYCLES, aperiodic="refuse"))
    with pytest.raises(DataError, match="no clear heart period"):
        find_cycle_onsets(signal, 4000, CYCLES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_beat_clip_is_usable_but_has_no_cycles_to_find(seed):
    rng = np.random.default_rng(seed)
    patient = dataclasses.replace(draw_patient(rng, "p"), heart_rate_bpm=60.0)
    samples, _ = render_recording(rng, patient, "mid_fistula", 4000, 1.0)  # one beat at 60 bpm
    signal = prepare_audio(samples, 4000, AUDIO)
    with pytest.raises(DataError, match=r"no clear heart period in 1\.0 s of audio"):
        find_cycle_onsets(signal, 4000, CYCLES)
    spec, _, quality = analyse_recording(signal, PreprocessConfig())
    assert len(spec) >= 1 and not quality["periodic"]


def test_silence_is_rejected():
    with pytest.raises(DataError, match="no clear heart period.*no sound"):
        find_cycle_onsets(np.zeros(400, np.float32), 4000, CYCLES)
