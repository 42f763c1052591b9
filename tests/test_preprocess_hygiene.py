"""preprocess refuses the same audio under two rows (leakage), excludes or refuses physically absurd recordings
(never letting them widen the training quality range), and says on the console what --skip-bad skipped.
Real WAV files, real `vascdist preprocess` processes."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import run_cli
from vascdist.data.shards import load_index
from vascdist.data.synth import synthesize

pytestmark = pytest.mark.slow  # trains a model / runs preprocess processes


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id", "recording_id"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _absurd(out: Path) -> dict[str, Path]:
    """Recordings no recorder makes of a vascular access: {expected reason: file}."""
    rng = np.random.default_rng(0)
    t = np.arange(30 * 4000) / 4000
    files = {"sample rate 1 Hz holds frequencies up to 0.5 Hz": out / "rate_1hz.wav",
             "fully clipped: 100 % of the samples at full scale": out / "square.wav",
             "no energy in the band": out / "rumble_5hz.wav"}
    sf.write(files["sample rate 1 Hz holds frequencies up to 0.5 Hz"], rng.uniform(-0.5, 0.5, 40), 1)
    sf.write(files["fully clipped: 100 % of the samples at full scale"], np.sign(np.sin(2 * np.pi * 100 * t)), 4000)
    sf.write(files["no energy in the band"], 0.3 * np.sin(2 * np.pi * 2 * t), 4000)
    return files


def test_the_same_audio_under_two_patients_is_refused_naming_both_rows(synth_dir, tmp_path):
    rows = _rows(synth_dir / "manifest.csv")
    copy = tmp_path / "copy.wav"
    shutil.copy(synth_dir / rows[0]["path"], copy)
    # Re-encoded as FLAC: other bytes, the same decoded samples.
    samples, rate = sf.read(synth_dir / rows[0]["path"], dtype="int16")
    sf.write(tmp_path / "copy.flac", samples, rate, subtype="PCM_16")
    for dup in (copy, tmp_path / "copy.flac"):
        manifest = _write_manifest(tmp_path / "manifest.csv", [
            {**r, "path": str(synth_dir / r["path"])} for r in rows[:1]] + [
            {"path": str(dup), "label": rows[0]["label"], "patient_id": "someone_else", "recording_id": "r_dup"}] + [
            {**r, "path": str(synth_dir / r["path"])} for r in rows[1:]])
        result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "shards"), "--quiet",
                         "--skip-bad")
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"{dup} (manifest row 3, patient someone_else) holds the same audio as " \
               f"{synth_dir / rows[0]['path']} (manifest row 2, patient {rows[0]['patient_id']})" in line
        assert not (tmp_path / "shards" / "index.json").exists()


def test_absurd_recordings_are_refused_or_skipped_with_their_reason_and_never_widen_the_quality_range(
        synth_dir, tmp_path):
    rows = [{**r, "path": str(synth_dir / r["path"])} for r in _rows(synth_dir / "manifest.csv")]
    absurd = _absurd(tmp_path)
    bad_rows = [{"path": str(p), "label": rows[0]["label"], "patient_id": rows[0]["patient_id"], "recording_id": p.stem}
                for p in absurd.values()]
    for reason, row in zip(absurd, bad_rows):  # each alone, first in the manifest: refused without --skip-bad
        manifest = _write_manifest(tmp_path / "one.csv", [row] + rows)
        result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "refused"), "--quiet")
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert f"{row['path']}: physically absurd recording: " in line and reason in line, line
        assert "--skip-bad goes on past bad recordings" in line

    manifest = _write_manifest(tmp_path / "all.csv", rows + bad_rows)
    out = tmp_path / "shards"
    result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert f"vascdist preprocess: skipped 3 of {len(rows) + 3} recordings (listed in {out / 'skipped.csv'}):" \
        in result.stderr
    for reason in absurd:
        assert reason in result.stderr
    skipped = _rows(out / "skipped.csv")
    assert sorted(r["path"] for r in skipped) == sorted(str(p) for p in absurd.values())
    index = load_index(out)
    assert {r["path"] for r in index["recordings"]}.isdisjoint(str(p) for p in absurd.values())
    level = index["quality_range"]["level_dbfs"]
    clipping = index["quality_range"]["clipping_fraction"]
    assert level[0] > -100 and clipping[1] < 0.5, index["quality_range"]


def test_2khz_heart_sounds_pass_with_a_band_below_1khz_and_are_refused_with_the_default_band(tmp_path):
    synthesize(tmp_path / "rec", n_patients=6, seed=3, sample_rate=2000)
    manifest = tmp_path / "rec" / "manifest.csv"
    result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "default"), "--quiet")
    assert result.returncode == 2
    assert "sample rate 2000 Hz holds frequencies up to 1000 Hz, below the band's upper edge " \
           "preprocess.audio.bandpass_high_hz=1800" in result.stderr

    result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "heart"), "--quiet",
                     "preprocess.audio.sample_rate=2000", "preprocess.audio.bandpass_high_hz=800",
                     "preprocess.spectrogram.f_max=1000", "preprocess.spectrogram.hop_length=20")
    assert result.returncode == 0, result.stderr
    index = load_index(tmp_path / "heart")
    assert index["excluded"] == [] and len(index["recordings"]) == len(_rows(manifest))
    assert all(r["source"] == "vascdist synth" and len(r["input_features"]) == 80 for r in index["recordings"])
