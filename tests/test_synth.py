"""synthesize: deterministic bytes, manifest layout, labels from severity, cache behaviour, physics sanity."""

import csv
import json
import time

import numpy as np
import pytest
import soundfile as sf

from vascdist.data.synth import (DURATION_S_RANGE, MANIFEST_COLUMNS, STENOSIS_THRESHOLD, break_spectrum,
                                 synthesize)


def _read(manifest):
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", n_patients=2, seed=3)
    b = synthesize(tmp_path / "b", n_patients=2, seed=3)
    c = synthesize(tmp_path / "c", n_patients=2, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "onsets.json").read_bytes() == (b.parent / "onsets.json").read_bytes()
    _, rows = _read(a)
    for row in rows:
        assert (a.parent / row["path"]).read_bytes() == (b.parent / row["path"]).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_manifest_columns_labels_and_files(tmp_path):
    manifest = synthesize(tmp_path, n_patients=6, seed=0)
    columns, rows = _read(manifest)
    assert tuple(columns) == MANIFEST_COLUMNS
    onsets = json.loads((tmp_path / "onsets.json").read_text())
    by_patient = {}
    for row in rows:
        severity = float(row["severity"])
        assert 0.0 <= severity <= 0.9
        assert row["label"] == ("stenosis" if severity >= STENOSIS_THRESHOLD else "normal")
        by_patient.setdefault(row["patient_id"], []).append(row)
        info = sf.info(str(tmp_path / row["path"]))
        assert (info.channels, info.samplerate, info.subtype) == (1, 4000, "PCM_16")
        assert DURATION_S_RANGE[0] <= info.duration <= DURATION_S_RANGE[1]
        # 55-100 bpm: between 0.9 and 1.7 onsets per second, all inside the recording and increasing.
        times = np.array(onsets[row["recording_id"]])
        assert 0.9 * info.duration - 1 <= len(times) <= 1.7 * info.duration + 1
        assert times[0] >= 0 and times[-1] < info.duration and np.all(np.diff(times) > 0)
    assert len(by_patient) == 6
    for recs in by_patient.values():
        assert 2 <= len(recs) <= 4
        assert len({r["severity"] for r in recs}) == 1 and len({r["site"] for r in recs}) == len(recs)
    assert len({r["recording_id"] for r in rows}) == len(rows)


def test_cache_hit_is_quick_and_does_not_rewrite(tmp_path):
    manifest = synthesize(tmp_path, n_patients=2, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert synthesize(tmp_path, n_patients=2, seed=0) == manifest
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps


def test_interrupted_or_changed_run_is_redone(tmp_path):
    synthesize(tmp_path, n_patients=2, seed=0)
    n_rows = len(_read(tmp_path / "manifest.csv")[1])
    (tmp_path / "synth.json").unlink()  # what an interrupted run leaves: synth.json is written last
    (tmp_path / "manifest.csv").write_text("path,label\n")
    synthesize(tmp_path, n_patients=2, seed=0)
    assert len(_read(tmp_path / "manifest.csv")[1]) == n_rows
    synthesize(tmp_path, n_patients=3, seed=0)  # different parameters: regenerated, not served from cache
    assert json.loads((tmp_path / "synth.json").read_text())["n_patients"] == 3
    assert len({r["patient_id"] for r in _read(tmp_path / "manifest.csv")[1]}) == 3


def test_break_frequency_sets_where_the_bruit_spectrum_falls():
    freqs = np.linspace(0, 2000, 2001)
    low, high = break_spectrum(freqs, 150.0), break_spectrum(freqs, 600.0)
    assert 20 * np.log10(low[600] / low[150]) < -20  # two octaves above the break: about -24 dB
    assert abs(20 * np.log10(high[300] / high[150])) < 1  # still flat below the break


@pytest.mark.slow
def test_generator_statistics_match_the_shared_real_recordings(tmp_path):
    """The real files' reference (README in ../shared/realdata/vascular-access: centroid 150-200 Hz, spectral
    peak 40-80 Hz, roll-off 540-780 Hz; periodicity 0.74 arterial, 0.49 venous, measured by cycles.segment; no
    mains line) against normal synthetic recordings."""
    from scipy import signal as sps
    from vascdist.config import AudioConfig, CycleConfig
    from vascdist.data.audio import load_audio
    from vascdist.data.cycles import segment
    manifest = synthesize(tmp_path, n_patients=10, seed=3)
    _, rows = _read(manifest)
    stats = []
    for row in rows:
        raw, _ = sf.read(str(tmp_path / row["path"]))
        x = load_audio(tmp_path / row["path"], AudioConfig())
        f, p = sps.welch(x, 4000, nperseg=1024)
        band = (f >= 20) & (f <= 1800)
        f, p = f[band], p[band]
        cum = np.cumsum(p) / p.sum()
        line = max(p[np.argmin(abs(f - hz))] / np.median(p[(abs(f - hz) > 8) & (abs(f - hz) < 25)])
                   for hz in (50, 60))
        stats.append({"label": row["label"], "centroid": (f * p).sum() / p.sum(), "peak": f[np.argmax(p)],
                      "rolloff": f[np.searchsorted(cum, 0.95)], "line": line,
                      "periodicity": segment(x, 4000, CycleConfig()).periodicity,
                      "level": 20 * np.log10(np.sqrt(np.mean(raw ** 2)))})
    normal = [s for s in stats if s["label"] == "normal"]
    median = {k: float(np.median([s[k] for s in normal])) for k in ("centroid", "peak", "rolloff")}
    print({k: round(v) for k, v in median.items()})
    assert 120 <= median["centroid"] <= 250 and 40 <= median["peak"] <= 80
    assert median["rolloff"] >= 0.6 * 540  # still lower than the real files': the break slope is steep
    assert np.mean([s["line"] > 3 for s in stats]) <= 0.35  # hum only in a minority, and faint
    periodicity = [s["periodicity"] for s in stats]
    assert min(periodicity) <= 0.49 and max(periodicity) >= 0.74  # venous-like and arterial-like both occur
    levels = [s["level"] for s in stats]
    assert max(levels) - min(levels) >= 20
