"""What a resumed run may change, and the record of what it did change.

A resume continues one experiment. Keys in RESUME_SAFE only change how long it runs, how it is logged and where
or how fast it computes; changing any other key (model, data, batch, optimiser, schedule, loss, seed, precision,
...) would silently make the rest of the run a different experiment, so `check_resume` refuses it. Safe changes
are appended to the run directory's config history; the original config.yaml is never rewritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from vascdist.config.loader import _merge, apply_renames, to_dict
from vascdist.config.schema import Config
from vascdist.errors import ConfigError
from vascdist.fileio import atomic_write_text
from vascdist.train.layout import RunLayout

# The one list of keys a resume may change; every other key is part of the experiment's definition.
RESUME_SAFE = frozenset({
    "run.out_dir", "run.progress_interval_s",
    "train.epochs", "train.max_steps", "train.early_stop_patience", "train.max_bad_steps", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.log_every", "train.device", "train.compile", "train.check_memory",
    "train.deterministic",  # kernel choice: bits, not the experiment (like train.device)
    "data.loader", "data.reader_threads", "data.windows_ahead", "data.workers", "data.worker_prefetch_factor",
    "data.persistent_workers", "data.verify_checksums",  # both loaders give the same batches (tests/test_dataloader.py)
    "dist.timeout_s", "dist.bucket_cap_mb", "dist.gradient_as_bucket_view", "dist.static_graph", "dist.ddp_one_rank",
    "dist.requeue_signal", "dist.max_requeues",
    "eval.bootstrap_resamples", "eval.bootstrap_seed", "eval.confidence",  # intervals only; not what is chosen
})


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        out.update(flatten(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key whose value differs between two config trees."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def effective_config(run_dir: Path) -> dict | None:
    """The config a run last trained with: its config.yaml with the history's changes applied; None if absent."""
    layout = RunLayout(run_dir)
    path = layout.config
    if not path.is_file():
        return None
    flat = flatten(yaml.safe_load(path.read_text()) or {})
    history = layout.history
    if history.is_file():
        for line in history.read_text().splitlines():
            if line.strip():
                flat.update({k: v[1] for k, v in json.loads(line)["changes"].items()})
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_resume(cfg: Config, previous: dict) -> dict[str, tuple]:
    """The safe changes of `cfg` against the `previous` config tree; ConfigError (with the diff) on any other.

    A tree saved before a key was renamed (RENAMED_KEYS) or added is read as it ran: renamed keys are moved,
    keys it lacks have their defaults (a new key's default keeps what the code did before)."""
    previous = _merge(to_dict(Config()), apply_renames(previous, strict=False))
    changes = config_diff(previous, to_dict(cfg))
    unsafe = {k: v for k, v in changes.items() if k not in RESUME_SAFE}
    if unsafe:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
        raise ConfigError(f"--resume would change what this run is ({diff}); resume with the run's own values, or "
                          f"start a new run (another run.name, or no --resume)")
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple]) -> None:
    """Append one line {step, time, changes} to the run's config history (nothing when there are no changes)."""
    if not changes:
        return
    path = RunLayout(run_dir).history
    line = json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "changes": {k: list(v) for k, v in changes.items()}})
    atomic_write_text(path, (path.read_text() if path.is_file() else "") + line + "\n")


__all__ = ["RESUME_SAFE", "check_resume", "config_diff", "effective_config",
           "flatten", "record_changes"]
