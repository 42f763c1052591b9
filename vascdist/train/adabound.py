"""The AdaBound optimiser (torch has none); built by name through `vascdist.train.optim`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer


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
