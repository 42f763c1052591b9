"""What `vascdist train` runs, in whichever process launched it (plain, torchrun, srun, submitit):
resolve the config, make sure the data exist, pick the run directory, train, report, clean up."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vascdist.config import Config, batch_sizes, load_config, save_config
from vascdist.config.checks import check_against_index, check_config
from vascdist.config.drift import check_resume, effective_config, record_changes
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json
from vascdist.preemption import StopSignals, requeue_slurm_job
if TYPE_CHECKING:  # vascdist.dist and train.state import torch (seconds): loaded once the config has passed its checks
    from vascdist.dist import DistEnv
    from vascdist.train.state import RunLayout

DEFAULT_CONFIG = "quickstart"


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
    from vascdist.train.state import RunLayout
    if run_dir:
        return Path(run_dir)
    newest = RunLayout.newest_with_checkpoints(cfg.run.out_dir, cfg.run.name) if resume == "auto" else None
    return (newest or RunLayout.new(cfg.run.out_dir, cfg.run.name)).root


def format_summary(summary: dict) -> str:
    """The table a user sees at the end of training: test metrics per level."""
    test = summary["test"]
    levels = [lv for lv in ("cycle", "recording", "patient") if f"{lv}/accuracy" in test]
    names = ["balanced_accuracy", "sensitivity", "specificity", "auroc", "f1", "n"] if len(summary["classes"]) == 2 \
        else ["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "n"]
    names.append("excluded")  # recordings (patients) of the split left out of the data, with no prediction
    fmt = lambda v: "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:>5d}" if isinstance(v, int) else f"{v:5.3f}")
    lines = [f"test set ({', '.join(summary['classes'])}), thresholds chosen on validation; best step {summary['best_step']}",
             f"{'level':<10}" + "".join(f"{n:>19}" for n in names)]
    for lv in levels:
        lines.append(f"{lv:<10}" + "".join(f"{fmt(test.get(f'{lv}/{n}')):>19}" for n in names))
    lines.append(f"run directory: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']}/tb)"
                 if summary.get("show_run_dir", True) else f"tensorboard --logdir {summary['run_dir']}/tb")
    return "\n".join(lines)


def prepare_run_dir(cfg: Config, layout: RunLayout, resume: str | None) -> str | None:
    """The checkpoint file `resume` picks (None: a fresh start), after checking the change of config it makes.

    A resume may only make safe changes (recorded in the config history); a new run writes config.yaml, and the
    original is never rewritten. Runs on global rank 0 (it creates the run directory).
    """
    from vascdist.train.state import resolve_resume, saved_step_of
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
    from vascdist.train.state import RunLayout
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
            if os.environ.get("VASCDIST_REQUEUE") == "scontrol":  # set by slurm/train.sbatch
                print(requeue_slurm_job(cfg.dist.max_requeues), flush=True)
        if env.is_main and not summary["stopped"]:
            from vascdist.data.shards import excluded_counts
            summary["test"].update(excluded_counts(index, "test"))
            atomic_write_json(layout.test_metrics, summary["test"])
            print(format_summary({**summary, "show_run_dir": False}), flush=True)  # printed once, at the start
        return summary
    finally:
        if own_env:
            shutdown(env)
