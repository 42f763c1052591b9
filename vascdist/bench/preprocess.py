"""`vascdist bench preprocess`: preprocessing throughput (cycles/s, seconds of audio per second) against the
number of recordings, with 1 and 2 worker processes, on `vascdist synth` recordings."""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import soundfile as sf

from vascdist.bench.common import machine_line, parse_ints, table, write_json
from vascdist.config import PreprocessConfig
from vascdist.data.preprocess import preprocess
from vascdist.data.synth import synthesize


def audio_seconds(manifest: Path) -> tuple[int, float]:
    """(recordings, total seconds of audio) listed in `manifest`."""
    with open(manifest, newline="") as fh:
        paths = [manifest.parent / row["path"] for row in csv.DictReader(fh)]
    return len(paths), sum(sf.info(str(p)).duration for p in paths)


def bench_preprocess(root: Path, patients: list[int], workers: list[int], repeats: int) -> dict:
    rows = []
    for n in patients:
        manifest = synthesize(root / f"synth-{n}", n_patients=n, seed=0)  # cached by (n, seed)
        recordings, seconds = audio_seconds(manifest)
        base = None
        for w in workers:
            times, cycles = [], 0
            for _ in range(repeats):
                out = root / f"shards-{n}-{w}"
                t0 = time.perf_counter()
                index = preprocess(manifest, out, PreprocessConfig(), workers=w, progress=False, overwrite=True)
                times.append(time.perf_counter() - t0)
                cycles = sum(c["samples"] for c in index["splits"].values())
            t = statistics.median(times)
            base = base or t
            rows.append({"patients": n, "recordings": recordings, "audio_s": seconds, "cycles": cycles, "workers": w,
                         "seconds": t, "cycles_s": cycles / t, "audio_x": seconds / t, "speedup": base / t})
            print(f"  done {n} patients, {w} workers", flush=True)
    return {"rows": rows, "repeats": repeats}


def format_preprocess(result: dict) -> str:
    return table(result["rows"], [
        ("patients", "patients"), ("recordings", "recordings"), ("audio_s", "audio s"), ("cycles", "cycles"),
        ("workers", "workers"), ("seconds", "seconds"), ("cycles_s", "cycles/s"), ("audio_x", "audio s per s"),
        ("speedup", "vs 1st workers")]) + \
        f"\n\nmedians of {result['repeats']} runs; default preprocess config; time includes reading WAVs, cycle " \
        "detection, log-mel, writing and hashing shards"


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="preprocessing throughput against recordings count, 1 and 2 workers")
    p.add_argument("--patients", default="10,20,40", help="synthetic patients per data set (2-4 recordings each)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--root", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="vascdist-bench-pre-") as tmp:
        result = bench_preprocess(Path(a.root or tmp), parse_ints(a.patients), parse_ints(a.workers), a.repeats)
    print(format_preprocess(result))
    write_json(a.json, result)
    return 0
