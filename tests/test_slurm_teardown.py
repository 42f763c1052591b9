"""The test suite stops the local SLURM cluster it started, and removes the /etc/hosts line it added, unless
VASCDIST_KEEP_SLURM=1 asks to keep it (issue 12). Each case is a real child pytest session using the cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SCRIPT, cluster_env, ensure_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TAG = "# vascdist local SLURM cluster"
CHILD_TEST = '''
import sys
sys.path.insert(0, {tests!r})
from slurm_cluster import ensure_cluster, stop_started_cluster_at_exit  # noqa: F401 (the fixture conftest.py imports)

def test_uses_the_cluster():
    ensure_cluster()
'''


def _up() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], env=cluster_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60).returncode == 0


def _child_session(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    tmp_path.mkdir()
    (tmp_path / "test_child.py").write_text(CHILD_TEST.format(tests=str(Path(__file__).resolve().parent)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "VASCDIST_REQUIRE_SLURM": "1", **env})


def test_a_session_stops_the_cluster_it_started_unless_asked_to_keep_it(tmp_path):
    ensure_cluster()  # skips when this host cannot run SLURM (fails under VASCDIST_REQUIRE_SLURM=1)
    subprocess.run(["bash", str(SCRIPT), "stop"], env=cluster_env(), capture_output=True, timeout=120,
                   stdin=subprocess.DEVNULL, check=True)
    hosts_before = Path("/etc/hosts").read_text()
    try:
        child = _child_session(tmp_path / "a")
        assert child.returncode == 0, child.stdout + child.stderr
        assert "local SLURM cluster (started by these tests): stopped" in child.stderr
        assert not _up()
        assert TAG not in Path("/etc/hosts").read_text() or TAG in hosts_before  # what start added is gone

        child = _child_session(tmp_path / "b", VASCDIST_KEEP_SLURM="1")
        assert child.returncode == 0, child.stdout + child.stderr
        assert "kept running (VASCDIST_KEEP_SLURM=1)" in child.stderr
        assert _up()
    finally:  # up again, as ensure_cluster() left it for the tests after this one (this session stops it at the end)
        if not _up():
            subprocess.run(["bash", str(SCRIPT), "start"], env=cluster_env(), capture_output=True, timeout=900,
                           stdin=subprocess.DEVNULL)
