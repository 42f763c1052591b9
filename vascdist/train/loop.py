"""The training loop: one function, read top to bottom. A single CPU process, torchrun and SLURM jobs all
run it unchanged; what differs between them arrives as a DistEnv and an engine."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vascdist.config import Config, batch_sizes, to_dict
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.folds import split_index
from vascdist.data.shards import verify_files
from vascdist.data.transform import InputTransform
from vascdist.dist import DistEnv, any_rank, broadcast_object, global_mean
from vascdist.errors import VascdistError
from vascdist.models import build_model
from vascdist.train.checkpoint import CheckpointManager, capture_rng_state, resolve_resume, restore_rng_state
from vascdist.train.engines import build_engine, prepare_module
from vascdist.train.assess import log_split, test_metrics, validation_metrics
from vascdist.train.evaluate import improves, predict_arrays, validation_loss
from vascdist.train.precision import autocast_context
from vascdist.progress import ProgressReporter
from vascdist.train.runlog import RunLogger
from vascdist.train.losses import build_loss
from vascdist.train.metrics import render_confusion_matrix, save_confusion_png, thresholds_from
from vascdist.train.optim import build_optimizer, build_scheduler, run_epochs


class TrainingDiverged(VascdistError):
    """Too many non-finite losses in a row."""


@dataclass
class Progress:
    """Loop counters that a checkpoint restores."""
    step: int = 0
    epoch: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    best_loss: float = math.inf  # validation loss at best_step: breaks ties of a saturated metric
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    bad_steps_total: int = 0
    val_thresholds: dict | None = None
    temperature: float = 1.0
    history: list = field(default_factory=list)


def data_info(index: dict) -> dict:
    """What inference needs to know about the data a model was trained on (stored in every checkpoint)."""
    info = {k: index[k] for k in ("kind", "classes", "sample_shape", "preprocess", "normalization")}
    return {**info, "quality_range": index.get("quality_range", {})}  # predict warns outside it


def build_loaders(cfg: Config, env: DistEnv) -> tuple[StreamingLoader, StreamingLoader, StreamingLoader]:
    """Train / val / test loaders for this rank."""
    aug = (cfg.data.freq_mask, cfg.data.time_mask) if cfg.data.spec_augment else None
    pin = env.device.type == "cuda"

    def make(split: str, train: bool) -> StreamingLoader:
        stream = ShardStream(cfg.data.shards, split, cfg.data.batch_size, env.rank, env.world_size, cfg.train.seed,
                             train=train, shuffle_chunks=cfg.data.shuffle_chunks, spec_augment=aug,
                             split_file=cfg.data.split_file)
        return StreamingLoader(stream, cfg.data.num_workers if train else min(cfg.data.num_workers, 1),
                               cfg.data.prefetch_factor, pin)
    return make("train", True), make("val", False), make("test", False)


def train(cfg: Config, env: DistEnv, run_dir: Path, resume: str | None = None, quiet: bool = False,
          stop_requested: Callable[[], bool] = lambda: False) -> dict:
    """Train `cfg` in `run_dir`; returns a summary with the test metrics (at thresholds chosen on validation).

    `stop_requested` is polled at every step boundary (e.g. a preemption signal): when it is true on any
    rank, all ranks checkpoint together and the function returns with summary['stopped'] = True.
    """
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    problem = None
    if env.is_main and cfg.data.verify_checksums:
        try:
            verify_files(cfg.data.shards)
        except VascdistError as exc:
            problem = str(exc)
    problem = broadcast_object(problem, env)  # every rank stops with the same message instead of hanging
    if problem:
        raise VascdistError(problem)
    index = split_index(cfg.data.shards, cfg.data.split_file)  # with a split file: the fold's normalisation
    classes, per_beat = index["classes"], index["kind"] == "beats"
    train_loader, val_loader, test_loader = build_loaders(cfg, env)
    inputs = InputTransform(index, env.device, cfg.train.channels_last)
    steps_per_epoch = len(train_loader)
    cfg = replace(cfg, train=replace(cfg.train, epochs=run_epochs(cfg.train.epochs, cfg.train.min_steps,
                                                                  steps_per_epoch)))  # train.min_steps
    micro = batch_sizes(cfg.data.batch_size, env.world_size, cfg.train.grad_accum).micro

    module = prepare_module(build_model(cfg.model, len(classes), tuple(index["sample_shape"])), cfg, env)
    optimizer = build_optimizer(cfg.optim, module)
    engine = build_engine(module, optimizer, cfg, env)
    scheduler = build_scheduler(cfg.sched, optimizer, steps_per_epoch, cfg.train.epochs)
    loss_fn = build_loss(cfg.loss, len(classes)).to(env.device)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.train.keep_last)
    progress = Progress()

    def state() -> dict:
        return {"engine": engine.state_dict(), "scheduler": scheduler.state_dict(),
                "loader": train_loader.state_dict(), "rng": capture_rng_state(), "progress": vars(progress).copy(),
                "config": to_dict(cfg), "data": data_info(index), "world_size": env.world_size}

    def save(is_best: bool = False) -> None:
        engine.save_checkpoint(checkpoints, progress.step, state(), is_best=is_best)

    resume_path = resolve_resume(resume, run_dir / "checkpoints") if resume else None
    if resume_path is not None:
        saved = engine.load_checkpoint(checkpoints, resume_path)
        scheduler.load_state_dict(saved["scheduler"])
        train_loader.load_state_dict(saved["loader"])
        restore_rng_state(saved["rng"])
        progress = Progress(**saved["progress"])
        if env.is_main:
            print(f"resumed from {resume_path} at step {progress.step} (epoch {progress.epoch}, "
                  f"{train_loader.batches}/{steps_per_epoch} batches in)", flush=True)

    # Created after the resume so that TensorBoard drops the points an interrupted attempt logged past it.
    log = RunLogger(run_dir, enabled=env.is_main, purge_step=progress.step + 1 if resume_path else None)

    def evaluate() -> dict:
        arrays = predict_arrays(engine.module, val_loader, env, cfg.train.precision, cfg.train.channels_last)
        loss = validation_loss(arrays)  # the model's own, before eval.calibrate: comparable with train/loss
        arrays, metrics, temperature = validation_metrics(arrays, classes, per_beat, cfg.eval)
        metrics["loss"] = loss
        value = float(metrics.get(cfg.train.early_stop_metric, math.nan))
        if cfg.train.early_stop_metric not in metrics:
            raise VascdistError(f"train.early_stop_metric '{cfg.train.early_stop_metric}' is not a metric here; "
                                f"choose one of: {', '.join(k for k, v in metrics.items() if isinstance(v, float))}")
        improved = not math.isnan(value) and improves(value, loss, progress.best_metric, progress.best_loss)
        if improved:
            progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
            progress.best_loss = loss
            progress.val_thresholds = None if len(classes) != 2 else thresholds_from(metrics)
            progress.temperature = temperature
        else:
            progress.evals_without_improvement += 1
        scheduler.after_eval(value)
        level = "cycle" if per_beat else "recording"
        log.image("val/confusion", progress.step, render_confusion_matrix(np.array(metrics[f"{level}/confusion"]), classes))
        if len(classes) == 2 and np.isfinite(arrays["probs"]).all():
            log.pr_curve("val/pr_cycle", progress.step, arrays["y"], arrays["probs"][:, 1])
        log_split(log, progress.step, "val", arrays, classes, per_beat, metrics, cfg.eval, epoch=progress.epoch)
        progress.history.append({"step": progress.step, "metric": value})
        save(is_best=improved)
        return metrics

    if env.is_main and progress.step == 0:
        examples = next(iter(val_loader), None)
        if examples is not None and examples["x"].dim() == 4:
            log.images("val/spectrogram_examples", 0, examples["x"][:8].float())
    bar = ProgressReporter("train", cfg.train.planned_steps(steps_per_epoch), initial=progress.step,
                           enabled=not quiet and env.is_main, interval_s=cfg.run.progress_interval_s,
                           rate_scale=cfg.data.batch_size, rate_unit="samples")
    stopped, finished = False, False
    module.train()
    while progress.epoch < cfg.train.epochs and not (stopped or finished):
        train_loader.set_epoch(progress.epoch)
        window_start, data_wait, window_samples = time.perf_counter(), 0.0, 0
        t_wait = time.perf_counter()
        for batch in train_loader:
            data_wait += time.perf_counter() - t_wait
            # ---- one optimiser step over grad_accum micro-batches
            losses = []
            for i in range(cfg.train.grad_accum):
                part = slice(i * micro, (i + 1) * micro)
                x = inputs(batch["x"][part], batch["augment"][part] if "augment" in batch else None)
                y = batch["y"][part].to(env.device, non_blocking=True)
                with engine.micro_step_context(is_last=i == cfg.train.grad_accum - 1):
                    with autocast_context(cfg.train.precision, env.device):
                        loss = loss_fn(engine.model(x), y) / cfg.train.grad_accum
                    engine.backward(loss)
                losses.append(loss.detach())
            step_loss = global_mean(torch.stack(losses).sum(), env)  # the loss of the global batch
            log_now = (progress.step + 1) % 10 == 0 or progress.step == 0  # a metrics.jsonl line for this step
            if math.isfinite(step_loss):
                grad_norm = engine.step(want_norm=log_now)
                scheduler.after_step()
                progress.bad_steps_in_a_row = 0
            else:
                engine.skip()
                grad_norm = math.nan
                progress.bad_steps_in_a_row += 1
                progress.bad_steps_total += 1
                if progress.bad_steps_in_a_row >= cfg.train.max_bad_steps:
                    log.close()
                    raise TrainingDiverged(f"{progress.bad_steps_in_a_row} non-finite losses in a row at step "
                                           f"{progress.step}; last good checkpoint kept in {run_dir / 'checkpoints'} "
                                           "(lower optim.lr or set train.grad_clip)")
            progress.step += 1

            # ---- logging (rank 0 only: RunLogger is disabled elsewhere)
            window_samples += cfg.data.batch_size
            elapsed = time.perf_counter() - window_start
            lrs = scheduler.current_lrs()
            bar.update(1, epoch=f"{progress.epoch + 1}/{cfg.train.epochs}", loss=float(step_loss), lr=f"{lrs[0]:.3g}")
            scalars = {"train/loss": step_loss, "train/lr": lrs[0], **{f"train/lr/group{g}": lr for g, lr in enumerate(lrs)},
                       "train/bad_steps": progress.bad_steps_total}
            if log_now:
                scalars["train/grad_norm"] = grad_norm
                scalars["train/samples_per_s"] = window_samples / elapsed
                scalars["train/data_wait_fraction"] = data_wait / elapsed
                log.jsonl({"step": progress.step, "epoch": progress.epoch, "split": "train", **scalars})
                window_start, data_wait, window_samples = time.perf_counter(), 0.0, 0
            log.scalars(progress.step, scalars)

            # ---- evaluation, checkpoints, stopping
            if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
                evaluate()
            elif cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
                save()
            if cfg.train.max_steps and progress.step >= cfg.train.max_steps:
                finished = True
            if any_rank(stop_requested(), env):
                stopped = True
            if finished or stopped:
                break
            t_wait = time.perf_counter()
        else:
            progress.epoch += 1
            scheduler.after_epoch()
            if not cfg.train.eval_every:
                evaluate()
            if cfg.train.early_stop_patience and progress.evals_without_improvement >= cfg.train.early_stop_patience:
                if env.is_main:
                    print(f"early stop: {cfg.train.early_stop_metric} did not improve for "
                          f"{progress.evals_without_improvement} evaluations", flush=True)
                finished = True
    bar.close()
    if stopped or finished:
        save()  # the exact state to resume from (mid-epoch included)
    if stopped:
        log.close()
        return {"stopped": True, "step": progress.step}

    # ---- final test evaluation with the best checkpoint and the thresholds chosen on validation
    if progress.best_step < 0:
        evaluate()  # no evaluation happened yet (max_steps before the first one): thresholds come from val, never test
    best = run_dir / "checkpoints" / "best.pt"
    if best.exists():
        engine.module.load_state_dict(checkpoints.load(best)["engine"]["model"])
    arrays = predict_arrays(engine.module, test_loader, env, cfg.train.precision, cfg.train.channels_last)
    arrays, test = test_metrics(arrays, classes, per_beat, progress.val_thresholds, progress.temperature)
    assessed = log_split(log, progress.step, "test", arrays, classes, per_beat, test, cfg.eval,
                         save_dir=run_dir if env.is_main else None)
    summary = {"stopped": False, "step": progress.step, "best_step": progress.best_step,
               "best_val": progress.best_metric, "test": test, "classes": classes, "run_dir": str(run_dir),
               "test_intervals": assessed["intervals"], "test_counts": assessed["counts"],
               "test_record": assessed["record"]}
    if env.is_main:
        level = "cycle" if per_beat else "recording"
        save_confusion_png(np.array(test[f"{level}/confusion"]), classes, run_dir / "test_confusion.png",
                           title=f"test, per {level}")
        final = {f"final/{k}": v for k, v in test.items() if isinstance(v, float) and not math.isnan(v)}
        log.hparams(to_dict(cfg), final)
    log.close()
    return summary
