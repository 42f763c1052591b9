"""The training loop: one function, read top to bottom. A single CPU process, torchrun and SLURM jobs all
run it unchanged; what differs between them arrives as a DistEnv and an engine.

`train()` builds, resumes, runs `train_step()` per batch and `validate()` per evaluation, and ends with `test()`;
what survives a restart lives in one `TrainState` (train/state.py), and the logger and progress bar are closed
on every exit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn


from vascdist import plots
from vascdist.config import Config, batch_sizes, to_dict
from vascdist.data.build import build_loaders
from vascdist.data.dataloader import WorkerLoader
from vascdist.data.folds import split_index
from vascdist.data.loader import StreamingLoader
from vascdist.data.shards import verify_files
from vascdist.data.transform import InputTransform
from vascdist.dist import DistEnv, any_rank, barrier, global_mean, main_print, run_on_main
from vascdist.errors import VascdistError
from vascdist.eval.assess import applied_report, validation_report
from vascdist.eval.evaluate import improves, predict_arrays, validation_loss
from vascdist.eval.results import RunResult, SplitReport
from vascdist.models import build_model
from vascdist.progress import ProgressReporter
from vascdist.train.engines import Engine, TorchEngine, prepare_module
from vascdist.train.layout import RunLayout
from vascdist.train.losses import build_loss
from vascdist.train.optim import build_optimizer, build_scheduler, run_epochs
from vascdist.train.precision import autocast_context
from vascdist.train.runlog import RunLogger, log_report
from vascdist.train.saved import DataInfo, reader_entries
from vascdist.train.state import TrainState, all_finite

class TrainingDiverged(VascdistError):
    """Too many non-finite losses in a row."""


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv) -> Engine:
    """The engine named by dist.engine: TorchEngine ('ddp', also a single process) or DeepSpeedEngine."""
    if cfg.dist.engine == "deepspeed":
        from vascdist.train.deepspeed_engine import DeepSpeedEngine  # imports deepspeed only when asked for
        return DeepSpeedEngine(module, optimizer, cfg, env)
    return TorchEngine(module, optimizer, cfg, env)


@dataclass
class Run:
    """What the steps of one training run share; built once by `build`."""
    cfg: Config
    env: DistEnv
    classes: list[str]
    per_beat: bool
    state: TrainState
    inputs: InputTransform
    loss_fn: nn.Module
    val_loader: StreamingLoader | WorkerLoader
    test_loader: StreamingLoader | WorkerLoader
    micro: int
    log: RunLogger | None = None


def checked_index(cfg: Config, env: DistEnv) -> dict:
    """The shards' index, after rank 0 verified the files (its error reaches every rank instead of a hang); with
    data.split_file (a cross-validation fold), the fold's splits and normalisation."""
    if cfg.data.verify_checksums:
        run_on_main(env, lambda: verify_files(cfg.data.shards))
    return split_index(cfg.data.shards, cfg.data.split_file)


def build(cfg: Config, env: DistEnv, index: dict, layout: RunLayout) -> Run:
    """Loaders, model, optimiser, engine, schedule and loss for this rank, bundled with a fresh TrainState.

    The run's config has train.epochs raised to cover train.min_steps (it depends on the training set's size)."""
    classes = index["classes"]
    train_loader, val_loader, test_loader = build_loaders(cfg, env)
    epochs = run_epochs(cfg.train.epochs, cfg.train.min_steps, len(train_loader))
    cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    module = prepare_module(build_model(cfg.model, len(classes), tuple(index["sample_shape"])), cfg, env)
    engine = build_engine(module, build_optimizer(cfg.optim, module), cfg, env)
    scheduler = build_scheduler(cfg.sched, engine.optimizer, len(train_loader), cfg.train.epochs)
    extra = reader_entries(to_dict(cfg), DataInfo.entry_of(index), env.world_size)
    state = TrainState(engine, scheduler, train_loader, layout, cfg.train.keep_last, extra, writer=env.is_main)
    return Run(cfg, env, classes, index["kind"] == "beats", state, InputTransform(index, env.device, cfg.train.channels_last),
               build_loss(cfg.loss, len(classes)).to(env.device), val_loader, test_loader,
               batch_sizes(cfg.data.batch_size, env.world_size, cfg.train.grad_accum).micro)


