"""Preprocessing under kills, signals, a full disk and a second concurrent run, with real processes (issue 16,
points 3-6), and the smaller input faults of point 11."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import REPO, assert_preprocess_fails, bad_wav, good_rows, run_cli, write_manifest
from vascdist.config import PreprocessConfig
from vascdist.data import shards as shardlib
from vascdist.data.manifest import read_manifest
from vascdist.data.splits import assign_splits
from vascdist.errors import DataError

SMALL = ("preprocess.shard_size=64", "preprocess.chunk_size=32")  # shards appear early: something to kill


def _start(manifest, out, *extra, workers=2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vascdist.cli", "preprocess", "--manifest", str(manifest),
                             "--out", str(out), "--quiet", "--workers", str(workers), *extra, *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _build_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.build-*"))


def _building(out: Path) -> bool:
    """A shard already written into the new set's build directory."""
    return any(list(d.glob("shard-*.h5")) for d in _build_dirs(out))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waiting for a reaper has exited


@pytest.fixture(scope="module")
def many(synth_dir, tmp_path_factory) -> Path:
    """A manifest of 360 recordings (copies of the synthetic ones under new names and ids, each copy's first
    sample changed by one LSB so that preprocess's duplicate-audio check sees different recordings): a preprocess
    run that lasts long enough to be killed midway, or to be run against."""
    root = tmp_path_factory.mktemp("many")
    rows = []
    for copy in range(10):
        for r in csv.DictReader(open(synth_dir / "manifest.csv")):
            source = synth_dir / r["path"]
            copied = root / f"{copy}-{Path(r['path']).name}"
            samples, rate = sf.read(source, dtype="int16", always_2d=True)
            samples[0, 0] ^= copy
            sf.write(copied, samples, rate, subtype=sf.info(source).subtype)
            rows.append([str(copied), r["label"], f"{copy}-{r['patient_id']}", f"{copy}-{r['recording_id']}"])
    return write_manifest(root, rows)


@pytest.fixture()
def old_set(synth_dir, tmp_path) -> tuple[Path, str]:
    """A finished set of 6 recordings in tmp_path/out, and its index.json text (what must survive)."""
    out = tmp_path / "out"
    result = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, good_rows(synth_dir))), "--out", str(out),
                     "--quiet", *SMALL)
    assert result.returncode == 0, result.stderr
    return out, (out / "index.json").read_text()


def _intact(out: Path, index_text: str) -> None:
    assert (out / "index.json").read_text() == index_text
    shardlib.verify(out)
    assert not _build_dirs(out)


# --------------------------------------------------------------------------------------------- 3: overwrite
@pytest.mark.slow
def test_overwrite_with_a_bad_recording_keeps_the_old_set(synth_dir, old_set, tmp_path):
    out, index_text = old_set
    rows = good_rows(synth_dir, 9)
    rows[7][0] = str(bad_wav(tmp_path, "silent"))
    result = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, rows)), "--out", str(out), "--quiet",
                     "--overwrite", *SMALL)
    assert result.returncode == 2 and "silent recording" in result.stderr
    _intact(out, index_text)
    good = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, good_rows(synth_dir, 9))), "--out", str(out),
                   "--quiet", "--overwrite", *SMALL)
    assert good.returncode == 0, good.stderr
    assert len(shardlib.verify(out)["recordings"]) == 9 and not _build_dirs(out)


@pytest.mark.slow
def test_kill_9_mid_overwrite_keeps_the_old_set_and_workers_die(many, synth_dir, old_set, tmp_path):
    out, index_text = old_set
    proc = _start(many, out, "--overwrite")
    _wait_for(lambda: _building(out))
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    _wait_for(lambda: all(_gone(w) for w in workers), timeout=10)  # PR_SET_PDEATHSIG: no orphan left writing
    assert (out / "index.json").read_text() == index_text
    shardlib.verify(out)
    assert _build_dirs(out)  # the killed run's half-built set, beside the old one ...
    rerun = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, good_rows(synth_dir, 3))),
                    "--out", str(out), "--quiet", "--overwrite", *SMALL)
    assert rerun.returncode == 0, rerun.stderr
    assert not _build_dirs(out)  # ... removed by the next run
    assert len(shardlib.verify(out)["recordings"]) == 3


