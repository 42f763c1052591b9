"""Optimisers (SGD, Adam, AdamW, AdaBound) and learning-rate schedules with explicit training-loop hooks.

`OPTIMIZERS` and `SCHEDULES` are the one lists of valid optim.name and sched.name values; the config check
asks them (this module imports torch only inside the builders).

`build_optimizer(cfg.optim, model)` puts weights in a decayed group and biases / norm parameters in an
undecayed one. `build_scheduler(cfg.sched, optimizer, steps_per_epoch, epochs)` returns an `LRSchedule`
whose three hooks the loop calls at fixed places, so no schedule is stepped at the wrong granularity:

    after_step()         after every optimiser step       cosine (warm-up + cosine), onecycle
    after_epoch()        at the end of every epoch        step, exponential (step_size counts epochs;
                                                           step with sched.step_fraction counts steps)
    after_eval(metric)   after every validation           plateau (mode 'max': higher metric is better)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from vascdist.config.schema import OptimConfig, SchedConfig
from vascdist.errors import ConfigError, VascdistError

if TYPE_CHECKING:  # torch is imported by the builders, so the config check (the registries) stays light
    from torch import nn
    from torch.optim import Optimizer


# --------------------------------------------------------------------------------------------- optimisers
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into 'decay' (weights) and 'no_decay' (biases, norm scales/shifts).

    A parameter is undecayed if it is 1-D or named *.bias: norm layers' weight and bias are 1-D vectors,
    and decaying them only fights the normalisation. Empty groups are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise VascdistError(f"model {type(model).__name__} has no trainable parameters to optimise")
    return groups


def _sgd(cfg: OptimConfig, groups: list) -> Optimizer:
    import torch
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adam(cfg: OptimConfig, groups: list) -> Optimizer:
    import torch
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def _adamw(cfg: OptimConfig, groups: list) -> Optimizer:
    import torch
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def _adabound(cfg: OptimConfig, groups: list) -> Optimizer:
    from vascdist.train.adabound import AdaBound
    return AdaBound(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), final_lr=cfg.final_lr, gamma=cfg.bound_gamma)


# The one list of valid optim.name values.
OPTIMIZERS: dict[str, Callable[[OptimConfig, list], Optimizer]] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "adabound": _adabound}


def check_optim_config(cfg: OptimConfig, key: str = "optim") -> None:
    """The optimiser checks that need no model: the name and the options only one optimiser takes (the lr's range is
    checked at config load, schema.py)."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"config key '{key}.name' must be one of {', '.join(OPTIMIZERS)}; got '{cfg.name}'")
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(f"config key '{key}.nesterov' needs optim.momentum > 0")
    if cfg.name == "adabound":
        if not (math.isfinite(cfg.final_lr) and cfg.final_lr > 0):
            raise ConfigError(f"config key '{key}.final_lr' must be > 0, got {cfg.final_lr}")
        if not 0 < cfg.bound_gamma < 1:
            raise ConfigError(f"config key '{key}.bound_gamma' must be in (0, 1), got {cfg.bound_gamma}")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    """The optimiser named by `cfg.name` over `model`'s trainable parameters (see `param_groups`)."""
    check_optim_config(cfg)
    groups = param_groups(model, cfg.weight_decay)
    for group in groups:
        group["peak_lr"] = cfg.lr  # saved with the optimiser; schedules rebuilt on resume read it (`peak_lrs`)
    return OPTIMIZERS[cfg.name](cfg, groups)


