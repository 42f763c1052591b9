"""User hooks named in the config by a dotted path to a callable ('package.module:function' or
'package.module.function'), imported when the config is checked so that a typo fails before training starts."""

from __future__ import annotations

import importlib
from typing import Callable

from vascdist.errors import ConfigError


def load_callable(dotted: str, key: str) -> Callable:
    """The callable `dotted` names; a one-line ConfigError naming config key `key` if it cannot be imported."""
    module_name, sep, attr = dotted.partition(":")
    if not sep:
        module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"config key '{key}' must look like 'package.module:function', got '{dotted}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while importing
        raise ConfigError(f"config key '{key}': cannot import module '{module_name}' "
                          f"({type(exc).__name__}: {exc}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config key '{key}': module '{module_name}' has no callable '{attr}'")
    return fn