def train(cfg: Config, env: DistEnv, run_dir: Path, resume: str | None = None, quiet: bool = False,
          stop_requested: Callable[[], bool] = lambda: False) -> RunResult:
    """Train `cfg` in `run_dir`; returns how the run ended, with the test report (at thresholds chosen on
    validation) when it finished now.

    `stop_requested` is polled at every step boundary (e.g. a preemption signal): when it is true on any
    rank, all ranks checkpoint together and the function returns a result with `stopped`.
    """
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run = build(cfg, env, checked_index(cfg, env), RunLayout(run_dir))
    cfg, state, progress, loader = run.cfg, run.state, run.state.progress, run.state.loader
    resumed = state.resume(resume)
    if resumed:
        main_print(env, f"resumed from {resumed} at step {progress.step} (epoch {progress.epoch}, "
                        f"{loader.batches}/{len(loader)} batches in)")
    # Created after the resume so that TensorBoard drops the points an interrupted attempt logged past it.
    run.log = RunLogger(run_dir, enabled=env.is_main, purge_step=progress.step + 1 if resumed else None)
    bar = ProgressReporter("train", cfg.train.planned_steps(len(loader)), initial=progress.step,
                           enabled=not quiet and env.is_main, interval_s=cfg.run.progress_interval_s,
                           rate_scale=cfg.data.batch_size, rate_unit="samples")
    try:
        if progress.step == 0:
            log_examples(run)
        if progress.finished and (ended := finished_before(run, run_dir)) is not None:
            return ended
        stopped, finished = False, at_step_limit(run)  # resumed from the limit step's evaluation checkpoint
        while progress.epoch < cfg.train.epochs and not (stopped or finished):
            loader.set_epoch(progress.epoch)
            meter = Throughput(cfg.data.batch_size)
            for batch in meter.wait_for(loader):
                loss, grad_norm = train_step(run, batch, want_norm=should_log(cfg, progress.step))
                log_step(run, loss, grad_norm, meter, bar)
                if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
                    validate(run, decide_early_stop=True)  # patience counts evaluations, mid-epoch ones too
                elif cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
                    save(run)
                finished = progress.stopped_early or at_step_limit(run)
                stopped = any_rank(stop_requested(), env)
                if finished or stopped:
                    break
            else:
                progress.epoch += 1
                state.scheduler.after_epoch()
                if not cfg.train.eval_every:
                    validate(run, decide_early_stop=True)  # its checkpoint records the decision
                    finished = progress.stopped_early
        if stopped:
            save(run)  # the exact state to resume from (mid-epoch included; finished too if this was the last step)
            return RunResult(run_dir, progress.step, stopped=True)
        progress.finished = progress.finished or f"reached the last step of train.epochs={cfg.train.epochs}"
        save(run)  # "finished" is checkpointed: a kill from here on resumes into the test, never into training
        return test(run, run_dir)
    finally:
        bar.close()
        run.log.close()


def finished_before(run: Run, run_dir: Path) -> RunResult | None:
    """A run that had finished before this call: None when its config now plans more steps (it trains on), else
    complete when its test and report were written, or the test that a kill left undone (the report is the
    runner's)."""
    env, progress = run.env, run.state.progress
    planned = run.cfg.train.planned_steps(len(run.state.loader))
    if progress.can_train_on(planned):
        main_print(env, f"the run finished at step {progress.step} ({progress.finished}); the config now plans "
                        f"{planned} steps: training on")
        progress.finished = ""
        return None
    main_print(env, f"the run finished at step {progress.step} ({progress.finished}): not training on")
    if run_on_main(env, lambda: run.state.layout.test_metrics.is_file() and run.state.layout.report.is_file()):
        return RunResult(run_dir, progress.step, complete=True, finished=progress.finished)
    return test(run, run_dir)  # what a kill during the final test (or before the report) left undone


# --------------------------------------------------------------------------------------------- steps
def train_step(run: Run, batch: dict, want_norm: bool) -> tuple[float, float]:
    """One optimiser step over train.grad_accum micro-batches; returns (global loss, gradient norm or NaN).

    A non-finite loss on any rank skips the step on every rank; too many in a row raise TrainingDiverged."""
    cfg, env, engine, progress = run.cfg, run.env, run.state.engine, run.state.progress
    losses = []
    for i in range(cfg.train.grad_accum):
        part = slice(i * run.micro, (i + 1) * run.micro)
        x = run.inputs(batch["x"][part], batch["augment"][part] if "augment" in batch else None)
        y = batch["y"][part].to(env.device, non_blocking=True)
        with engine.micro_step_context(is_last=i == cfg.train.grad_accum - 1):
            with autocast_context(cfg.train.precision, env.device):
                loss = run.loss_fn(engine.forward(x), y) / cfg.train.grad_accum
            engine.backward(loss)
        losses.append(loss.detach())
    step_loss = global_mean(torch.stack(losses).sum(), env)  # the loss of the global batch, the same on every rank
    if math.isfinite(step_loss):
        grad_norm = engine.step(want_norm=want_norm)
        run.state.scheduler.after_step()
        progress.bad_steps_in_a_row = 0
    else:
        engine.skip()
        grad_norm = math.nan
        progress.bad_steps_in_a_row += 1
        progress.bad_steps_total += 1
        if progress.bad_steps_in_a_row >= cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{progress.bad_steps_in_a_row} non-finite losses in a row at step {progress.step}; "
                                   f"{last_finite_checkpoint(run)} (lower optim.lr or set train.grad_clip)")
    progress.step += 1
    return step_loss, grad_norm


