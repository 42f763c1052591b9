"""`vascdist submit`: training on SLURM through submitit, with preemption handled as submitit's checkpoint protocol.

    vascdist submit resnet50 optim.lr=0.1 --nodes 2 --tasks-per-node 4 --gpus-per-node 4 --time 1440
    vascdist submit quickstart --sweep optim.lr=0.01,0.1 --partition gpu     # a job array, one job per value

Every task is one training process; vascdist.dist reads its rank and world size from srun's environment.

Preemption / time limit: SLURM sends USR2 `--signal-delay` seconds before the limit. Inside the job the handler
only sets a flag (vascdist.preemption.StopSignals replaces submitit's USR2 handler while TrainingJob runs); the
loop sees it at the next step boundary, every rank checkpoints and returns, and only then global rank 0 goes
through submitit's own protocol (SignalHandler.checkpoint_and_try_requeue, called from ordinary code, not from
a handler): `TrainingJob.checkpoint()` gives the DelayedSubmission to run next (same run dir, resume='auto'),
submitit dumps it where its requeued job will load it and runs `scontrol requeue`. Requeues are capped by
dist.max_requeues (counted by SLURM_RESTART_COUNT) and by submitit's own timeout countdown.

What runs is what was submitted: the vascdist package and the config file are copied into the log
folder (code-<time>/) and put first on the job's PYTHONPATH. (submitit's RsyncSnapshot needs rsync, which our
machines lack, and copies git-tracked files only: a new module not yet added would be missing from the job.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vascdist.compat.submitit_internals import (FINAL_STATES, DelayedSubmission, FailedJobError, SignalHandler,
                                                job_states, submitit, use_squeue_fallback)
from vascdist.errors import VascdistError
from vascdist.launch.requeue import killed_by_requeue
from vascdist.train.layout import RunLayout

if TYPE_CHECKING:
    from vascdist.eval.results import RunResult


# ---------------------------------------------------------------------------------------------- in the job

@dataclass
class TrainingJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles: `vascdist train CONFIG OVERRIDES+SWEEP` in every task of the job.

    `run_dir` may hold '{job_id}' (SLURM's id, '123' or '123_4' in an array): it stays the same when the job is
    requeued, so every attempt trains in the same run directory.
    """

    config: str | None
    overrides: list[str]
    run_dir: str
    max_requeues: int
    requeue_signal: str = "USR2"
    resume: str | None = None
    quiet: bool = False  # False: rank 0 writes a progress line to the job's log every run.progress_interval_s

    def resolved_run_dir(self) -> str:
        return self.run_dir.format(job_id=submitit.JobEnvironment().job_id)

    def __call__(self, sweep: list[str] = ()) -> RunResult:
        from vascdist.runner import run_training
        from vascdist.preemption import StopSignals, signal_number

        job = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # submitit's handler, made now (its clock times this attempt) from the submission being run; it is
        # called below, after the checkpoint, never from a signal.
        handler = SignalHandler(job, job.paths, DelayedSubmission.load(job.paths.submitted_pickle))
        if job.global_rank == 0:
            import vascdist
            print(f"job {job.job_id}: attempt {restarts + 1} (requeued {restarts} of at most {self.max_requeues} "
                  f"times), {job.num_tasks} tasks on {job.num_nodes} nodes, code {Path(vascdist.__file__).parent}",
                  flush=True)
        # Until run_training installs its own handlers (and after it restores ours), a signal only sets a flag.
        with StopSignals((self.requeue_signal, "TERM")) as early:
            result = run_training(self.config, list(self.overrides) + list(sweep), resume=self.resume,
                                  run_dir=self.resolved_run_dir(), quiet=self.quiet,
                                  stop_requested=early.requested)
            if result.stopped and job.global_rank == 0:
                self._requeue(handler, early.received or signal_number(self.requeue_signal))
        return result

    def _requeue(self, handler: SignalHandler, signum: int) -> None:
        """submitit's protocol, after the checkpoint: dump checkpoint()'s submission, `scontrol requeue`, exit.
        Raises UncompletedJobError (the job ends FAILED) when checkpoint() declines: the requeues are used up."""
        if shutil.which("scontrol") is None:
            raise VascdistError(f"cannot requeue job {handler.env.job_id}: 'scontrol' is not on PATH; the checkpoint "
                                f"is saved in {self.resolved_run_dir()}, resubmit with --resume auto")
        try:
            handler.checkpoint_and_try_requeue(signum)
        except subprocess.CalledProcessError as exc:
            if killed_by_requeue(exc.returncode):
                sys.exit(-1)
            raise VascdistError(f"scontrol requeue failed (exit {exc.returncode}); the checkpoint is saved in "
                                f"{self.resolved_run_dir()}, resubmit with --resume auto") from None

    def checkpoint(self, sweep: list[str] = ()) -> DelayedSubmission | None:
        """submitit's protocol: what to run when the job is requeued (None: do not requeue)."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            print(f"not requeuing: requeued {restarts} times already (dist.max_requeues={self.max_requeues})",
                  flush=True)
            return None
        print(f"requeue {restarts + 1} of at most {self.max_requeues}: the next attempt resumes "
              f"{self.resolved_run_dir()} (--resume auto)", flush=True)
        return DelayedSubmission(replace(self, resume="auto"), sweep)


# ------------------------------------------------------------------------------------------- job states

def wait_for(jobs: list, poll_s: float = 5.0) -> dict[str, str]:
    """Block until every job is in a final state; return {job_id: state}."""
    while True:
        states = job_states(jobs)
        if all(s in FINAL_STATES for s in states.values()):
            return states
        time.sleep(poll_s)


def job_summary(job, state: str, run_dir: str | Path, metric: str, label: str = "") -> str:
    """One line for a finished job: its state and, when it completed, the test `metric` with its interval and
    the run directory; when it did not, the last line of its error log (where the reason usually is)."""
    head = f"job {job.job_id}" + (f" ({label})" if label else "") + f": {state}"
    layout = RunLayout(run_dir)
    if state == "COMPLETED" and layout.test_metrics.is_file():
        from vascdist.eval.results import SplitReport
        estimate = SplitReport.read(layout.test_metrics).metrics.get(metric)
        if estimate is not None and estimate.interval is not None and not math.isnan(estimate.value):
            head += f", test {metric} {estimate.value:.2f} [{estimate.interval[0]:.2f}-{estimate.interval[1]:.2f}]"
        return f"{head}, run dir {layout.root}"
    try:
        lines = [line for line in Path(job.paths.stderr).read_text().splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{head}" + (f": {lines[-1].strip()}" if lines else "") + f" (log: {job.paths.stderr})"


# ------------------------------------------------------------------------------------------- submission

OPTIONS = {  # option -> (type, default, help)
    "--nodes": (int, 1, "nodes per job"),
    "--tasks-per-node": (int, 1, "training processes per node (one per GPU)"),
    "--gpus-per-node": (int, 0, "GPUs to request per node (0: none, CPU training)"),
    "--cpus-per-task": (int, 1, "CPUs per process (data workers + 1)"),
    "--mem": (float, None, "memory per node in GB"),
    "--time": (int, 60, "time limit in minutes"),
    "--partition": (str, None, "SLURM partition"),
    "--account": (str, None, "SLURM account"),
    "--qos": (str, None, "SLURM quality of service"),
    "--constraint": (str, None, "SLURM node constraint"),
    "--signal-delay": (int, 120, "seconds before the time limit at which dist.requeue_signal is sent"),
    "--job-name": (str, "vascdist", "SLURM job name"),
    "--log-dir": (str, None, "where job folders go (default <run.out_dir>/<run.name>/submitit)"),
    "--run-dir": (str, None, "run directory; '{job_id}' is replaced (default <run.out_dir>/<run.name>/slurm-{job_id})"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vascdist submit", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name; default quickstart")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")
    for name, (kind, default, text) in OPTIONS.items():
        p.add_argument(name, type=kind, default=default, help=text)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="extra sbatch option, e.g. --sbatch mail-type=END --sbatch exclusive (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="job array over the values (repeat for a grid)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs, then print one line per job (state, test "
                                                       "metric, run dir, or the reason it failed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines in the jobs' logs")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options anywhere; anything else with '=' is an override; unknown options are an error naming the valid ones.

    `parser` has a `config` (optional) and an `overrides` (nargs='*') positional (`vascdist submit`, `vascdist cv`)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        valid = sorted(o for a in parser._actions for o in a.option_strings)
        raise VascdistError(f"unknown option(s) {' '.join(unknown)}; valid options: {', '.join(valid)}")
    if args.config is not None and "=" in args.config:  # `submit optim.lr=0.1`: overrides only
        args.overrides, args.config = [args.config] + args.overrides, None
    args.overrides = list(args.overrides) + extra
    return args


def sweep_grid(sweeps: list[str]) -> list[list[str]]:
    """['optim.lr=0.01,0.1', 'data.batch_size=16,32'] -> the 4 override lists of the grid ([[]] without sweeps)."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise VascdistError(f"--sweep '{item}' must look like section.key=value1,value2")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def sbatch_extras(items: list[str]) -> dict:
    """['mail-type=END', 'exclusive'] -> {'mail-type': 'END', 'exclusive': True} for slurm_additional_parameters."""
    extras = {}
    for item in items:
        key, sep, value = item.partition("=")
        extras[key.strip().lstrip("-")] = value if sep else True
    return extras


