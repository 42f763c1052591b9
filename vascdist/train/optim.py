"""Optimisers (SGD, Adam, AdamW, AdaBound) and learning-rate schedules with explicit training-loop hooks.

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
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from vascdist.config import OptimConfig, SchedConfig
from vascdist.errors import ConfigError, VascdistError


# --------------------------------------------------------------------------------------------- AdaBound
class AdaBound(Optimizer):
    """AdaBound (Luo et al., ICLR 2019, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate").

    Adam whose per-element step size lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v_t) + eps) is clipped
    to [final_lr * (1 - 1/(gamma*t + 1)), final_lr * (1 + 1/(gamma*t))], so it starts Adam-like and turns
    into SGD with learning rate final_lr. As in the reference implementation (github.com/Luolc/AdaBound),
    weight decay is an L2 term added to the gradient, and final_lr is scaled by lr / base_lr so that a
    learning-rate schedule moves the bounds too. base_lr (the lr a group was created with) is kept in the
    param group, so it is saved and restored with the optimiser's state_dict.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8, weight_decay: float = 0.0,
                 amsbound: bool = False):
        if not lr > 0:
            raise ValueError(f"AdaBound: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdaBound: betas must be in [0, 1), got {betas}")
        if not final_lr > 0:
            raise ValueError(f"AdaBound: final_lr must be > 0, got {final_lr}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"AdaBound: gamma must be in (0, 1), got {gamma}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"AdaBound: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, amsbound=amsbound)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group and remember its starting lr as base_lr (the denominator of the final_lr scaling)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdaBound update of every parameter that has a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # A schedule that lowers lr lowers the bounds' target in proportion.
            final_lr = group["final_lr"] * group["lr"] / group["base_lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaBound does not support sparse gradients")
                self._update(p, group, beta1, beta2, final_lr)
        return loss

    def _update(self, p: torch.Tensor, group: dict, beta1: float, beta2: float, final_lr: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsbound"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]

        grad = p.grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])  # L2, as in the paper's reference code
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsbound"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            denom = state["max_exp_avg_sq"].sqrt().add_(group["eps"])
        else:
            denom = exp_avg_sq.sqrt().add_(group["eps"])

        step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
        upper = final_lr * (1 + 1 / (group["gamma"] * t))
        # Per-element learning rate, clipped into [lower, upper], times the first moment.
        update = torch.full_like(denom, step_size).div_(denom).clamp_(lower, upper).mul_(exp_avg)
        p.sub_(update)


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


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    """The optimiser named by `cfg.name` over `model`'s trainable parameters (see `param_groups`)."""
    groups = param_groups(model, cfg.weight_decay)
    for group in groups:
        group["peak_lr"] = cfg.lr  # saved with the optimiser; schedules rebuilt on resume read it (`peak_lrs`)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise ConfigError("config key 'optim.nesterov' needs optim.momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    if cfg.name == "adabound":
        if not cfg.final_lr > 0:
            raise ConfigError(f"config key 'optim.final_lr' must be > 0, got {cfg.final_lr}")
        if not 0 < cfg.gamma < 1:
            raise ConfigError(f"config key 'optim.gamma' must be in (0, 1), got {cfg.gamma}")
        return AdaBound(groups, lr=cfg.lr, betas=betas, final_lr=cfg.final_lr, gamma=cfg.gamma)
    raise ConfigError(f"config key 'optim.name' must be one of sgd, adam, adamw, adabound; got '{cfg.name}'")


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


def _cosine(cfg: SchedConfig, optimizer: Optimizer, total_steps: int) -> lr_scheduler.LambdaLR:
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


def build_scheduler(cfg: SchedConfig, optimizer: Optimizer, steps_per_epoch: int, epochs: int) -> LRSchedule:
    """The schedule named by `cfg.name` for a run of `epochs` epochs of `steps_per_epoch` optimiser steps.

    'onecycle' uses torch's defaults (30% warm-up from peak/25, cosine annealing to peak/25e4) with the
    configured momentum / betas left fixed (cycle_momentum=False), so it behaves the same for every optimiser.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise VascdistError(f"an lr schedule needs at least one step and one epoch, got {steps_per_epoch} steps "
                            f"per epoch and {epochs} epochs (is data.batch_size larger than the training set?)")
    total_steps = steps_per_epoch * epochs
    if cfg.name == "none":
        scheduler = None
    elif cfg.name == "step" and cfg.step_fraction > 0:
        every = max(1, round(cfg.step_fraction * total_steps))
        return LRSchedule(cfg.name, optimizer, lr_scheduler.StepLR(optimizer, step_size=every, gamma=cfg.gamma),
                          per_step=True)
    elif cfg.name == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "exponential":
        scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        scheduler = _cosine(cfg, optimizer, total_steps)
    elif cfg.name == "onecycle":
        scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lrs(optimizer), total_steps=total_steps,
                                            cycle_momentum=False)
    elif cfg.name == "plateau":
        if not cfg.gamma < 1:
            raise ConfigError(f"config key 'sched.gamma' must be below 1 for sched.name=plateau, got {cfg.gamma}")
        scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=cfg.patience)
    else:
        raise ConfigError(f"config key 'sched.name' must be one of none, step, exponential, cosine, onecycle, "
                          f"plateau; got '{cfg.name}'")
    return LRSchedule(cfg.name, optimizer, scheduler)


def run_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """Epochs a run trains: `epochs`, raised so that at least `min_steps` optimiser steps are taken."""
    return max(epochs, -(-min_steps // max(1, steps_per_epoch)))
