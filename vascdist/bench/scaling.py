"""`vascdist bench scaling`: loader epoch time and peak memory (the whole process tree) against data-set size.

Time must grow linearly with N (constant us/sample) and memory stay flat: the loader holds windows, never
the data set. Shard sets are written with `make_shards` under --root (reused when they already hold N).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import psutil

from vascdist.bench.common import TreeMemory, machine_line, parse_ints, table, write_json
from vascdist.bench.makeshards import BYTES_PER_SAMPLE, make_shards
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.shards import load_index
from vascdist.errors import DataError

FALLBACK = 300_000  # the largest size tried when the requested one does not fit on the disk


def ensure_shards(root: Path, samples: int) -> tuple[Path, float | None]:
    """root/n<samples> holding `samples` samples: (directory, seconds spent writing it or None if reused)."""
    out = root / f"n{samples}"
    try:
        if sum(c["samples"] for c in load_index(out)["splits"].values()) == samples:
            return out, None
    except DataError:
        pass
    t0 = time.perf_counter()
    make_shards(out, samples)
    return out, time.perf_counter() - t0


def epoch(shards: Path, batch: int, workers: int) -> dict:
    """One training epoch of the streaming loader, with the process tree's memory sampled throughout."""
    loader = StreamingLoader(ShardStream(shards, "train", batch, seed=0), threads=workers)
    base = psutil.Process().memory_info().rss
    half = len(loader) * loader.stream.local_batch // 2
    with TreeMemory() as mem:
        n, t0 = 0, time.perf_counter()
        t_half = t0
        for b in loader:
            if n == 0:
                mem.sample()  # the workers are alive now, however short the epoch
            n += len(b["y"])
            if n <= half:
                t_half = time.perf_counter()
            elif t_half and n - len(b["y"]) <= half:
                mem.sample()  # one PSS reading just after the middle, however short the epoch
        seconds = time.perf_counter() - t0
    # memory that grew with samples read would peak higher in the second half of the epoch than in the first
    first, second = mem.peak_between(t0, t_half), mem.peak_between(t_half, t0 + seconds)
    return {"samples": n, "seconds": seconds, "peak_rss_mb": mem.peak_rss / 2**20, "peak_pss_mb": mem.peak_pss / 2**20,
            "pss_first_half_mb": first[1] / 2**20 or None, "pss_second_half_mb": second[1] / 2**20 or None,
            "main_rss_before_mb": base / 2**20, "processes": mem.peak_procs}


def bench_scaling(root: Path, sizes: list[int], batch: int, workers: int, repeats: int, remove: bool) -> dict:
    rows, notes = [], []
    root.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        free = shutil.disk_usage(root).free
        if size * BYTES_PER_SAMPLE * 1.02 + 2 * 2**30 > free:
            notes.append(f"N={size:,} needs {size * BYTES_PER_SAMPLE / 1e9:.1f} GB but {free / 1e9:.1f} GB are free "
                         f"under {root}: measured N={FALLBACK:,} instead")
            size = FALLBACK
        shards, write_s = ensure_shards(root, size)
        runs = [epoch(shards, batch, workers) for _ in range(repeats)]
        med = {k: statistics.median(v) if (v := [r[k] for r in runs if r[k] is not None]) else None for k in runs[0]}
        rows.append({"n": size, "train": int(med["samples"]), "write_s": write_s, "epoch_s": med["seconds"],
                     "us_per_sample": 1e6 * med["seconds"] / med["samples"], "samples_s": med["samples"] / med["seconds"],
                     "peak_pss_mb": med["peak_pss_mb"], "peak_rss_mb": med["peak_rss_mb"],
                     "pss_1st": med["pss_first_half_mb"], "pss_2nd": med["pss_second_half_mb"],
                     "before_mb": med["main_rss_before_mb"], "procs": int(med["processes"])})
        print(f"  done N={size:,}", flush=True)
        if remove:
            shutil.rmtree(shards)
    return {"rows": rows, "notes": notes, "batch": batch, "workers": workers, "repeats": repeats}


def format_scaling(result: dict) -> str:
    text = table(result["rows"], [
        ("n", "N (all splits)"), ("train", "train samples"), ("write_s", "make-shards s"), ("epoch_s", "epoch s"),
        ("us_per_sample", "us/sample"), ("samples_s", "samples/s"), ("peak_pss_mb", "peak PSS MB (tree)"),
        ("pss_1st", "peak PSS 1st half"), ("pss_2nd", "peak PSS 2nd half"), ("peak_rss_mb", "peak RSS MB (tree)"),
        ("before_mb", "main RSS before MB"), ("procs", "processes")])
    lines = [text, "", f"batch {result['batch']}, {result['workers']} loader workers, medians of {result['repeats']} epochs; "
             "memory sampled every 0.2 s (RSS) and 1 s (PSS; also at the first batch and the end) over the main "
             "process and its workers; "
             "RSS double-counts pages shared after fork, PSS splits them"] + result["notes"]
    rows = result["rows"]
    if len(rows) >= 2:
        per = [r["us_per_sample"] for r in rows]
        mem = [r["peak_pss_mb"] for r in rows]
        a, b = rows[-2], rows[-1]
        marginal = 1e6 * (b["epoch_s"] - a["epoch_s"]) / (b["train"] - a["train"])
        lines.append(f"us/sample from smallest to largest N: x{per[-1] / per[0]:.2f} (1.00 = linear time; below: a fixed "
                     f"start-up amortised); marginal cost between the two largest N: {marginal:.1f} us/sample; "
                     f"peak PSS: x{mem[-1] / mem[0]:.2f} from smallest to largest N")
        if b["pss_1st"] and b["pss_2nd"]:
            lines.append(f"largest N: peak PSS {b['pss_1st']:.0f} MB in the first half of the epoch, {b['pss_2nd']:.0f} MB "
                         "in the second (equal = memory does not grow with samples read)")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("scaling", help="loader epoch time and peak memory against N (make-shards sets under --root)")
    p.add_argument("--root", required=True, help="directory for the shard sets (n<N>/ each); check free disk first")
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="total samples per set (8 KB each on disk)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--remove", action="store_true", help="delete each shard set after measuring it")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    result = bench_scaling(Path(a.root), parse_ints(a.sizes), a.batch, a.workers, a.repeats, a.remove)
    print(format_scaling(result))
    write_json(a.json, result)
    return 0
