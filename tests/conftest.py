"""Shared fixtures: one small synthetic data set and its shards, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import stop_started_cluster_at_exit  # noqa: F401 (session teardown of a started SLURM cluster)
from vascdist.config import PreprocessConfig
from vascdist.data.preprocess import preprocess
from vascdist.data.synth import synthesize

REPO = Path(__file__).resolve().parent.parent
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


def stream_with_a_broken_shard(shards_dir: Path, tmp_path: Path, batch_size: int):
    """A training ShardStream over a copy of `shards_dir` whose last-read shard is no HDF5 file; and its name."""
    import shutil

    from vascdist.data.loader import ShardStream
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    stream = ShardStream(copy, "train", batch_size, seed=3, shuffle_chunks=1)
    victim = stream.chunks[-1].file
    (copy / victim).write_bytes(b"not hdf5")
    return stream, victim


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `vascdist ARGS` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "vascdist.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)
