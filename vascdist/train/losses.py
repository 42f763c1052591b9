"""Classification losses: (logits [N, C], labels [N] int64) -> scalar mean loss.

`build_loss(cfg.loss, num_classes)` picks one by name. The losses are plain modules: they know nothing of
torch.distributed (each rank averages over its own batch; the data-parallel wrapper averages gradients).

Class weights mean the same thing in every loss: sample i is weighted by class_weights[labels[i]] and the
result is the weighted mean sum(w_i * l_i) / sum(w_i), as torch's F.cross_entropy does. All losses compute
in float32 even when the logits come out of a bf16 autocast region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vascdist.config import LossConfig
from vascdist.errors import ConfigError


def _weighted_mean(per_sample: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample losses [N]; with class weights, sum(w[y_i] * l_i) / sum(w[y_i])."""
    if weight is None:
        return per_sample.mean()
    w = weight[labels]  # (N,)
    return (w * per_sample).sum() / w.sum()


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)) [N, C], exact and finite for any finite logits.

    1 - p_c is the softmax mass of the other classes, so log(1 - p_c) = logsumexp_{j != c} z_j - logsumexp_j z_j.
    Unlike log1p(-exp(log p_c)) this stays finite when p_c rounds to 1 (e.g. logits [1e4, 0]).
    """
    num_classes = logits.shape[-1]
    # (C, C) mask: row c hides class c itself.
    hide_self = torch.eye(num_classes, dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(-2).masked_fill(hide_self, float("-inf"))  # (N, C, C)
    return torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1, keepdim=True)


class BCEOneHotLoss(nn.Module):
    """Softmax, then binary cross-entropy against one-hot labels, averaged over N and C (the original recipe).

    Per sample: -(1/C) * sum_c [y_c log p_c + (1 - y_c) log(1 - p_c)] with p = softmax(logits), computed from
    log_softmax and `log_one_minus_softmax` so huge logits give a large finite loss, never inf or NaN.
    """

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        one_hot = F.one_hot(labels, logits.shape[-1]).bool()  # (N, C)
        log_p = F.log_softmax(logits, dim=-1)
        log_not_p = log_one_minus_softmax(logits)
        per_class = -torch.where(one_hot, log_p, log_not_p)  # (N, C)
        return _weighted_mean(per_class.mean(dim=-1), labels, self.weight)


class CrossEntropyLoss(nn.Module):
    """torch's cross-entropy with optional class weights and label smoothing."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): -alpha[y] * (1 - p_y)^gamma * log p_y per sample.

    With gamma = 0, no alpha and the same class weights it equals cross-entropy.
    """

    def __init__(self, gamma: float, alpha: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p_true = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)  # (N,)
        # (1 - p)^gamma from log p: -expm1(log p) is accurate when p is close to 1. The floor keeps the
        # gradient of pow finite (not inf * 0 = NaN) when p rounds to exactly 1 and gamma < 1.
        one_minus_p = (-torch.expm1(log_p_true)).clamp_min(torch.finfo(torch.float32).tiny)
        per_sample = -one_minus_p.pow(self.gamma) * log_p_true
        if self.alpha is not None:
            per_sample = self.alpha[labels] * per_sample
        return _weighted_mean(per_sample, labels, self.weight)


def _class_vector(values: list[float], num_classes: int, key: str) -> torch.Tensor | None:
    """A per-class config list as a float tensor (None if empty), checked for length and sign."""
    if not values:
        return None
    if len(values) != num_classes:
        raise ConfigError(f"config key '{key}' has {len(values)} entries but there are {num_classes} classes; "
                          f"give one per class or leave it empty")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"config key '{key}' must be non-negative and not all zero, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def build_loss(cfg: LossConfig, num_classes: int) -> nn.Module:
    """The loss named by `cfg.name`, mapping (logits [N, C], labels [N] int64) to a scalar mean."""
    weight = _class_vector(cfg.class_weights, num_classes, "loss.class_weights")
    if cfg.label_smoothing > 0 and cfg.name != "cross_entropy":
        raise ConfigError(f"config key 'loss.label_smoothing' applies only to loss.name=cross_entropy, "
                          f"not '{cfg.name}'; set it to 0")
    if cfg.name == "bce_onehot":
        return BCEOneHotLoss(weight)
    if cfg.name == "cross_entropy":
        return CrossEntropyLoss(weight, cfg.label_smoothing)
    if cfg.name == "focal":
        alpha = _class_vector(cfg.focal_alpha, num_classes, "loss.focal_alpha")
        return FocalLoss(cfg.focal_gamma, alpha, weight)
    raise ConfigError(f"config key 'loss.name' must be one of bce_onehot, cross_entropy, focal; got '{cfg.name}'")
