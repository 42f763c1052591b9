"""Patient ids decide the split: `vascdist manifest` without --patient-pattern says loudly that every recording
becomes its own patient, and `shards info` says so when every patient has one recording (issue 12)."""

from __future__ import annotations

import csv
import shutil

import pytest

from helpers import run_cli


def _class_tree(synth_dir, root):
    """recordings/<label>/<name>.wav from the synthetic set (file names like p000_left.wav)."""
    with open(synth_dir / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            (root / row["label"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(synth_dir / row["path"], root / row["label"])
    return root


def test_manifest_without_a_pattern_warns_and_info_says_so(synth_dir, tmp_path):
    tree = _class_tree(synth_dir, tmp_path / "recordings")
    result = run_cli("manifest", str(tree), "--out", str(tmp_path / "manifest.csv"))
    assert result.returncode == 0, result.stderr
    assert "WARNING: no --patient-pattern" in result.stderr and "its own patient" in result.stderr

    result = run_cli("preprocess", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "shards"),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    info = run_cli("shards", "info", str(tmp_path / "shards"))
    assert info.returncode == 0 and "WARNING: every patient has exactly one recording" in info.stdout


@pytest.mark.slow
def test_the_readme_pattern_groups_synth_recordings_by_patient(synth_dir, tmp_path):
    """README's example pattern matches `vascdist synth` names (p000_left.wav) as well as P001_... ones."""
    tree = _class_tree(synth_dir, tmp_path / "recordings")
    result = run_cli("manifest", str(tree), "--out", str(tmp_path / "manifest.csv"), "--patient-pattern",
                     r"(?i)^(p\d+)_")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    with open(tmp_path / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["patient_id"] for r in rows}) < len(rows)  # several recordings per patient
    with open(synth_dir / "manifest.csv", newline="") as fh:
        truth = {row["recording_id"].rsplit("/", 1)[-1]: row["patient_id"] for row in csv.DictReader(fh)}
    assert all(truth[r["recording_id"].rsplit("/", 1)[-1]] == r["patient_id"] for r in rows)
    info = run_cli("shards", "info", str(_preprocessed(tmp_path)))
    assert "WARNING" not in info.stdout


def _preprocessed(tmp_path):
    result = run_cli("preprocess", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "shards"),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    return tmp_path / "shards"
