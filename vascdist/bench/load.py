"""`vascdist bench load`: the main job's wall time on an idle machine and with other work on the cores.

The main job is `vascdist train quickstart` in a fresh process, shortened to `--steps` optimiser steps (same code
path: data from the cache, training, evaluation, bootstrap, report). Each round runs it for every checkout (--repo,
e.g. before and after a change) idle and beside `--busy` processes of `yes >/dev/null`, interleaved, so that a
change in the machine's background load hits every variant alike. OMP_WAIT_POLICY and OMP_NUM_THREADS are
removed from the job's environment: what is measured is each checkout's own default.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vascdist.bench.common import machine_line, table, write_json
from vascdist.errors import VascdistError

REPO = Path(__file__).resolve().parent.parent.parent


def _env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(repo)}


def make_data(workdir: Path) -> Path:
    """The quickstart's shards in `workdir` (synthesised and preprocessed once, as `vascdist train` does)."""
    from vascdist.config import load_config
    from vascdist.runner import ensure_data
    shards = workdir / "quickstart" / "shards"
    ensure_data(load_config("quickstart", [f"data.shards={shards}"]), quiet=True)
    return shards


def time_job(repo: Path, shards: Path, workdir: Path, steps: int, busy: int) -> float:
    """Wall seconds of one short main job from `repo`, beside `busy` `yes` processes."""
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vascdist.cli", "train", "quickstart", f"data.shards={shards}",
                               f"train.max_steps={steps}", "train.min_steps=0", f"run.out_dir={workdir / 'runs'}",
                               "--quiet"], cwd=workdir, env=_env(repo), capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise VascdistError(f"the main job from {repo} exited {proc.returncode}: {tail}")
    return seconds


def bench_load(repos: list[Path], repeats: int, steps: int, busy: int, workdir: Path) -> dict:
    shards = make_data(workdir)
    times: dict[tuple[int, str], list[float]] = {}
    loads = []
    for r in range(repeats):
        for i, repo in enumerate(repos):
            for condition, hogs in (("idle", 0), ("busy", busy)):
                loads.append(os.getloadavg()[0])
                seconds = time_job(repo, shards, workdir, steps, hogs)
                times.setdefault((i, condition), []).append(seconds)
                print(f"  round {r + 1}: [{i}] {condition} {seconds:.1f} s (load {loads[-1]:.1f})", flush=True)
    rows = []
    for i, repo in enumerate(repos):
        idle, loaded = statistics.median(times[(i, "idle")]), statistics.median(times[(i, "busy")])
        rows.append({"repo": f"[{i}]", "idle_s": idle, "busy_s": loaded, "ratio": loaded / idle,
                     "idle_all": " ".join(f"{t:.1f}" for t in times[(i, "idle")]),
                     "busy_all": " ".join(f"{t:.1f}" for t in times[(i, "busy")])})
    return {"rows": rows, "repos": [str(r) for r in repos], "repeats": repeats, "steps": steps, "busy": busy,
            "load_min": min(loads), "load_max": max(loads)}


def format_load(result: dict) -> str:
    columns = [("repo", "checkout"), ("idle_s", "idle s"), ("busy_s", f"+{result['busy']} yes s"),
               ("ratio", "busy / idle"), ("idle_all", "idle runs"), ("busy_all", "busy runs")]
    lines = [table(result["rows"], columns), ""]
    lines += [f"[{i}] {repo}" for i, repo in enumerate(result["repos"])]
    lines.append(f"medians of {result['repeats']} interleaved rounds of `vascdist train quickstart "
                 f"train.max_steps={result['steps']} train.min_steps=0 --quiet` (fresh process, cached shards; "
                 f"OMP_WAIT_POLICY and OMP_NUM_THREADS unset); 1-min load average before the runs "
                 f"{result['load_min']:.1f}-{result['load_max']:.1f}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("load", help="the short main job idle and beside `yes` processes, per checkout")
    p.add_argument("--repo", action="append", default=None,
                   help="checkout to time (repeatable, e.g. before and after a change; default: this one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps (the full quickstart trains 426)")
    p.add_argument("--busy", type=int, default=1, help="`yes` processes beside the loaded run")
    p.add_argument("--workdir", default="/tmp/vascdist-bench-load", help="data cache and run directories")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # so that `finally` ends the `yes` processes on a SIGTERM too


def run(a: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    print(machine_line(), flush=True)
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    result = bench_load([Path(r).resolve() for r in (a.repo or [REPO])], a.repeats, a.steps, a.busy, workdir)
    print(format_load(result))
    write_json(a.json, result)
    return 0
