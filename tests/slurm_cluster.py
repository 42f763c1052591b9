"""A real two-node SLURM cluster on this host for tests (started by slurm/local-cluster.sh), and job helpers.

    from slurm_cluster import ensure_cluster, submit, wait_job

    def test_something(tmp_path):
        env = ensure_cluster()                       # skips (or fails under VASCDIST_REQUIRE_SLURM=1) if no SLURM
        job_id = submit(tmp_path / "job.sh", env)
        assert wait_job(job_id, env, timeout=60) == "COMPLETED"

Accounting is off (no slurmdbd), so `sacct` does not work: job state comes from `scontrol show job`, which
keeps a finished job for MinJobAge (30 s) after it ends. A cluster that this test session started is stopped
when the session ends (`slurm/local-cluster.sh stop`: daemons, jobs and the `127.0.0.1 n1 n2` line it added to
/etc/hosts); one that was already running is left alone. VASCDIST_KEEP_SLURM=1 keeps a started one running, so
that the next session starts in a second instead of ten.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
STATE_DIR = Path(os.environ.get("VASCDIST_SLURM_DIR", "/tmp/vascdist-slurm"))

# Job states after which a job will not run again (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}

_started: dict | None = None  # the env, once this process has seen the cluster up
_failure: str | None = None  # why the cluster could not be started, so later tests do not retry
_started_here = False  # whether this process ran `start` (and so should run `stop` at the end)


def _unavailable(reason: str):
    """Skip the test, or fail it when CI demands SLURM (VASCDIST_REQUIRE_SLURM=1)."""
    if os.environ.get("VASCDIST_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM cluster required (VASCDIST_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no local SLURM cluster: {reason}")


def cluster_env() -> dict:
    """os.environ plus SLURM_CONF pointing at the local cluster's slurm.conf."""
    return {**os.environ, "SLURM_CONF": str(STATE_DIR / "slurm.conf"),
            "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def ensure_cluster(timeout: float = 900) -> dict:
    """Start the local cluster unless it is up; return the env (with SLURM_CONF) for sbatch, squeue, scontrol.

    The first start on a fresh machine installs the Debian packages (about 10 s here, longer on a slow
    mirror); later starts take about 2 s. If the cluster cannot be started the test is skipped with the
    reason, or failed when the environment variable VASCDIST_REQUIRE_SLURM=1 is set.
    """
    global _started, _failure, _started_here
    if _started is not None:
        return dict(_started)
    if _failure is not None:
        _unavailable(_failure)
    env = cluster_env()
    run = dict(env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        if subprocess.run(["bash", str(SCRIPT), "status"], timeout=30, **run).returncode != 0:
            proc = subprocess.run(["bash", str(SCRIPT), "start"], timeout=timeout, **run)
            _started_here = True  # even a failed start may leave daemons or the hosts line behind
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
                _failure = f"{SCRIPT.name} start exited {proc.returncode}: {tail}"
    except (OSError, subprocess.TimeoutExpired) as e:
        _failure = f"{SCRIPT.name}: {e}"
    if _failure is not None:
        _unavailable(_failure)
    _started = env
    return dict(env)


def stop_if_started_here() -> str | None:
    """Stop the cluster if this process started it, unless VASCDIST_KEEP_SLURM=1; returns what was done."""
    global _started, _started_here
    if not _started_here:
        return None
    if os.environ.get("VASCDIST_KEEP_SLURM") == "1":
        return "kept running (VASCDIST_KEEP_SLURM=1)"
    proc = subprocess.run(["bash", str(SCRIPT), "stop"], env=cluster_env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    _started, _started_here = None, False
    return "stopped" if proc.returncode == 0 else f"stop exited {proc.returncode}: {proc.stderr.strip()[-300:]}"


@pytest.fixture(scope="session", autouse=True)
def stop_started_cluster_at_exit(pytestconfig):
    """Session teardown (imported by conftest.py): stop what the tests started, and say so."""
    yield
    outcome = stop_if_started_here()
    if outcome:  # with pytest's capture off, so that it is seen
        with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            sys.stderr.write(f"\nlocal SLURM cluster (started by these tests): {outcome}\n")


@pytest.fixture
def slurm_env() -> dict:
    """Fixture form of ensure_cluster(): the env to run SLURM commands against the local cluster."""
    return ensure_cluster()


def submit(script: Path, env: dict, *args: str) -> int:
    """sbatch SCRIPT with extra sbatch ARGS; return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=env, capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip()}")
    return int(proc.stdout.strip().split(";")[0])


def job_info(job_id: int, env: dict) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...); {} once the job is purged."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=env, capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    # One line of Key=Value pairs separated by spaces; only Command/WorkDir/StdOut may hold spaces, and
    # those are not what callers look at.
    return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)


def wait_job(job_id: int, env: dict, timeout: float = 120, poll: float = 0.5) -> str:
    """Wait until job JOB_ID reaches a final state and return it (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...).

    A requeued job passes through PENDING again and is waited for. On timeout the job is cancelled (so it
    does not hold the two nodes for the next test) and TimeoutError names its last state.
    """
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if not info:
            raise RuntimeError(f"job {job_id} is unknown to slurmctld (purged, or never submitted)")
        state = info.get("JobState", "UNKNOWN")
        if state in FINAL_STATES:
            return state
        time.sleep(poll)
    subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, timeout=30)
    raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (cancelled)")
