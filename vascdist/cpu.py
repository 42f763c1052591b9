"""CPU threads that behave on a shared node: set before torch (and its OpenMP runtime) is loaded.

Two defaults, each applied only when the user has not set the variable:

- ``OMP_WAIT_POLICY=PASSIVE``: an idle OpenMP thread sleeps instead of spinning. torch's intra-op threads meet
  at a barrier after every parallel region; when another job holds a core, a spinning thread burns the slice
  that the descheduled one needed, and every barrier waits for it (the quickstart took 6.5x longer at a load
  of 5). libgomp reads the variable once, when it is loaded, so it must be in the environment before
  ``import torch``; worker processes (DataLoader, preprocessing, torchrun's) inherit it.
- ``OMP_NUM_THREADS``: the CPUs this process may use (its affinity mask, the cgroup's CPU quota, SLURM's
  ``--cpus-per-task``) when that is fewer than the host's; torch's own default counts the host's cores, and
  threads beyond the allowance only queue for it.

`configure()` runs when the `vascdist` package is imported (vascdist/__init__.py), so every entry point and
worker that imports vascdist before torch gets both; `thread_settings()` says what was chosen and why.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadSettings:
    """What `configure` found and set (for `vascdist env`)."""

    usable_cpus: int
    limited_by: str  # 'affinity', 'cgroup', 'SLURM_CPUS_PER_TASK' or 'host'
    wait_policy: str  # OMP_WAIT_POLICY in effect
    wait_policy_set_by_vascdist: bool
    num_threads: str | None  # OMP_NUM_THREADS in effect (None: torch's default)
    num_threads_set_by_vascdist: bool


def _cgroup_cpus() -> float | None:
    """The CPU quota of the cgroup in CPUs (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), None when unlimited.
    Read at the cgroup mount's root, which is the container's own cgroup, as loky (joblib) reads it."""
    try:
        quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may use, what limits it): the smallest of the host's count, the affinity mask, the
    cgroup's quota (rounded up) and SLURM_CPUS_PER_TASK."""
    limits = [(os.cpu_count() or 1, "host")]
    if hasattr(os, "sched_getaffinity"):
        limits.append((len(os.sched_getaffinity(0)), "affinity"))
    quota = _cgroup_cpus()
    if quota is not None:
        limits.append((max(1, math.ceil(quota)), "cgroup"))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append((int(slurm), "SLURM_CPUS_PER_TASK"))
    return min(limits, key=lambda item: item[0])


_settings: ThreadSettings | None = None


def configure() -> ThreadSettings:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS in os.environ where the user has not (idempotent)."""
    global _settings
    if _settings is not None:
        return _settings
    cpus, limited_by = usable_cpus()
    set_policy = "OMP_WAIT_POLICY" not in os.environ
    if set_policy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    set_threads = "OMP_NUM_THREADS" not in os.environ and limited_by != "host"
    if set_threads:
        os.environ["OMP_NUM_THREADS"] = str(cpus)
    _settings = ThreadSettings(cpus, limited_by, os.environ["OMP_WAIT_POLICY"], set_policy,
                               os.environ.get("OMP_NUM_THREADS"), set_threads)
    return _settings


def thread_settings() -> ThreadSettings:
    return configure()
