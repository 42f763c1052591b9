"""Launcher policy after a preemption stop: whether, and how, the job is requeued.

Training itself only checkpoints and returns when a stop signal comes (vascdist.preemption); what happens next
belongs to whoever launched it. `vascdist submit` requeues through submitit's checkpoint protocol
(launch/submit.py's TrainingJob); the sbatch template (vascdist/launch/train.sbatch) sets VASCDIST_REQUEUE=scontrol, which
`requeue_from_environment` turns into the `after_stop` that `vascdist train` hands to runner.run_training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable

from vascdist.errors import VascdistError

REQUEUE_ENV = "VASCDIST_REQUEUE"  # the sbatch template sets it to 'scontrol'

AfterStop = Callable[[int], str]  # called on global rank 0 with dist.max_requeues; returns the line to log


def requeue_from_environment(environ: dict | None = None) -> AfterStop | None:
    """The plain-sbatch requeue (`scontrol requeue`) when VASCDIST_REQUEUE=scontrol; None (no requeue) otherwise."""
    env = os.environ if environ is None else environ
    if env.get(REQUEUE_ENV) != "scontrol":
        return None
    return lambda max_requeues: requeue_slurm_job(max_requeues, environ)


def killed_by_requeue(returncode: int) -> bool:
    """Whether `scontrol requeue` ended by SIGTERM: SLURM TERMs every process of the job, scontrol included, as
    soon as it accepts the requeue, so that exit means success (-15 from subprocess, 143 through a shell)."""
    return returncode in (-15, 143)


def requeue_slurm_job(max_requeues: int, environ: dict | None = None) -> str:
    """`scontrol requeue $SLURM_JOB_ID` (the plain-sbatch path; submitit requeues through its own protocol).

    Returns the line to log. Requeues are capped by dist.max_requeues, counted by SLURM's SLURM_RESTART_COUNT.
    """
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
