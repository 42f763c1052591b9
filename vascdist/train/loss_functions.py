"""The loss functions themselves: (logits [N, C], labels [N] int64) -> scalar mean loss, all in float32.

Built by name through `vascdist.train.losses`; they know nothing of torch.distributed (each rank averages over
its own batch; the data-parallel wrapper averages gradients). Class weights mean the same thing in every loss:
sample i is weighted by class_weights[labels[i]] and the result is the weighted mean sum(w_i * l_i) / sum(w_i),
as torch's F.cross_entropy does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
