"""Shared fixtures (one small synthetic data set and its shards, made once per test session; the real
recordings; a local cross-validation). Helper functions are in helpers.py; the markers are in pyproject.toml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO, cv_args, run_cli
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
    result = run_cli(*cv_args(shards_dir, out), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result