def validate(run: Run, decide_early_stop: bool = False) -> SplitReport:
    """The validation report; picks the best checkpoint (ties of a saturated metric go to the lower validation
    loss), steps a plateau schedule, logs and saves (with `decide_early_stop`, after deciding it: a kill after this
    save resumes into the test, not into another epoch)."""
    cfg, progress, classes = run.cfg, run.state.progress, run.classes
    arrays = predict_arrays(run.state.engine.module, run.val_loader, run.env, cfg.train.precision, cfg.train.channels_last)
    check_finite_predictions(run, arrays, "validation")
    loss = validation_loss(arrays)  # the model's own, before eval.calibrate: comparable with train/loss
    arrays, report, temperature = validation_report(arrays, classes, run.per_beat, cfg.eval, loss=loss)
    choices = report.selection_values()
    if cfg.train.early_stop_metric not in choices:
        raise VascdistError(f"train.early_stop_metric '{cfg.train.early_stop_metric}' is not a metric here; "
                            f"choose one of: {', '.join(choices)}")
    value = choices[cfg.train.early_stop_metric]
    improved = not math.isnan(value) and improves(value, loss, progress.best_metric, progress.best_loss)
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        progress.best_loss = loss
        progress.val_thresholds = None if len(classes) != 2 else report.threshold_state()
        progress.temperature = temperature
    else:
        progress.evals_without_improvement += 1
    run.state.scheduler.after_eval(value)
    log = run.log
    level = "cycle" if run.per_beat else "recording"
    if log.active:
        figure = plots.confusion(np.array(report.confusion[level]), classes, f"val, per {level} (step {progress.step})")
        log.image("val/confusion", progress.step, plots.rgb_array(figure))
    if len(classes) == 2 and np.isfinite(arrays["probs"]).all():
        log.pr_curve("val/pr_cycle", progress.step, arrays["y"], arrays["probs"][:, 1])
    log_report(log, progress.step, report, arrays, run.per_beat, epoch=progress.epoch)
    progress.history.append({"step": progress.step, "metric": value})
    if decide_early_stop:
        should_stop_early(run)
    save(run, is_best=improved)
    return report


def save(run: Run, is_best: bool = False) -> None:
    """Checkpoint on every rank together. A model with non-finite weights on any rank is not saved, and the run
    ends there (TrainingDiverged): nothing trained on from non-finite weights can be trusted."""
    finite = not any_rank(not all_finite(run.state.engine.module), run.env)
    if not run.state.save(finite, is_best=is_best):
        raise TrainingDiverged(f"not saving step {run.state.progress.step}: the model has non-finite weights (it "
                               f"diverged); {last_finite_checkpoint(run)} (lower optim.lr or set train.grad_clip)")


def check_finite_predictions(run: Run, arrays: dict, split: str) -> None:
    """Non-finite predictions never reach the metric functions: the run ends with one line instead."""
    if not np.isfinite(arrays["probs"]).all():
        raise TrainingDiverged(f"the {split} predictions at step {run.state.progress.step} are not finite (the model "
                               f"diverged); {last_finite_checkpoint(run)} (lower optim.lr or set train.grad_clip)")


def last_finite_checkpoint(run: Run) -> str:
    """Which checkpoint file a diverged run leaves to fall back on (only finite states are ever saved)."""
    files = run.state.checkpoints.step_files()
    return f"last finite checkpoint kept: {files[-1][1]}" if files else "no checkpoint was saved before it"


def at_step_limit(run: Run) -> bool:
    """Whether train.max_steps is reached; records it as the reason the run finished."""
    cfg, progress = run.cfg, run.state.progress
    if cfg.train.max_steps and progress.step >= cfg.train.max_steps:
        progress.finished = f"reached train.max_steps={cfg.train.max_steps}"
        return True
    return False


