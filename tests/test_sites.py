"""Sites: the PhysioNet 2016 layout into a manifest with sites, leave-one-site-out cross-validation
(`vascdist cv --group-by site`) on synthetic centres, per-site intervals in the aggregate and the report, and the
class-mix warning (tests/test_slurm_cv.py runs the same leave-one-site-out as a SLURM job array)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import check_site_folds, run_cli, site_cv_args, synth_rows
from vascdist.data.manifest import build_manifest, read_manifest
from vascdist.errors import DataError
from vascdist.eval.sites import confound_warning

CLASSES = ["normal", "abnormal"]


def _physionet_tree(synth_dir: Path, root: Path) -> dict[str, list[tuple[str, str]]]:
    """training-a/ and training-b/ with real WAV files (synthetic recordings) and a REFERENCE.csv each, as in
    the PhysioNet 2016 database (stenosis -> 1, normal -> -1); returns {folder: [(name, label)]}."""
    made: dict[str, list[tuple[str, str]]] = {"training-a": [], "training-b": []}
    for i, row in enumerate(synth_rows(synth_dir)[:10]):
        folder = "training-a" if i < 6 else "training-b"
        name = f"{folder[-1]}{i:04d}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_dir / row["path"], root / folder / f"{name}.wav")
        made[folder].append((name, row["label"]))
    for folder, rows in made.items():
        (root / folder / "REFERENCE.csv").write_text(
            "".join(f"{name},{'1' if label == 'stenosis' else '-1'}\n" for name, label in rows))
    return made


# --------------------------------------------------------------------------------------------- manifest
def test_manifest_from_physionet_layout_fills_sites_and_classes(synth_dir, tmp_path):
    made = _physionet_tree(synth_dir, tmp_path / "physionet")
    out = tmp_path / "m.csv"
    result = run_cli("manifest", str(tmp_path / "physionet"), "--out", str(out), "preprocess.classes=[normal,abnormal]")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "(10 recordings)" in result.stdout
    recs = read_manifest(out, CLASSES)
    assert [r.site for r in recs] == ["training-a"] * 6 + ["training-b"] * 4
    expected = [CLASSES.index("abnormal" if label == "stenosis" else "normal") for f in made.values() for _, label in f]
    assert [r.label for r in recs] == expected
    assert [r.recording_id for r in recs][:2] == ["training-a/a0000", "training-a/a0001"]
    assert len({r.patient_id for r in recs}) == 10  # no patient ids published: one patient per recording
    # one folder alone, with the site overridden
    n = build_manifest(tmp_path / "physionet" / "training-b", tmp_path / "b.csv", CLASSES, site="aalborg")
    assert n == 4 and {r.site for r in read_manifest(tmp_path / "b.csv", CLASSES)} == {"aalborg"}


def test_manifest_refuses_a_patient_in_two_sites_and_three_classes(synth_dir, tmp_path):
    _physionet_tree(synth_dir, tmp_path / "physionet")
    shutil.copy(tmp_path / "physionet" / "training-a" / "a0000.wav", tmp_path / "physionet" / "training-b" / "a0000.wav")
    with open(tmp_path / "physionet" / "training-b" / "REFERENCE.csv", "a") as fh:
        fh.write("a0000,1\n")
    with pytest.raises(DataError, match="patient 'a0000' is also in site 'training-a'"):
        build_manifest(tmp_path / "physionet", tmp_path / "m.csv", CLASSES)
    with pytest.raises(DataError, match="need exactly two preprocess.classes"):
        build_manifest(tmp_path / "physionet" / "training-a", tmp_path / "m.csv", ["a", "b", "c"])
    assert not (tmp_path / "m.csv").exists()


def test_manifest_of_the_shared_physionet_recordings(real_recordings, tmp_path):
    physionet = real_recordings.parent / "physionet2016"  # beside vascular-access/ in ../shared/realdata
    if not physionet.is_dir():
        reason = f"real recordings not found: {physionet} (../shared/realdata/physionet2016 beside the checkout)"
        if os.environ.get("VASCDIST_REQUIRE_REALDATA") == "1":
            pytest.fail(f"{reason}; VASCDIST_REQUIRE_REALDATA=1 requires them")
        pytest.skip(reason)
    n = build_manifest(physionet, tmp_path / "m.csv", CLASSES)
    recs = read_manifest(tmp_path / "m.csv", CLASSES)
    assert n == 899 and all(r.path.is_file() for r in recs)
    by_site = {site: [r.label for r in recs if r.site == site] for site in ("training-a", "training-b")}
    assert (len(by_site["training-a"]), sum(by_site["training-a"])) == (409, 292)  # README: 292 abnormal of 409
    assert (len(by_site["training-b"]), sum(by_site["training-b"])) == (490, 104)


# --------------------------------------------------------------------------------------------- the warning
def test_confound_warning_rule():
    mixed = {"training-a": {"normal": 117, "abnormal": 292}, "training-b": {"normal": 386, "abnormal": 104}}
    line = confound_warning(mixed)
    assert line.startswith("warning: the share of 'abnormal'") and "training-a 71 %, training-b 21 %" in line
    assert "\n" not in line and "more than 20 points apart" in line
    assert confound_warning({"x": {"n": 50, "s": 50}, "y": {"n": 60, "s": 40}}) == ""  # 10 points: fine
    assert confound_warning({"x": {"n": 50, "s": 50}, "y": {"n": 9, "s": 0}}) == ""  # a site of 9 is too small
    assert confound_warning({"x": {"n": 50, "s": 50}}) == ""


# --------------------------------------------------------------------------------------------- leave-one-site-out
@pytest.mark.slow
def test_leave_one_site_out_locally_with_per_site_intervals(local_site_cv, site_shards):
    out, result = local_site_cv
    check_site_folds(out, site_shards)
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["group_by"] == "site" and not aggregate["missing"]
    assert set(aggregate["sites"]) == {"centre-1", "centre-2"}
    for site, figures in aggregate["sites"].items():
        value = figures["metrics"]["recording/auroc"]
        lo, hi = figures["intervals"]["recording/auroc"]
        assert lo <= value <= hi
        fold = aggregate["per_fold"][f"site-{site}"]  # a site's figures are its held-out fold's
        assert figures["metrics"]["recording/balanced_accuracy"] == pytest.approx(fold["recording/balanced_accuracy"])
    assert aggregate["spread"]["recording/auroc"]["folds"] == 2
    assert "leave-one-site-out over 2 sites: 2 of 2 folds finished" in result.stdout
    assert "per site, recording level, tested when held out (out-of-site)" in result.stdout
    assert "pooled out-of-site predictions" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "warning: the share of" in line]
    assert len(warning) == 1 and "more than 20 points apart" in warning[0]  # the confound, said once, at the start
    assert aggregate["site_warning"].startswith("warning: the share of") and aggregate["site_warning"] in result.stdout
    page = (out / "report.html").read_text()
    assert 'id="per-site"' in page and "mean ± sd across sites" in page and "<th>centre-1</th>" in page
    assert "warning: the share of" in page
    fold_record = json.loads((out / "site-centre-1" / "test_metrics.json").read_text())
    assert set(fold_record["sites"]) == {"centre-1"} and "intervals" in fold_record["sites"]["centre-1"]


@pytest.mark.slow
def test_evaluate_reports_sites_with_intervals(local_site_cv, tmp_path):
    out, _ = local_site_cv
    result = run_cli("evaluate", str(out / "site-centre-2"), "--split", "test", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    assert "per site, recording level" in result.stdout and "centre-2" in result.stdout
    record = json.loads((tmp_path / "e.json").read_text())
    assert set(record["sites"]["centre-2"]["intervals"]) >= {"recording/auroc", "patient/balanced_accuracy"}


def test_group_by_site_refusals(shards_dir, site_shards, tmp_path):
    result = run_cli(*site_cv_args(site_shards, tmp_path / "x", "--folds", "3"))
    assert result.returncode == 2 and "--group-by site makes one fold per site" in result.stderr
    # the plain synthetic set's sites are places on the arm, shared by a patient's recordings: not centres
    result = run_cli(*site_cv_args(shards_dir, tmp_path / "y"))
    assert result.returncode == 2 and "grouping by site needs each patient at one site" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
