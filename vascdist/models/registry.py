"""Model registry: `@register_model` on a function named after the variant, built by `create_model`
(vascdist.models imports every model module, so that importing the package registers them all).

Every model function takes ``(num_classes, input_shape, **options)`` and returns an ``nn.Module`` mapping
a batch ``(N, *input_shape)`` to logits ``(N, num_classes)``. ``input_shape`` is the per-sample shape:
``(C, F, T)`` for spectrograms (e.g. ``(1, 40, 100)``) or ``(C, L)`` for 1-D beats (e.g. ``(1, 187)``).
Nothing here knows about torch.distributed; `vascdist.dist` wraps the built model.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vascdist.config import ModelConfig
from vascdist.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Input rank (len(input_shape)) of each kind of data, for error messages.
_KIND = {2: "1-D (C, L)", 3: "2-D (C, F, T)"}


def register_model(fn: Callable[..., nn.Module] | None = None, *, input_ranks: tuple[int, ...] = (3,)):
    """Register a model function under its own name.

    ``@register_model`` registers a model of spectrograms (per-sample rank 3, ``(C, F, T)``);
    ``@register_model(input_ranks=(2,))`` one of 1-D signals ``(C, L)``, ``(2, 3)`` one that takes both.
    """
    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if f.__name__ in _MODELS:
            raise ValueError(f"model '{f.__name__}' is registered twice")
        f.input_ranks = tuple(input_ranks)
        _MODELS[f.__name__] = f
        return f
    return register(fn) if fn is not None else register


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch `pattern` (``list_models('resnet*')``)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def check_input_rank(name: str, input_shape: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    """Raise ConfigError if a model `name` that accepts per-sample ranks `ranks` is given `input_shape`."""
    if len(input_shape) in ranks and all(int(d) > 0 for d in input_shape):
        return
    wanted = " or ".join(_KIND.get(r, f"rank-{r}") for r in ranks)
    fitting = [n for n in list_models() if len(input_shape) in _accepted_ranks(n)]
    hint = f"; models for this data: {', '.join(fitting)}" if fitting else ""
    raise ConfigError(f"model.name '{name}' needs {wanted} input, but the data's per-sample shape is "
                      f"{tuple(input_shape)}{hint}")


def _accepted_ranks(name: str) -> tuple[int, ...]:
    return _MODELS[name].input_ranks


def check_options(name: str, width: float, dropout: float) -> None:
    """Shared range checks of the options every model takes (named by their config keys)."""
    if not width > 0:
        raise ConfigError(f"model.width must be > 0 for '{name}', got {width}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1) for '{name}', got {dropout}")


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """`channels` times the width multiplier, rounded, at least `minimum`."""
    return max(minimum, int(round(channels * width)))


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build registered model `name` for `num_classes` classes and per-sample `input_shape`.

    `kwargs` are the model's options (``stem``, ``width``, ``dropout``, ...); an unknown name or an option
    the model does not take is a ConfigError that lists the valid choices.
    """
    if name not in _MODELS:
        raise ConfigError(f"model.name '{name}' is unknown; choose one of: {', '.join(list_models())}")
    if num_classes < 1:
        raise ConfigError(f"model '{name}' needs num_classes >= 1, got {num_classes}")
    fn = _MODELS[name]
    options = _options(fn)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"model '{name}' does not take option(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(options)}")
    input_shape = tuple(int(d) for d in input_shape)
    check_input_rank(name, input_shape, fn.input_ranks)
    return fn(num_classes=num_classes, input_shape=input_shape, **kwargs)


def _options(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters
    return [p for p in params if p not in ("num_classes", "input_shape")]


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the model the config's model section names (``model.stem`` only reaches models that take it)."""
    if cfg.name not in _MODELS:
        raise ConfigError(f"model.name '{cfg.name}' is unknown; choose one of: {', '.join(list_models())}")
    kwargs = {"width": cfg.width, "dropout": cfg.dropout}
    if "stem" in _options(_MODELS[cfg.name]):
        kwargs["stem"] = cfg.stem
    if "norm" in _options(_MODELS[cfg.name]):
        kwargs["norm"] = cfg.norm
    return create_model(cfg.name, num_classes, input_shape, **kwargs)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one sample of per-sample shape `input_shape` (matmuls and convolutions, 2 per MAC).

    Runs one forward in eval mode without gradients on the model's device; the training flag is restored.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())