def should_stop_early(run: Run) -> bool:
    """Whether train.early_stop_patience evaluations passed without improvement; records why in the progress."""
    cfg, progress = run.cfg, run.state.progress
    if cfg.train.early_stop_patience and progress.evals_without_improvement >= cfg.train.early_stop_patience:
        progress.finished = (f"early stop: {cfg.train.early_stop_metric} did not improve for "
                             f"{progress.evals_without_improvement} evaluations")
        progress.stopped_early = True
        main_print(run.env, progress.finished)
        return True
    return False


def test(run: Run, run_dir: Path) -> RunResult:
    """The test report of the best checkpoint at the thresholds chosen on validation; logged and returned."""
    cfg, env, progress, classes = run.cfg, run.env, run.state.progress, run.classes
    if not progress.history or progress.history[-1]["step"] != progress.step:
        # The steps since the last evaluation (a step limit mid-epoch or between eval_every points, or before the
        # first evaluation) count for the best checkpoint; thresholds come from validation, never from test.
        validate(run)
    barrier(env)  # rank 0's last best.pt is on disk before every rank reads it
    run.state.load_best_weights()
    arrays = predict_arrays(run.state.engine.module, run.test_loader, env, cfg.train.precision, cfg.train.channels_last)
    check_finite_predictions(run, arrays, "test")
    arrays, report = applied_report("test", arrays, classes, run.per_beat, progress.val_thresholds,
                                    progress.temperature, cfg.eval, step=progress.best_step,
                                    calibration_intervals=env.is_main)
    log_report(run.log, progress.step, report, arrays, run.per_beat, save_dir=run_dir if env.is_main else None)
    if env.is_main:
        level = "cycle" if run.per_beat else "recording"
        plots.save_png(plots.confusion(np.array(report.confusion[level]), classes,
                                       f"test, per {level} (best checkpoint, step {progress.best_step})"),
                       run.state.layout.test_confusion)
        final = {f"final/{k}": v for k, v in report.selection_values().items() if not math.isnan(v)}
        run.log.hparams(to_dict(cfg), final)
    return RunResult(run_dir, progress.step, finished=progress.finished, best_step=progress.best_step,
                     best_val=progress.best_metric, classes=classes, reports={"test": report})


# --------------------------------------------------------------------------------------------- logging
def should_log(cfg: Config, step: int) -> bool:
    """Whether the step about to run (index `step`) gets a metrics.jsonl line: the first, then every train.log_every."""
    return step == 0 or (step + 1) % cfg.train.log_every == 0


class Throughput:
    """Samples per second and the fraction of wall time spent waiting for data, over a logging window."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.start, self.waited, self.samples = time.perf_counter(), 0.0, 0

    def wait_for(self, loader):
        """Iterate `loader`, timing how long each batch took to arrive."""
        iterator = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            self.samples += self.batch_size
            yield batch


def log_step(run: Run, loss: float, grad_norm: float, meter: Throughput, bar) -> None:
    """Loss and learning rates every step; gradient norm, samples/s and data wait every train.log_every steps."""
    progress, scheduler = run.state.progress, run.state.scheduler
    lrs = scheduler.current_lrs()
    bar.update(1, epoch=f"{progress.epoch + 1}/{run.cfg.train.epochs}", loss=float(loss), lr=f"{lrs[0]:.3g}")
    scalars = {"train/loss": loss, "train/lr": lrs[0], **{f"train/lr/group{g}": lr for g, lr in enumerate(lrs)},
               "train/bad_steps": progress.bad_steps_total}
    if should_log(run.cfg, progress.step - 1):
        elapsed = time.perf_counter() - meter.start
        scalars["train/grad_norm"] = grad_norm
        scalars["train/samples_per_s"] = meter.samples / elapsed
        scalars["train/data_wait_fraction"] = meter.waited / elapsed
        run.log.jsonl({"step": progress.step, "epoch": progress.epoch, "split": "train", **scalars})
        meter.reset()
    run.log.scalars(progress.step, scalars)


def log_examples(run: Run) -> None:
    """A few validation spectrograms in TensorBoard at step 0 (rank 0 only)."""
    if not run.env.is_main:
        return
    examples = next(iter(run.val_loader), None)
    if examples is not None and examples["x"].dim() == 4:
        run.log.images("val/spectrogram_examples", 0, examples["x"][:8].float())
