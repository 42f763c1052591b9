"""Shared fixtures (one small synthetic data set and its shards, made once per test session; the real
recordings; a local cross-validation). Helper functions are in helpers.py; the markers are in pyproject.toml."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, cv_args, run_cli, site_cv_args, synth_rows
from slurm_cluster import stop_started_cluster_at_exit  # noqa: F401 (session teardown of a started SLURM cluster)
from vascdist.config import PreprocessConfig
from vascdist.data.preprocess import preprocess
from vascdist.data.synth import synthesize

# The shared real recordings: ../shared/realdata beside the checkout (two stethoscope recordings of one
# hemodialysis access, arterial and venous side, with their README), present on the project's machines only.
REALDATA = REPO.parent / "shared" / "realdata" / "vascular-access"


@pytest.fixture
def real_recordings() -> Path:
    """The folder of the shared real recordings. A test that takes this fixture is skipped, with a reason naming
    the missing folder, where it is absent (a clean clone); under VASCDIST_REQUIRE_REALDATA=1 (CI) it fails."""
    if not REALDATA.is_dir():
        reason = f"real recordings not found: {REALDATA} (../shared/realdata beside the checkout)"
        if os.environ.get("VASCDIST_REQUIRE_REALDATA") == "1":
            pytest.fail(f"{reason}; VASCDIST_REQUIRE_REALDATA=1 requires them")
        pytest.skip(reason)
    return REALDATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """12 synthetic patients (about 36 recordings)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n_patients=12, seed=7)
    return out


@pytest.fixture(scope="session")
def shards_dir(synth_dir, tmp_path_factory) -> Path:
    """Shards of `synth_dir` with small shards and chunks, so that loaders cross shard and chunk borders."""
    out = tmp_path_factory.mktemp("shards")
    cfg = PreprocessConfig(shard_size=512, chunk_size=64)
    preprocess(synth_dir / "manifest.csv", out, cfg, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def local_cv(shards_dir, tmp_path_factory):
    """A local 3-fold `vascdist cv` of the test shards (test_cv and, against its SLURM array, test_slurm_cv)."""
    out = tmp_path_factory.mktemp("cv") / "local"
    return out, _run_local_cv(cv_args(shards_dir, out))


@pytest.fixture()
def tmpfs(tmp_path, request):
    """A 2 MB tmpfs at tmp_path/full (root is needed to mount one); a test may ask for another size with
    `@pytest.mark.tmpfs_size("8m")`."""
    marker = request.node.get_closest_marker("tmpfs_size")
    size = marker.args[0] if marker else "2m"
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): the full-disk case is untested")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def site_shards(synth_dir, tmp_path_factory) -> Path:
    """The synthetic recordings as two centres with different class mixes (each has at least two patients of
    each class), preprocessed with small shards and chunks."""
    tmp = tmp_path_factory.mktemp("sites")
    rows = synth_rows(synth_dir)
    patients = sorted({r["patient_id"] for r in rows})
    label = {r["patient_id"]: r["label"] for r in rows}
    centre = {}  # centre-1 gets a third of the normal patients and two thirds of the stenosis ones: a confound
    for klass in sorted(set(label.values())):
        members = [p for p in patients if label[p] == klass]
        share = 1 / 3 if klass == "normal" else 2 / 3
        for i, p in enumerate(members):
            centre[p] = "centre-1" if i < round(share * len(members)) else "centre-2"
    with open(tmp / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id", "recording_id", "site"])
        for r in rows:
            writer.writerow([synth_dir / r["path"], r["label"], r["patient_id"], r["recording_id"], centre[r["patient_id"]]])
    preprocess(tmp / "manifest.csv", tmp / "shards", PreprocessConfig(shard_size=512, chunk_size=64), workers=2,
               progress=False)
    return tmp / "shards"


@pytest.fixture(scope="module")
def local_site_cv(site_shards, tmp_path_factory):
    """A local leave-one-site-out `vascdist cv` of site_shards (test_sites and, against its SLURM array, test_slurm_cv)."""
    out = tmp_path_factory.mktemp("sitecv") / "local"
    return out, _run_local_cv(site_cv_args(site_shards, out))


def _run_local_cv(args: list[str]):
    """`vascdist cv ARGS` on one thread; the finished process (its output is the test's evidence)."""
    result = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