# --------------------------------------------------------------------------------------------- 5, 6
@pytest.mark.slow
def test_second_run_refused_and_sigterm_cleans_up(many, old_set, tmp_path):
    out, index_text = old_set
    first = _start(many, out, "--overwrite")
    _wait_for(lambda: _building(out))
    workers = _children(first.pid)
    second = run_cli("preprocess", "--manifest", str(many), "--out", str(out), "--quiet", "--overwrite")
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out}: another run is writing this shard set (pid {first.pid} on " in lines[0]
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143
    assert err.strip().splitlines() == ["vascdist preprocess: interrupted by SIGTERM; nothing half-written was kept"]
    assert all(_gone(w) for w in workers)
    _intact(out, index_text)


# --------------------------------------------------------------------------------------------- 4: full disk
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_during_preprocess_is_one_line_and_keeps_the_old_set(synth_dir, tmpfs, tmp_path, workers):
    out = tmpfs / "shards"
    first = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, good_rows(synth_dir, 3))), "--out", str(out),
                    "--quiet", *SMALL)
    assert first.returncode == 0, first.stderr
    index_text = (out / "index.json").read_text()
    result = run_cli("preprocess", "--manifest", str(synth_dir / "manifest.csv"), "--out", str(out), "--quiet",
                     "--overwrite", "--workers", str(workers), *SMALL)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"vascdist preprocess: error: {tmpfs}/") and "no space left on device (needs " in lines[0]
    _intact(out, index_text)


def test_full_disk_under_the_run_logger_is_one_line(tmpfs):
    script = f"""
import os, sys
from vascdist.errors import VascdistError
from vascdist.train.runlog import RunLogger
logger = RunLogger({str(tmpfs / 'run')!r}, enabled=True)
with open({str(tmpfs / 'filler')!r}, 'wb', buffering=0) as fh:  # fill the disk after the files were opened
    try:
        while fh.write(os.urandom(1 << 12)):
            pass
    except OSError:
        pass
try:
    for step in range(2000):
        logger.scalars(step, {{'train/loss': 0.5}})
        logger.jsonl({{'step': step, 'split': 'train', 'loss': 0.5, 'note': 'x' * 200}})
    logger.close()
except VascdistError as exc:
    logger.close()  # as a training loop's finally does: quiet now
    print(exc)
    sys.exit(2)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ""  # no traceback from TensorBoard's writer thread either
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmpfs}/run/") and "no space left on device" in lines[0]


# --------------------------------------------------------------------------------------------- 11: smaller
def test_manifest_with_a_utf8_bom_is_read(synth_dir, tmp_path):
    plain = write_manifest(tmp_path, good_rows(synth_dir))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    classes = PreprocessConfig().classes
    assert read_manifest(bom, classes) == read_manifest(plain, classes)


def test_latin1_manifest_names_file_and_line(synth_dir, tmp_path):
    rows = good_rows(synth_dir)
    rows[2][2] = "Müller"
    path = tmp_path / "latin1.csv"
    path.write_bytes(write_manifest(tmp_path, rows).read_text().encode("latin-1"))
    result = run_cli("preprocess", "--manifest", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vascdist preprocess: error: {path}:4: not UTF-8 text (byte 0xfc; Latin-1 or another legacy encoding?); "
        "save the file as UTF-8"]


@pytest.mark.slow
def test_truncated_wav_is_named(synth_dir, tmp_path):
    rows = good_rows(synth_dir)
    whole = Path(rows[2][0]).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    rows[2][0] = str(cut)
    line = assert_preprocess_fails(tmp_path, write_manifest(tmp_path, rows), f"{cut}: truncated WAV file: its header promises")
    assert "manifest row 4" in line


def test_info_into_a_closed_pipe_is_quiet(shards_dir, tmp_path):
    err = tmp_path / "err.txt"
    result = subprocess.run(f"{sys.executable} -m vascdist.cli shards info {shards_dir} 2>{err} | true; "
                            "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True,
                            env={**os.environ})
    assert err.read_text() == "" and result.stdout.strip() == "141"


@pytest.mark.slow
def test_skipped_patients_count_in_no_split(synth_dir, tmp_path):
    rows = good_rows(synth_dir, 12)  # several recordings of a few patients
    bad_patient = rows[0][2]
    for row in rows:
        if row[2] == bad_patient:
            row[0] = str(bad_wav(tmp_path, "silent").rename(tmp_path / f"silent-{row[3]}.wav"))
    out = tmp_path / "out"
    result = run_cli("preprocess", "--manifest", str(write_manifest(tmp_path, rows)), "--out", str(out), "--quiet",
                     "--skip-bad", "preprocess.split.val_fraction=0.34", "preprocess.split.test_fraction=0.0")
    assert result.returncode == 0, result.stderr
    index = shardlib.verify(out)
    good = [r for r in rows if r[2] != bad_patient]
    patients = sorted({r[2] for r in good})
    assert index["patients"] == patients and bad_patient not in patients
    assert sum(c["patients"] for c in index["splits"].values()) == len(patients)
    expected = assign_splits(read_manifest(write_manifest(tmp_path, good), PreprocessConfig().classes),
                             type(PreprocessConfig().split)(val_fraction=0.34, test_fraction=0.0))
    assert {r["patient"]: r["split"] for r in index["recordings"]} == expected
    assert len(list(csv.DictReader(open(out / "skipped.csv")))) == len(rows) - len(good)
