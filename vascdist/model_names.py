"""The registered model names without importing torch: read from the `@register_model` decorators in
vascdist/models/*.py with `ast`.

The registry (`vascdist.models`) stays the one owner of the names: this module only reads its source, so a
model added there appears here too (tests/test_cli_checks.py checks that both lists agree). `vascdist models`
and the config checks use it so that they answer before torch (seconds to import) is loaded.
"""

from __future__ import annotations

import ast
import fnmatch
from functools import lru_cache
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_RANKS = (3,)  # register_model's default input_ranks

# The valid model.stem and model.norm values (models/resnet.py builds them; the config check reads them here).
STEMS = ("imagenet", "small")
NORMS = ("batch", "group")


def _ranks(decorator: ast.expr) -> tuple[int, ...] | None:
    """input_ranks of a `register_model` decorator node; None if the node is another decorator."""
    if isinstance(decorator, ast.Name) and decorator.id == "register_model":
        return DEFAULT_RANKS
    if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_model":
        for kw in decorator.keywords:
            if kw.arg == "input_ranks":
                return tuple(ast.literal_eval(kw.value))
        return DEFAULT_RANKS
    return None


@lru_cache(maxsize=1)
def _registered() -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """{model name: (input ranks, option names)} for every `@register_model` function."""
    models = {}
    for path in sorted(MODELS_DIR.glob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef):
                for decorator in node.decorator_list:
                    ranks = _ranks(decorator)
                    if ranks is not None:
                        args = [a.arg for a in (*node.args.args, *node.args.kwonlyargs)]
                        models[node.name] = (ranks, tuple(a for a in args if a not in ("num_classes", "input_shape")))
    return models


def registered_models() -> dict[str, tuple[int, ...]]:
    """{model name: per-sample input ranks it accepts} for every `@register_model` function."""
    return {name: ranks for name, (ranks, _) in _registered().items()}


def model_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments such as width, stem, norm) registered model `name` takes."""
    return _registered()[name][1]


def model_names(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch `pattern`, as `vascdist.models.list_models` returns them."""
    return sorted(n for n in registered_models() if fnmatch.fnmatchcase(n, pattern))
