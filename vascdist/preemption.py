"""Preemption and time-limit signals, handled so that they cannot hang or corrupt a checkpoint.

The handler only records that a signal came (USR2 by default: SLURM's `--signal` and submitit use it, and
unlike SIGUSR1 it does not collide with NCCL; SIGTERM, sent at the time limit, is handled too). The
training loop polls `requested()` at every step boundary; all ranks agree on it with one collective, save
one checkpoint together, flush TensorBoard and return. Nothing heavy ever runs inside the handler.
"""

from __future__ import annotations

import signal
import sys

from vascdist.errors import ConfigError


def signal_number(name: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or '12' -> signal.SIGUSR2."""
    key = name.upper()
    if key.isdigit():
        return signal.Signals(int(key))
    try:
        return signal.Signals[key if key.startswith("SIG") else f"SIG{key}"]
    except KeyError:
        raise ConfigError(f"config key 'dist.requeue_signal': unknown signal '{name}'") from None


class StopSignals:
    """Installs flag-setting handlers for `names`; `requested()` tells whether one arrived.

    Use as a context manager: the previous handlers come back on exit.
    """

    def __init__(self, names: tuple[str, ...] = ("USR2", "TERM")):
        self.signals = sorted({signal_number(n) for n in names})
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            # one line, written with os-level safety in mind: print may be interrupted, but never blocks on a lock we hold
            sys.stderr.write(f"vascdist: received {self.received.name}; checkpointing at the next step boundary\n")

    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def killed_by_requeue(returncode: int) -> bool:
    """Whether `scontrol requeue` ended by SIGTERM: SLURM TERMs every process of the job, scontrol included, as
    soon as it accepts the requeue, so that exit means success (-15 from subprocess, 143 through a shell)."""
    return returncode in (-15, 143)


def requeue_slurm_job(max_requeues: int, environ: dict | None = None) -> str:
    """`scontrol requeue $SLURM_JOB_ID` (the plain-sbatch path; submitit requeues through its own protocol).

    Returns the line to log. Requeues are capped by dist.max_requeues, counted by SLURM's SLURM_RESTART_COUNT.
    """
    import os
    import shutil
    import subprocess

    from vascdist.errors import VascdistError

    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" \
        or env.get("SLURM_JOB_ID")
    if not job_id:
        raise VascdistError("asked to requeue, but SLURM_JOB_ID is not set (not running under SLURM)")
    done = int(env.get("SLURM_RESTART_COUNT", "0"))
    if done >= max_requeues:
        return f"not requeuing job {job_id}: it was requeued {done} times already (dist.max_requeues={max_requeues})"
    if shutil.which("scontrol") is None:
        raise VascdistError(f"cannot requeue job {job_id}: 'scontrol' is not on PATH (inside a container? bind-mount "
                            "the SLURM client or requeue from outside); the checkpoint is saved, resume with --resume auto")
    # SLURM TERMs the whole job (this process and scontrol too) as soon as it accepts the requeue: log first.
    print(f"requeuing job {job_id} (requeue {done + 1} of at most {max_requeues})", flush=True)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and not killed_by_requeue(result.returncode):
        raise VascdistError(f"scontrol requeue {job_id} failed: {(result.stderr or result.stdout).strip()}")
    return f"requeued job {job_id}"
