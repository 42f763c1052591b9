"""What `vascdist train` runs, in whichever process launched it (plain, torchrun, srun, submitit):
resolve the config, make sure the data exist, pick the run directory, train, report, clean up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vascdist.config import DEFAULT_CONFIG, Config, batch_sizes, load_config, save_config
from vascdist.config.checks import check_against_index, check_config
from vascdist.config.drift import check_resume, effective_config, record_changes
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json
from vascdist.preemption import StopSignals, requeue_slurm_job
from vascdist.train.layout import RunLayout, saved_step_of

if TYPE_CHECKING:  # vascdist.dist imports torch (seconds): loaded only once the config has passed its checks
    from vascdist.dist import DistEnv

def ensure_data(cfg: Config, quiet: bool) -> None:
    """If the configured shards are missing and data.synth_patients > 0, synthesise and preprocess them (cached)."""
    shards = Path(cfg.data.shards)
    if (shards / "index.json").exists():
        return
    if cfg.data.synth_patients <= 0:
        raise VascdistError(f"data.shards '{shards}' holds no shards; run `vascdist preprocess --out {shards}` first")
    from vascdist.data.preprocess import preprocess
    from vascdist.data.synth import synthesize
    raw = shards.parent / "recordings"
    if not quiet:
        print(f"synthesising {cfg.data.synth_patients} patients into {raw} (seed {cfg.data.synth_seed})", flush=True)
    manifest = synthesize(raw, n_patients=cfg.data.synth_patients, seed=cfg.data.synth_seed,
                          sample_rate=cfg.preprocess.audio.sample_rate)
    preprocess(manifest, shards, cfg.preprocess, workers=2, progress=not quiet,
               progress_interval_s=cfg.run.progress_interval_s)


def pick_run_dir(cfg: Config, resume: str | None, run_dir: str | None) -> Path:
    """runs/<name>/<time>/; with --resume auto, the newest run of that name that has checkpoints."""
    if run_dir:
        return Path(run_dir)
    newest = RunLayout.newest_with_checkpoints(cfg.run.out_dir, cfg.run.name) if resume == "auto" else None
    return (newest or RunLayout.new(cfg.run.out_dir, cfg.run.name)).root


def format_summary(summary: dict) -> str:
    """The table a user sees at the end of training: test metrics per level, with intervals and the split's n."""
    from vascdist.eval.assess import format_table
    lines = [f"test set ({', '.join(summary['classes'])}), thresholds chosen on validation; best step {summary['best_step']}",
             format_table(summary["test"], summary["classes"], summary.get("test_intervals"), summary.get("test_counts"),
                          summary.get("test_record", {}).get("confidence", 0.95)),
             f"run directory: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']}/tb)"
             if summary.get("show_run_dir", True) else f"tensorboard --logdir {summary['run_dir']}/tb"]
    return "\n".join(lines)


def prepare_run_dir(cfg: Config, layout: RunLayout, resume: str | None) -> str | None:
    """The checkpoint file `resume` picks (None: a fresh start), after checking the change of config it makes.

    A resume may only make safe changes (recorded in the config history); a new run writes config.yaml, and the
    original is never rewritten. Runs on global rank 0 (it creates the run directory).
    """
    from vascdist.train.state import resolve_resume
    resume_from = resolve_resume(resume, layout.checkpoints) if resume else None
    origin = resume_from.parent.parent if resume_from else None  # <run>/checkpoints/step-*.pt
    previous = effective_config(origin) if origin else None
    changes = check_resume(cfg, previous) if previous is not None else {}
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.config.exists():
        save_config(cfg, layout.config)
    elif changes:
        record_changes(layout.root, saved_step_of(resume_from), changes)
    print(f"run directory: {layout.root}", flush=True)
    return str(resume_from) if resume_from else None


def run_training(config: str | None, overrides: list[str], resume: str | None = None, run_dir: str | None = None,
                 quiet: bool = False, stop_requested: Callable[[], bool] = lambda: False,
                 env: DistEnv | None = None) -> dict:
    """Check, parse, build, train, report; the process group is torn down on every exit path.

    Everything that needs only the config is checked before anything is imported, synthesised or written;
    what needs the shards' index right after it is read, before the run directory exists.
    """
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    check_config(cfg)
    from vascdist.dist import init_distributed, run_on_main, shutdown
    own_env = env is None
    env = env or init_distributed(cfg.train.device, cfg.dist.timeout_s)
    try:
        batch_sizes(cfg.data.batch_size, env.world_size, cfg.train.grad_accum)  # before any data or run dir is made
        if cfg.dist.engine == "deepspeed":  # a contradicting DeepSpeed JSON fails before any data or run dir is made
            from vascdist.train.deepspeed_engine import build_deepspeed_config
            build_deepspeed_config(cfg, env.world_size, env.device)
        run_on_main(env, lambda: ensure_data(cfg, quiet))  # its error reaches every rank
        from vascdist.data.shards import load_index
        index = load_index(cfg.data.shards)
        check_against_index(cfg, index, env.world_size)
        if cfg.train.check_memory:
            from vascdist.train.memory import check_memory
            check_memory(cfg, index, env.device, env.world_size)
        layout = RunLayout(run_on_main(env, lambda: str(pick_run_dir(cfg, resume, run_dir))))
        resume_from = run_on_main(env, lambda: prepare_run_dir(cfg, layout, resume))  # every rank stops alike
        path = layout.root
        from vascdist.train.loop import train
        with StopSignals((cfg.dist.requeue_signal, "TERM")) as signals:
            summary = train(cfg, env, path, resume=resume_from, quiet=quiet,
                            stop_requested=lambda: signals.requested() or stop_requested())
        if env.is_main and summary["stopped"]:  # rank 0 alone reports and requeues
            print(f"stopped at step {summary['step']} ({signals.received.name if signals.received else 'requested'}); "
                  f"checkpoint saved in {layout.checkpoints}; continue with --resume auto", flush=True)
            if os.environ.get("VASCDIST_REQUEUE") == "scontrol":  # set by the sbatch template (vascdist/launch/train.sbatch)
                print(requeue_slurm_job(cfg.dist.max_requeues), flush=True)
        if env.is_main and not summary["stopped"]:
            from vascdist.data.folds import split_index
            from vascdist.data.shards import excluded_counts
            excluded = excluded_counts(split_index(cfg.data.shards, cfg.data.split_file), "test")
            summary["test"].update(excluded)
            summary["test_record"].update(excluded)
            atomic_write_json(layout.test_metrics, summary["test_record"])
            print(format_summary({**summary, "show_run_dir": False}), flush=True)  # printed once, at the start
            from vascdist.report import write_report
            print(f"report: {write_report(path)}", flush=True)
        return summary
    finally:
        if own_env:
            shutdown(env)
