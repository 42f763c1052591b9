"""`vascdist bench checkpoint`: checkpoint save and load time against model size (vascdist.train.checkpoint).

The state has the shape the loop saves (model, SGD momentum buffers, RNG, config); save includes the atomic
temp-file + fsync + rename, load includes the zip CRC check and torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vascdist.bench.common import machine_line, parse_floats, table, write_json
from vascdist.config import Config, to_dict
from vascdist.models import build_model
from vascdist.train.checkpoint import capture_rng_state
from vascdist.train.state import CheckpointManager
from vascdist.train.optim import build_optimizer

SHAPE = (1, 40, 100)


def loop_like_state(name: str, width: float) -> tuple[dict, int]:
    """(a checkpoint state like the loop's, parameter count) after one SGD step (so momentum buffers exist)."""
    cfg = Config()
    cfg.model.name, cfg.model.width = name, width
    model = build_model(cfg.model, 2, SHAPE)
    optimizer = build_optimizer(cfg.optim, model)
    model(torch.randn(2, *SHAPE)).sum().backward()
    optimizer.step()
    state = {"engine": {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
             "rng": capture_rng_state(), "progress": {"step": 1}, "config": to_dict(cfg)}
    return state, sum(p.numel() for p in model.parameters())


def bench_checkpoint(models: list[str], widths: list[float], repeats: int, directory: Path) -> dict:
    rows = []
    manager = CheckpointManager(directory, keep_last=1)
    for name in models:
        for width in widths:
            state, params = loop_like_state(name, width)
            saves, loads, step = [], [], 0
            for _ in range(repeats):
                step += 1
                t0 = time.perf_counter()
                path = manager.save(step, state)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                manager.load(path)
                loads.append(time.perf_counter() - t0)
            size = path.stat().st_size
            save_s, load_s = statistics.median(saves), statistics.median(loads)
            rows.append({"model": f"{name} w{width:g}", "params_m": params / 1e6, "file_mb": size / 1e6,
                         "save_s": save_s, "save_mb_s": size / 1e6 / save_s, "load_s": load_s,
                         "load_mb_s": size / 1e6 / load_s})
    return {"rows": rows, "repeats": repeats, "directory": str(directory)}


def format_checkpoint(result: dict) -> str:
    return table(result["rows"], [
        ("model", "model"), ("params_m", "params (M)"), ("file_mb", "file MB"), ("save_s", "save s"),
        ("save_mb_s", "save MB/s"), ("load_s", "load s"), ("load_mb_s", "load MB/s")]) + \
        f"\n\nmedians of {result['repeats']}; written to {result['directory']} (load reads a file just written: page cache)"


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint save/load time against model size")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--widths", default="0.25,0.5,1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory on the same disk as /tmp)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="vascdist-bench-ckpt-") as tmp:
        result = bench_checkpoint(a.models.split(","), parse_floats(a.widths), a.repeats, Path(a.dir or tmp))
    print(format_checkpoint(result))
    write_json(a.json, result)
    return 0
