"""`vascdist cv --submit`: the folds of a cross-validation as one SLURM job array through submitit.

Each array task is launch.submit.TrainingJob (same preemption and requeue protocol) with the fold's run
directory and split-file override as its arguments, so a requeued task resumes its own fold.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from vascdist.compat.submitit_internals import DelayedSubmission
from vascdist.launch.submit import OPTIONS, TrainingJob, check_submission, job_summary, submit_training, wait_for
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
    check_submission(args)
    layout = CvLayout(cv_dir)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else layout.submitit

    def make_job(config: str | None) -> FoldJob:
        return FoldJob(config, [], str(cv_dir), cfg.dist.max_requeues, cfg.dist.requeue_signal, resume="auto",
                       quiet=args.quiet)

    calls = [(str(layout.fold(e["dir"]).root), fold_overrides(plan, e)) for e in entries]
    jobs = submit_training(args, log_dir, plan["config"], cfg.dist.max_requeues, cfg.dist.requeue_signal, make_job,
                           calls, array=True)
    for j, e in zip(jobs, entries):
        print(f"submitted job {j.job_id} for fold {e['name']}\n  logs: {j.paths.folder}  (task 0: {j.paths.stdout})\n"
              f"  run dir: {layout.fold(e['dir']).root}", flush=True)
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
