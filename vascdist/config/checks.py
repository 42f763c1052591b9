"""Checks of a whole config before any work starts, in two stages, so that a mistake costs seconds, not a run.

`check_config(cfg)` needs nothing but the config (no torch, no data): `vascdist train` runs it before it
synthesises or preprocesses anything. `check_against_index(cfg, index, world_size)` needs the shards' index.json
(numbers of samples, classes, data kind): it runs right after the index is read and before the run directory is
made. Section-local range checks stay in each dataclass's ``check()`` (schema.py); what lives here crosses
sections or needs more than the config.

This module sits above the builders: the valid names and options of models, losses, optimisers and schedules
are owned by their registries (model_names.py, train/losses.py, train/optim.py, all importable without torch),
and the checks here ask them, so a name is written once.
"""

from __future__ import annotations

import difflib

from vascdist.config.batch import batch_sizes
from vascdist.config.schema import Config
from vascdist.errors import ConfigError

LEVELS = ("cycle", "recording", "patient")  # the levels vascdist.eval.metrics reports, 'cycle/' only for beats


def _close(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_config(cfg: Config) -> None:
    """Every check that needs only the config; raises ConfigError naming the dotted key."""
    from vascdist.model_names import NORMS, model_options, registered_models
    from vascdist.preemption import signal_number
    from vascdist.train.losses import check_loss_config
    from vascdist.train.optim import check_optim_config, check_sched_config

    check_loss_config(cfg.loss, "loss")
    check_optim_config(cfg.optim, "optim")
    check_sched_config(cfg.sched, "sched")

    models = sorted(registered_models())
    if cfg.model.name not in models:
        raise ConfigError(f"model.name '{cfg.model.name}' is unknown; {_close(cfg.model.name, models)}"
                          f"choose one of: {', '.join(models)} (`vascdist models`)")
    if cfg.model.norm != NORMS[0] and "norm" not in model_options(cfg.model.name):
        raise ConfigError(f"config key 'model.norm': model '{cfg.model.name}' has no choice of normalisation (only "
                          f"'{NORMS[0]}'); models that take model.norm={cfg.model.norm}: "
                          f"{', '.join(n for n in models if 'norm' in model_options(n))}")
    try:
        signal_number(cfg.dist.requeue_signal)  # a name it does not know is a ConfigError naming the key
    except ValueError:
        raise ConfigError(f"config key 'dist.requeue_signal': unknown signal number '{cfg.dist.requeue_signal}'") from None
    level, _, metric = cfg.train.early_stop_metric.partition("/")
    if level not in LEVELS or not metric:
        raise ConfigError(f"config key 'train.early_stop_metric' must look like <level>/<metric> with level one of "
                          f"{', '.join(LEVELS)} (e.g. recording/balanced_accuracy), got '{cfg.train.early_stop_metric}'")
    if cfg.dist.engine == "deepspeed":
        check_deepspeed_options(cfg)
    if cfg.data.transform:  # imported now, so that a typo fails before any data is made or read
        from vascdist.data.hooks import load_callable
        load_callable(cfg.data.transform, "data.transform")
    max_steps = cfg.train.max_steps
    if cfg.sched.name == "cosine" and max_steps and cfg.sched.warmup_steps >= max_steps:
        raise ConfigError(f"config key 'sched.warmup_steps' ({cfg.sched.warmup_steps}) must be below the run's "
                          f"train.max_steps ({max_steps}), or the learning rate never leaves its warm-up")


def check_deepspeed_options(cfg: Config) -> None:
    """What vascdist's DeepSpeed engine does not do, refused before any data or run directory is made."""
    if cfg.train.compile:
        raise ConfigError("config key 'train.compile' is not supported with dist.engine=deepspeed")
    if cfg.dist.zero_stage == 3:
        # Tried: training matches DDP, but module.state_dict() holds empty partitions and evaluation
        # forwards are collectives that uneven val shards leave unmatched.
        raise ConfigError("config key 'dist.zero_stage' = 3 is not supported by vascdist's DeepSpeed engine "
                          "(the loop saves and evaluates the unpartitioned module); use 0, 1 or 2")


def metric_names(classes: list[str], kind: str) -> list[str]:
    """The scalar validation metrics a run on data of `kind` with `classes` reports (what the loop computes)."""
    import numpy as np

    from vascdist.eval.evaluate import split_metrics
    n = 2 * len(classes)  # two samples per class, each its own recording and patient
    arrays = {"probs": np.full((n, len(classes)), 1.0 / len(classes)), "y": np.arange(n) % len(classes),
              "recording": np.arange(n), "patient": np.arange(n)}
    metrics = split_metrics(arrays, classes, kind == "beats")
    return [k for k, v in metrics.items() if isinstance(v, float)]


def check_against_index(cfg: Config, index: dict, world_size: int = 1) -> int:
    """The checks that need the shards' index.json; returns the number of optimiser steps the run will take."""
    classes, kind, shape = index["classes"], index["kind"], tuple(index["sample_shape"])
    where = f"data.shards '{cfg.data.shards}'"
    for key, values in (("loss.class_weights", cfg.loss.class_weights), ("loss.focal_alpha", cfg.loss.focal_alpha)):
        if values and len(values) != len(classes):
            raise ConfigError(f"config key '{key}' has {len(values)} values but {where} has {len(classes)} classes "
                              f"({', '.join(classes)})")
    from vascdist.model_names import registered_models
    ranks = registered_models()[cfg.model.name]
    if len(shape) not in ranks:
        fitting = [n for n, r in sorted(registered_models().items()) if len(shape) in r]
        raise ConfigError(f"model.name '{cfg.model.name}' does not take {kind} samples of shape {list(shape)} from "
                          f"{where}; models for this data: {', '.join(fitting)}")
    for key, on in (("data.spec_augment", cfg.data.spec_augment), ("data.noise_floor_db", bool(cfg.data.noise_floor_db)),
                    ("data.time_shift", cfg.data.time_shift)):
        if on and len(shape) != 3:
            raise ConfigError(f"config key '{key}' needs spectrogram shards; {where} holds {kind} samples")
    norm = index["preprocess"].get("spectrogram", {}).get("recording_norm", "none")
    if cfg.data.noise_floor_db and norm != "band_mean":
        raise ConfigError(f"config key 'data.noise_floor_db' needs shards written with "
                          f"preprocess.spectrogram.recording_norm=band_mean (the floor is placed relative to each band's "
                          f"mean); {where} has recording_norm '{norm}'")
    batch_sizes(cfg.data.batch_size, world_size, cfg.train.grad_accum)  # the one owner of batch arithmetic
    train_samples = index["splits"]["train"]["samples"]
    steps_per_epoch = train_samples // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'data.batch_size' ({cfg.data.batch_size}) is larger than the train split of "
                          f"{where} ({train_samples} samples)")
    steps = cfg.train.planned_steps(steps_per_epoch)
    if cfg.sched.name == "cosine" and cfg.sched.warmup_steps >= steps:
        raise ConfigError(f"config key 'sched.warmup_steps' ({cfg.sched.warmup_steps}) must be below the {steps} "
                          f"optimiser steps of this run ({steps_per_epoch} per epoch x train.epochs={cfg.train.epochs}"
                          f"{f', train.max_steps={cfg.train.max_steps}' if cfg.train.max_steps else ''})")
    metrics = metric_names(classes, kind)
    if cfg.train.early_stop_metric not in metrics:
        raise ConfigError(f"config key 'train.early_stop_metric' is '{cfg.train.early_stop_metric}', which {kind} "
                          f"shards with {len(classes)} classes do not report; {_close(cfg.train.early_stop_metric, metrics)}"
                          f"choose one of: {', '.join(metrics)}")
    return steps


__all__ = ["LEVELS", "check_against_index", "check_config", "metric_names"]
