"""Classification losses by name: the registry `LOSSES` is the one list of valid `loss.name` values.

`build_loss(cfg.loss, num_classes)` builds one (the modules are in `loss_functions.py`). This module imports no
torch at import time, so the config check (`check_loss_config`, run when a config is loaded) answers quickly.
"""

from __future__ import annotations

from typing import Callable

from vascdist.config.schema import LossConfig
from vascdist.errors import ConfigError


def _bce_onehot(cfg: LossConfig, weight, num_classes: int):
    """Softmax + binary cross-entropy on one-hot labels (the original recipe)."""
    from vascdist.train.loss_functions import BCEOneHotLoss
    return BCEOneHotLoss(weight)


def _cross_entropy(cfg: LossConfig, weight, num_classes: int):
    from vascdist.train.loss_functions import CrossEntropyLoss
    return CrossEntropyLoss(weight, cfg.label_smoothing)


def _focal(cfg: LossConfig, weight, num_classes: int):
    from vascdist.train.loss_functions import FocalLoss
    return FocalLoss(cfg.focal_gamma, _class_vector(cfg.focal_alpha, num_classes, "loss.focal_alpha"), weight)


LOSSES: dict[str, Callable] = {"bce_onehot": _bce_onehot, "cross_entropy": _cross_entropy, "focal": _focal}


def check_loss_config(cfg: LossConfig, key: str = "loss") -> None:
    """The checks of the loss section that need no data: its name and the options that only some losses take."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"config key '{key}.name' must be one of {', '.join(LOSSES)}; got '{cfg.name}'")
    if cfg.label_smoothing > 0 and cfg.name != "cross_entropy":
        raise ConfigError(f"config key '{key}.label_smoothing' applies only to loss.name=cross_entropy, "
                          f"not '{cfg.name}'; set it to 0")


def _class_vector(values: list[float], num_classes: int, key: str):
    """A per-class config list as a float tensor (None if empty), checked for length and sign."""
    if not values:
        return None
    if len(values) != num_classes:
        raise ConfigError(f"config key '{key}' has {len(values)} entries but there are {num_classes} classes; "
                          f"give one per class or leave it empty")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"config key '{key}' must be non-negative and not all zero, got {values}")
    import torch
    return torch.tensor(values, dtype=torch.float32)


def build_loss(cfg: LossConfig, num_classes: int):
    """The loss module named by `cfg.name`, mapping (logits [N, C], labels [N] int64) to a scalar mean."""
    check_loss_config(cfg)
    weight = _class_vector(cfg.class_weights, num_classes, "loss.class_weights")
    return LOSSES[cfg.name](cfg, weight, num_classes)
