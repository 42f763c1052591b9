"""The config explained: every key's value, default and docstring (`vascdist config`), and the generated
reference docs/config.md.

Field docstrings are the string literals written after each field in schema.py; Python keeps no trace of them at
run time, so they are read from the source with `ast`, the one place they are written.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from functools import lru_cache
from pathlib import Path

from vascdist.config import schema
from vascdist.config.schema import Config

SCHEMA_FILE = Path(schema.__file__)


@lru_cache(maxsize=1)
def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field name: docstring}} for the dataclasses of schema.py."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(SCHEMA_FILE.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields, body = {}, node.body
        for stmt, after in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and \
                    isinstance(after.value.value, str):
                fields[stmt.target.id] = " ".join(after.value.value.split())
        docs[node.name] = fields
    return docs


def describe(cfg: object, defaults: object | None = None, prefix: str = "") -> list[dict]:
    """One row per leaf key: {key, value, default, type, doc}, in schema order; sections are walked into."""
    defaults = type(cfg)() if defaults is None else defaults
    hints = typing.get_type_hints(type(cfg))
    docs = field_docs().get(type(cfg).__name__, {})
    rows = []
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, default, f"{key}.")
        else:
            hint = hints[f.name]
            rows.append({"key": key, "value": value, "default": default, "doc": docs.get(f.name, ""),
                         "type": str(hint) if typing.get_origin(hint) else hint.__name__})
    return rows


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def format_config(cfg: Config, diff_only: bool = False) -> str:
    """The resolved config as `key = value` lines under `[section]` headers, each with its default and docstring."""
    lines, section = [], None
    for row in describe(cfg):
        if diff_only and row["value"] == row["default"]:
            continue
        head = row["key"].split(".")[0]
        if head != section:
            lines += ([""] if lines else []) + [f"[{head}]"]
            section = head
        mark = "" if row["value"] == row["default"] else f"   (default {_show(row['default'])})"
        lines.append(f"{row['key']} = {_show(row['value'])}{mark}")
        if row["doc"]:
            lines.append(f"    {row['doc']}")
    if not lines:
        return "(every key has its default value)"
    return "\n".join(["# key = value, then its docstring; '(default X)' marks a key whose value is not its default", ""]
                     + lines)


def markdown_reference() -> str:
    """docs/config.md: one table per section of every key, its type, default and docstring."""
    out = ["# Config reference", "",
           "Generated from the dataclasses in `vascdist/config/schema.py` by `vascdist config --markdown`; "
           "tests/test_config_cli.py fails when it is out of date. Set any key in a YAML file or on the command "
           "line as `section.key=value`; `vascdist config CONFIG [overrides] --diff` shows what differs from "
           "the defaults."]
    section = None
    for row in describe(Config()):
        head = row["key"].rsplit(".", 1)[0]
        if head != section:
            out += ["", f"## `{head}`", "", "| key | type | default | description |", "|---|---|---|---|"]
            section = head
        doc = row["doc"].replace("|", "\\|")
        out.append(f"| `{row['key']}` | {row['type']} | `{_show(row['default'])}` | {doc} |")
    return "\n".join(out) + "\n"