def snapshot_code(dest: Path, config: str | None) -> str | None:
    """Copy the vascdist package (the shipped configs inside) and the config file to dest; return the config path
    the job uses."""
    import vascdist
    from vascdist.config import resolve_config_path
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    source = Path(vascdist.__file__).resolve().parent
    shutil.copytree(source, dest / source.name, ignore=ignore)
    if config is None:
        return None
    copy = dest / "job-config.yaml"
    shutil.copyfile(resolve_config_path(config), copy)
    return str(copy)


def require_slurm() -> None:
    for tool in ("sbatch", "srun", "scontrol"):
        if shutil.which(tool) is None:
            raise VascdistError(f"'{tool}' is not on PATH: submit from a SLURM login node (or start the local test "
                                "cluster with slurm/local-cluster.sh start and export SLURM_CONF)")


def make_executor(args: argparse.Namespace, folder: Path, max_requeues: int, signal: str, code: Path):
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=max_requeues)
    sbatch = {"signal": f"{signal.upper().removeprefix('SIG')}@{args.signal_delay}", "requeue": True,
              **sbatch_extras(args.sbatch)}
    params = dict(nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.time, name=args.job_name, slurm_additional_parameters=sbatch,
                  # one failing rank ends the step instead of leaving the others blocked in a collective
                  slurm_srun_args=["--kill-on-bad-exit=1"],
                  slurm_setup=[f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}"])
    optional = {"gpus_per_node": args.gpus_per_node or None, "mem_gb": args.mem, "slurm_partition": args.partition,
                "slurm_account": args.account, "slurm_qos": args.qos, "slurm_constraint": args.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def clean_job_env():
    """submitit's clean_env (a submit from inside a job must not hand its SLURM_*, RANK, MASTER_* variables to
    the new job), except SLURM_CONF, which says where the cluster is."""
    keep = {k: os.environ[k] for k in ("SLURM_CONF",) if k in os.environ}
    with submitit.helpers.clean_env():
        os.environ.update(keep)
        try:
            yield
        finally:
            for k in keep:
                os.environ.pop(k, None)


def check_submission(args: argparse.Namespace) -> None:
    """What every submission checks first: the signal comes before the time limit, and SLURM's tools are here."""
    if args.signal_delay >= args.time * 60:
        raise VascdistError(f"--signal-delay {args.signal_delay} s must be shorter than --time {args.time} min")
    require_slurm()


def submit_jobs(executor, job: TrainingJob, calls: list[tuple], array: bool) -> list:
    """Submit `job` once per argument tuple of `calls` (one job array when `array`, else the single call);
    sbatch's refusal becomes one verbatim line."""
    stderr = io.StringIO()
    try:
        with clean_job_env(), contextlib.redirect_stderr(stderr):  # submitit echoes sbatch's stderr
            if not array:
                return [executor.submit(job, *calls[0])]
            return executor.map_array(job, *zip(*calls))
    except FailedJobError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if any(sign in line for sign in NO_CONTROLLER for line in lines):
            conf = os.environ.get("SLURM_CONF")
            where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF is not set and no slurm.conf was found"
            said = lines[-1].removeprefix("sbatch: ")
            raise VascdistError(f"no SLURM controller answered ({where}; sbatch: {said}); point at your cluster "
                                "with `export SLURM_CONF=/path/to/slurm.conf` (the local test cluster: "
                                "slurm/local-cluster.sh start prints it)") from None
        raise VascdistError(" | ".join(lines) or "sbatch failed") from None


# What sbatch says when it reaches no controller: no configuration (DNS SRV lookup), an unresolvable or silent host.
NO_CONTROLLER = ("Could not establish a configuration source", "DNS SRV lookup failed",
                 "Unable to contact slurm controller", "Unable to establish control machine address")


def submit_training(args: argparse.Namespace, log_dir: Path, config: str | None, max_requeues: int, signal: str,
                    make_job: Callable[[str | None], TrainingJob], calls: list[tuple], array: bool) -> list:
    """The one submission path of `vascdist submit` and `vascdist cv --submit`: snapshot the code and the config
    into log_dir, make the job from the snapshot's config (`make_job`), submit it once per call; returns the jobs."""
    code = log_dir / f"code-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    job = make_job(snapshot_code(code, config))
    executor = make_executor(args, log_dir, max_requeues, signal, code)
    use_squeue_fallback()  # before submitting: the jobs register with the watcher as they are made
    jobs = submit_jobs(executor, job, calls, array)
    print(f"code snapshot: {code}")
    return jobs


def main(argv: list[str]) -> int:
    """`vascdist submit ...`; returns the exit code."""
    from vascdist.config import DEFAULT_CONFIG, load_config

    args = parse_args(argv)
    args.config = args.config or DEFAULT_CONFIG  # what the job's `vascdist train` runs, so its name and run dir
    grid = sweep_grid(args.sweep)
    configs = [load_config(args.config, args.overrides + point) for point in grid]  # bad overrides fail here
    cfg = configs[0]
    if len({c.dist.max_requeues for c in configs}) > 1 or len({c.dist.requeue_signal for c in configs}) > 1:
        raise VascdistError("--sweep may not vary dist.max_requeues or dist.requeue_signal")
    check_submission(args)
    name_dir = Path(cfg.run.out_dir).resolve() / cfg.run.name
    log_dir = Path(args.log_dir).resolve() if args.log_dir else name_dir / "submitit"
    run_dir = str(Path(args.run_dir).resolve()) if args.run_dir else str(name_dir / "slurm-{job_id}")
    if len(grid) > 1 and "{job_id}" not in run_dir:
        raise VascdistError(f"--run-dir '{args.run_dir}' must contain {{job_id}} when --sweep makes a job array")

    def make_job(config: str | None) -> TrainingJob:
        return TrainingJob(config, list(args.overrides), run_dir, cfg.dist.max_requeues, cfg.dist.requeue_signal,
                           quiet=args.quiet)

    jobs = submit_training(args, log_dir, args.config, cfg.dist.max_requeues, cfg.dist.requeue_signal, make_job,
                           [(point,) for point in grid], array=len(grid) > 1)
    states = job_states(jobs)
    for j, point in zip(jobs, grid):
        where = run_dir.format(job_id=j.job_id)
        print(f"submitted job {j.job_id} ({states[j.job_id]}; {args.nodes} node(s) x {args.tasks_per_node} task(s))"
              + (f" with {' '.join(point)}" if point else ""))
        print(f"  logs: {j.paths.folder}  (task 0: {j.paths.stdout})")
        print(f"  run dir: {where}")
    board = RunLayout(run_dir.format(job_id=jobs[0].job_id)).tensorboard if len(jobs) == 1 else Path(run_dir).parent
    print(f"tensorboard --logdir {board}", flush=True)
    if not args.wait:
        return 0
    final = wait_for(jobs)
    for j, point in zip(jobs, grid):
        print(job_summary(j, final[j.job_id], run_dir.format(job_id=j.job_id), cfg.train.early_stop_metric,
                          " ".join(point)), flush=True)
    return 0 if all(s == "COMPLETED" for s in final.values()) else 1
