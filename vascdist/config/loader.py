"""Loading the config tree: defaults < YAML file < dotted command-line overrides, strictly.

An unknown key is an error naming the closest valid one; every section's ``check()`` runs at load. The resolved
tree is written into every run directory and checkpoint (``to_dict``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vascdist.config.schema import Config
from vascdist.errors import ConfigError
from vascdist.fileio import not_a_readable_file

# The configs shipped inside the package (package data, installed with the wheel): a config name is looked up here.
CONFIG_DIR = Path(str(resources.files("vascdist") / "configs"))
DEFAULT_CONFIG = "quickstart"  # what `vascdist train` (and `config`, `cv`, `submit`) runs when given no config

# Keys that were renamed: {old dotted key: new dotted key}. In a YAML file or an override the old name is an
# error naming the new one; in a saved tree (a checkpoint's or run directory's config) it is moved to the new one.
RENAMED_KEYS: dict[str, str] = {
    "data.num_workers": "data.reader_threads",  # it meant reader threads; DataLoader processes are data.workers
    "data.prefetch_factor": "data.windows_ahead",  # it meant shuffle windows; DataLoader's is data.worker_prefetch_factor
    "optim.gamma": "optim.bound_gamma",  # AdaBound's bound speed, not the lr decay factor sched.gamma
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string; accept what every user means by it
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation in (int, float, str) and (not isinstance(value, annotation) or isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {annotation.__name__}, got {value!r}")
    return value


def apply_renames(tree: dict, strict: bool) -> dict:
    """`tree` with RENAMED_KEYS applied: strict (user input): ConfigError naming the new key; else values moved."""
    tree = copy.deepcopy(tree)
    for old, new in RENAMED_KEYS.items():
        *path, name = old.split(".")
        node = tree
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        if strict:
            raise ConfigError(f"config key '{old}' was renamed to '{new}'; use '{new}'")
        value = node.pop(name)
        *new_path, new_name = new.split(".")
        target = tree
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_name, value)
    return tree


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint} (valid keys under '{prefix or 'top level'}': "
                              f"{', '.join(known)})")
        kwargs[name] = _coerce(value, hints[name], key)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


def to_dict(cfg) -> dict:
    """The resolved tree as plain data (what is written to config.yaml and into checkpoints)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['optim.lr=0.01', 'data.batch_size=128'] into a nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc.problem})") from None
        _set_dotted(tree, dotted.strip(), value)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_names() -> list[str]:
    """The names of the shipped configs ('quickstart', 'resnet50')."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config argument is a file (a relative path is relative to the working directory, tried first), or the
    name of a shipped config ('quickstart' or 'quickstart.yaml')."""
    p = Path(path)
    if os.path.lexists(p):  # a broken link, a loop, a directory or a FIFO is named for what it is, not "not found"
        return p
    names = config_names()
    is_name = len(p.parts) == 1 and p.suffix in ("", ".yaml")
    if is_name and p.with_suffix("").name in names:
        return CONFIG_DIR / f"{p.with_suffix('').name}.yaml"
    close = difflib.get_close_matches(p.with_suffix("").name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if is_name:
        raise ConfigError(f"config '{path}' is neither a file in the working directory ({os.getcwd()}) nor a shipped "
                          f"config{hint} (shipped: {', '.join(names)})")
    if p.exists():
        raise ConfigError(f"config file '{path}' is a directory, not a YAML file")
    raise ConfigError(f"config file '{path}' not found (relative to the working directory {os.getcwd()})"
                      + (f"; did you mean the shipped config '{close[0]}' (given by name)?" if close else ""))


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice in one mapping "
                                  f"(first on line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def read_yaml(path: str | Path) -> dict:
    """A config file's tree: one ConfigError naming the file for anything that is not a YAML mapping of sections."""
    path = resolve_config_path(path)
    problem = not_a_readable_file(path)
    if problem:
        raise ConfigError(f"config file '{path}': {problem}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}': not a YAML text file (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8)") from None
    if "\x00" in text:
        raise ConfigError(f"config file '{path}': not a YAML text file (it holds NUL bytes, from offset "
                          f"{text.index(chr(0))})")
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < dotted overrides, validated."""
    tree = read_yaml(path) if path else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = from_dict(Config, apply_renames(tree, strict=True))
    cfg.check()
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved by `to_dict` (from a checkpoint or run directory; renamed keys are moved)."""
    cfg = from_dict(Config, apply_renames(tree, strict=False))
    cfg.check()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
