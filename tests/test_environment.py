"""`vascdist env` and the one-line errors for a broken binary-coupled install, in real subprocesses.

The broken install is simulated at the import boundary only: a `torchaudio` package earlier on sys.path whose
import raises the OSError a torchaudio wheel built for another torch raises (undefined symbol in libtorchaudio.so).
Everything else (torch, the CLI, the preprocess code) is the real installation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO, run_cli

import vascdist.compat as compat

UNDEFINED_SYMBOL = ("Could not load this library: /venv/lib/python3.11/site-packages/torchaudio/lib/libtorchaudio.so: "
                    "undefined symbol: torch_exception_get_what_without_backtrace")


def broken_torchaudio_env(tmp_path: Path) -> dict:
    fake = tmp_path / "fake_site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise OSError({UNDEFINED_SYMBOL!r})\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_env_reports_the_stack_and_exits_zero_when_healthy():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    for line in ("torch        2.11.0", "torchaudio   2.11.0", "torchvision  0.26.0", "torchaudio extension loads",
                 "backends     gloo yes"):
        assert line in result.stdout
    assert "deepspeed    0.19." in result.stdout and "submitit     1.5." in result.stdout
    assert "slurm  " in result.stdout and "cuda  " in result.stdout


def test_env_names_both_versions_and_the_fix_when_torchaudio_cannot_load(tmp_path):
    result = run_cli("env", env=broken_torchaudio_env(tmp_path))
    assert result.returncode == 2
    assert "torchaudio extension BROKEN" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vascdist env: error: torchaudio 2.11.0 cannot load with torch 2.11.0 (OSError: ")
    assert "undefined symbol" in line and f"pip install torch=={compat.TORCH} torchaudio=={compat.TORCHAUDIO}" in line


def test_preprocess_fails_with_one_line_not_a_traceback_when_torchaudio_cannot_load(synth_dir, tmp_path):
    result = run_cli("preprocess", "--manifest", str(synth_dir / "manifest.csv"), "--out", str(tmp_path / "shards"),
                     "--quiet", env=broken_torchaudio_env(tmp_path))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vascdist preprocess: error: torchaudio 2.11.0 cannot load with torch 2.11.0")
    assert not (tmp_path / "shards").exists()


def test_a_wrong_release_of_a_package_whose_internals_we_use_is_one_line():
    message = ""
    try:
        compat.require_minor("numpy", "0.1", "a test")
    except compat.VascdistError as exc:
        message = str(exc)
    found = compat.installed_version("numpy")
    assert message == f"vascdist needs numpy 0.1.x for a test; found {found} (pip install 'numpy==0.1.*')"
    assert compat.require_minor("deepspeed", "0.19", "x").startswith("0.19.")


def _threads_seen(env: dict, prefix: tuple[str, ...] = ()) -> tuple[str, str]:
    """(stdout, OpenMP's own report of its settings) of a process that imports vascdist, then torch, and computes;
    OMP_WAIT_POLICY and OMP_NUM_THREADS are removed from the environment unless `env` sets them."""
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                              "SLURM_CPUS_PER_TASK")}
    code = ("import vascdist, torch, os; torch.ones(64, 64).matmul(torch.ones(64, 64)).sum(); "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())")
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**base, "OMP_DISPLAY_ENV": "TRUE", **env})  # libgomp prints its settings at start
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


@pytest.mark.slow
def test_openmp_threads_sleep_when_idle_and_fit_the_cpus_the_process_may_use():
    """Unless the user says otherwise: a passive wait policy, and as many threads as SLURM (or the affinity mask)
    allows, in OpenMP itself, not only in the environment."""
    out, omp = _threads_seen({"SLURM_CPUS_PER_TASK": "1"})
    assert out == "PASSIVE 1 1" and "OMP_WAIT_POLICY = 'PASSIVE'" in omp and "OMP_NUM_THREADS = '1'" in omp
    if len(os.sched_getaffinity(0)) > 1:
        assert _threads_seen({}, ("taskset", "-c", "0"))[0] == "PASSIVE 1 1"
        assert _threads_seen({})[0].startswith("PASSIVE None ")  # the whole host: torch's own default
    out, omp = _threads_seen({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "1"})
    assert out == "ACTIVE 2 2" and "OMP_WAIT_POLICY = 'ACTIVE'" in omp  # the user's settings win


@pytest.mark.slow
def test_env_shows_the_thread_settings():
    result = run_cli("env", env={"SLURM_CPUS_PER_TASK": "1"})
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("cpu "))
    assert "1 usable (limited by SLURM_CPUS_PER_TASK)" in line and "OMP_WAIT_POLICY=" in line