# --------------------------------------------------------------------------------------------- schedules
_AFTER_STEP = ("cosine", "onecycle")
_AFTER_EPOCH = ("step", "exponential")
_AFTER_EVAL = ("plateau",)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """lr / peak after `step` optimiser steps: linear warm-up, then cosine from 1 down to `floor`.

    Warm-up goes (step + 1) / (warmup_steps + 1), so the first step already learns and step == warmup_steps
    is the peak; the cosine reaches `floor` at total_steps and stays there if the run goes on.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_lrs(optimizer: Optimizer) -> list[float]:
    """Each group's configured (peak) lr: 'peak_lr' set by `build_optimizer`, else the group's current lr.

    The current lr is not enough on resume: an optimiser loaded from a checkpoint carries a decayed lr.
    """
    return [group.get("peak_lr", group["lr"]) for group in optimizer.param_groups]


class LRSchedule:
    """A torch lr scheduler (or none) behind the three hooks the training loop calls; see the module doc."""

    def __init__(self, name: str, optimizer: Optimizer, scheduler: Any | None, per_step: bool = False):
        self.name = name
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.per_step = per_step or name in _AFTER_STEP  # StepLR with sched.step_fraction counts steps

    def after_step(self) -> None:
        """Call after every optimiser step."""
        if self.name == "onecycle" and self.scheduler.last_epoch + 1 >= self.scheduler.total_steps:
            # Step total_steps - 1 is OneCycleLR's minimum; one more step bends the cosine back up and the
            # next raises. A run longer than planned keeps the final lr.
            return
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self) -> None:
        """Call at the end of every training epoch."""
        if self.name in _AFTER_EPOCH and not self.per_step:
            self.scheduler.step()

    def after_eval(self, metric: float) -> None:
        """Call after every validation with the metric that picks the best model (higher is better)."""
        if self.name in _AFTER_EVAL:
            self.scheduler.step(metric)

    def current_lrs(self) -> list[float]:
        """The learning rate of each param group, as the next optimiser step will use it."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Schedule name and the torch scheduler's counters (restore with `load_state_dict`)."""
        return {"name": self.name, "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and the learning rates they imply, whether or not the optimiser was loaded first.

        torch schedulers step once when built, which resets the param groups' lr; loading a scheduler's state
        does not undo that, so the saved last lrs are written back into the param groups here.
        """
        if state["name"] != self.name:
            raise VascdistError(f"checkpoint holds an lr schedule '{state['name']}' but config key 'sched.name' "
                                f"is '{self.name}'; resume with the same schedule")
        if self.scheduler is None:
            return
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


def _cosine(cfg: SchedConfig, optimizer: Optimizer, total_steps: int):
    from torch.optim import lr_scheduler
    if cfg.warmup_steps >= total_steps:
        raise ConfigError(f"config key 'sched.warmup_steps' ({cfg.warmup_steps}) must be below the run's "
                          f"{total_steps} optimiser steps")
    factors = []
    for group, peak in zip(optimizer.param_groups, peak_lrs(optimizer)):
        group["initial_lr"] = peak  # LambdaLR multiplies its factor onto initial_lr
        if cfg.min_lr > peak:
            raise ConfigError(f"config key 'sched.min_lr' ({cfg.min_lr}) must not exceed the peak lr ({peak})")
        floor = cfg.min_lr / peak
        factors.append(lambda step, floor=floor: warmup_cosine_factor(step, cfg.warmup_steps, total_steps, floor))
    return lr_scheduler.LambdaLR(optimizer, factors)


def _step(cfg: SchedConfig, optimizer: Optimizer, total_steps: int):
    from torch.optim import lr_scheduler
    if cfg.step_fraction > 0:  # decay every step_fraction of the run, counted in optimiser steps (see LRSchedule)
        return lr_scheduler.StepLR(optimizer, step_size=max(1, round(cfg.step_fraction * total_steps)), gamma=cfg.gamma)
    return lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)


def _exponential(cfg: SchedConfig, optimizer: Optimizer, total_steps: int):
    from torch.optim import lr_scheduler
    return lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)


def _onecycle(cfg: SchedConfig, optimizer: Optimizer, total_steps: int):
    from torch.optim import lr_scheduler
    return lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lrs(optimizer), total_steps=total_steps, cycle_momentum=False)


def _plateau(cfg: SchedConfig, optimizer: Optimizer, total_steps: int):
    from torch.optim import lr_scheduler
    return lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=cfg.patience)


# The one list of valid sched.name values ('none': a constant lr).
SCHEDULES: dict[str, Callable | None] = {"none": None, "step": _step, "exponential": _exponential, "cosine": _cosine,
                                         "onecycle": _onecycle, "plateau": _plateau}


def check_sched_config(cfg: SchedConfig, key: str = "sched") -> None:
    """The schedule checks that need no data (the run's length is checked by `build_scheduler`)."""
    if cfg.name not in SCHEDULES:
        raise ConfigError(f"config key '{key}.name' must be one of {', '.join(SCHEDULES)}; got '{cfg.name}'")
    if cfg.name == "plateau" and not cfg.gamma < 1:
        raise ConfigError(f"config key '{key}.gamma' must be below 1 for sched.name=plateau, got {cfg.gamma}")


def build_scheduler(cfg: SchedConfig, optimizer: Optimizer, steps_per_epoch: int, epochs: int) -> LRSchedule:
    """The schedule named by `cfg.name` for a run of `epochs` epochs of `steps_per_epoch` optimiser steps.

    'onecycle' uses torch's defaults (30% warm-up from peak/25, cosine annealing to peak/25e4) with the
    configured momentum / betas left fixed (cycle_momentum=False), so it behaves the same for every optimiser.
    """
    check_sched_config(cfg)
    if steps_per_epoch < 1 or epochs < 1:
        raise VascdistError(f"an lr schedule needs at least one step and one epoch, got {steps_per_epoch} steps "
                            f"per epoch and {epochs} epochs (is data.batch_size larger than the training set?)")
    build = SCHEDULES[cfg.name]
    scheduler = build(cfg, optimizer, steps_per_epoch * epochs) if build else None
    return LRSchedule(cfg.name, optimizer, scheduler, per_step=cfg.name == "step" and cfg.step_fraction > 0)


def run_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """Epochs a run trains: `epochs`, raised so that at least `min_steps` optimiser steps are taken."""
    return max(epochs, -(-min_steps // max(1, steps_per_epoch)))
