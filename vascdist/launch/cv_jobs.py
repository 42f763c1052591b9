"""`vascdist cv --submit`: the folds of a cross-validation as one SLURM job array through submitit.

Each array task is launch.submit.TrainingJob (same preemption and requeue protocol) with the fold's run
directory and split-file override as its arguments, so a requeued task resumes its own fold.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from submitit.core.utils import DelayedSubmission, FailedJobError

from vascdist.errors import VascdistError
from vascdist.launch.submit import (OPTIONS, TrainingJob, clean_job_env, job_summary, make_executor, require_slurm,
                                    snapshot_code, use_squeue_fallback, wait_for)
from vascdist.train.layout import CvLayout


@dataclass
class FoldJob(TrainingJob):
    """TrainingJob whose run directory comes with the array task's arguments (one fold per task)."""

    def __call__(self, fold_dir: str, overrides: list[str]) -> dict:
        return TrainingJob.__call__(replace(self, run_dir=fold_dir), overrides)

    def checkpoint(self, fold_dir: str, overrides: list[str]) -> DelayedSubmission | None:
        """submitit's protocol: the same fold again, resuming (None once the requeues are used up)."""
        if TrainingJob.checkpoint(replace(self, run_dir=fold_dir), overrides) is None:
            return None
        return DelayedSubmission(replace(self, resume="auto"), fold_dir, overrides)


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """The options of `vascdist submit` that apply to a cross-validation's array (not --run-dir, --sweep)."""
    for name, (kind, default, text) in OPTIONS.items():
        if name != "--run-dir":
            p.add_argument(name, type=kind, default=default, help=text)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]", help="extra sbatch option")
    p.add_argument("--quiet", action="store_true", help="with --submit: no progress lines in the jobs' logs")


def submit_folds(args: argparse.Namespace, cv_dir: Path, plan: dict, entries: list[dict]) -> list:
    """Submit `entries` (folds) as one job array; prints and returns the jobs."""
    from vascdist.config import load_config
    from vascdist.cv.run import fold_overrides
    cfg = load_config(plan["config"], plan["overrides"])
    if args.signal_delay >= args.time * 60:
        raise VascdistError(f"--signal-delay {args.signal_delay} s must be shorter than --time {args.time} min")
    require_slurm()
    log_dir = Path(args.log_dir).resolve() if args.log_dir else CvLayout(cv_dir).submitit
    code = log_dir / f"code-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    config = snapshot_code(code, plan["config"])
    job = FoldJob(config, [], str(cv_dir), cfg.dist.max_requeues, cfg.dist.requeue_signal, resume="auto",
                  quiet=args.quiet)
    executor = make_executor(args, log_dir, cfg.dist.max_requeues, cfg.dist.requeue_signal, code)
    use_squeue_fallback()
    dirs = [str(CvLayout(cv_dir).fold(e["dir"]).root) for e in entries]
    overrides = [fold_overrides(plan, e) for e in entries]
    stderr = io.StringIO()
    try:
        with clean_job_env(), contextlib.redirect_stderr(stderr):
            jobs = executor.map_array(job, dirs, overrides)
    except FailedJobError as exc:
        raise VascdistError(" | ".join(str(exc).strip().splitlines()) or "sbatch failed") from None
    print(f"code snapshot: {code}")
    for j, e in zip(jobs, entries):
        print(f"submitted job {j.job_id} for fold {e['name']}\n  logs: {j.paths.folder}  (task 0: {j.paths.stdout})\n"
              f"  run dir: {CvLayout(cv_dir).fold(e['dir']).root}", flush=True)
    return jobs


def wait_and_name_failures(jobs: list, entries: list[dict], cv_dir: Path, metric: str) -> dict[str, str]:
    """Block until the array's tasks end, printing one line per fold; {fold name: reason} for those that did not
    complete."""
    states = wait_for(jobs)
    failures = {}
    for j, e in zip(jobs, entries):
        state = states[j.job_id]
        print(job_summary(j, state, CvLayout(cv_dir).fold(e["dir"]).root, metric, e["name"]), flush=True)
        if state != "COMPLETED" and state != "ENDED":
            failures[e["name"]] = f"SLURM job {j.job_id} ended {state} (log: {j.paths.stdout})"
    return failures
