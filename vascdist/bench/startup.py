"""`vascdist bench startup`: wall time of the commands that should answer at once (`--help`, `models`, `config`,
`env`, config and argument errors), each a fresh `python -m vascdist.cli` process, for one or more checkouts,
plus the heaviest imports of `vascdist models` from `python -X importtime`."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vascdist.bench.common import machine_line, table, write_json

REPO = Path(__file__).resolve().parent.parent.parent

# (label, argv): what a user types first, and the errors they meet first.
COMMANDS = [
    ("--help", ["--help"]),
    ("models", ["models"]),
    ("config", ["config", "quickstart"]),
    ("env", ["env"]),
    ("train: missing config file", ["train", "no-such-config.yaml"]),
    ("train: unknown key", ["train", "optim.lrr=0.1"]),
    ("train: unknown model", ["train", "model.name=resnet19"]),
    ("preprocess: missing manifest", ["preprocess", "--manifest", "missing.csv", "--out", "shards"]),
    ("predict: missing checkpoint", ["predict", "runs/none", "a.wav"]),
]


def _env(repo: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def time_command(repo: Path, argv: list[str], repeats: int, cwd: Path) -> tuple[float, int]:
    """(median wall seconds, exit code) of `python -m vascdist.cli ARGV` run `repeats` times from `repo`."""
    times, rc = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vascdist.cli", *argv], cwd=cwd, env=_env(repo),
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        rc = proc.returncode
    return statistics.median(times), rc


def heaviest_imports(repo: Path, argv: list[str], cwd: Path, top: int = 6) -> tuple[float, list[tuple[str, float]]]:
    """(total import seconds, [(top-level package, cumulative seconds)]) of one `-X importtime` run of ARGV."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vascdist.cli", *argv], cwd=cwd,
                          env=_env(repo), capture_output=True, text=True)
    per_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        name = name.rstrip()[1:]  # one space follows the bar; nested imports are indented further
        if name == name.lstrip():  # top-level entries only
            name = name.strip()
            package = name.split(".")[0]
            per_package[package] = per_package.get(package, 0.0) + int(cumulative.strip()) / 1e6
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])
    return sum(per_package.values()), ranked[:top]


def bench_startup(repos: list[Path], repeats: int) -> dict:
    rows, imports = [], {}
    with tempfile.TemporaryDirectory(prefix="vascdist-bench-startup-") as tmp:
        cwd = Path(tmp)  # nothing a command might write lands in a checkout
        for label, argv in COMMANDS:
            row = {"command": label}
            for i, repo in enumerate(repos):
                seconds, rc = time_command(repo, argv, repeats, cwd)
                row[f"s{i}"], row[f"rc{i}"] = seconds, rc
            rows.append(row)
            print(f"  done {label}", flush=True)
        for repo in repos:
            imports[str(repo)] = heaviest_imports(repo, ["models"], cwd)
    return {"rows": rows, "repos": [str(r) for r in repos], "repeats": repeats, "imports": imports}


def format_startup(result: dict) -> str:
    columns = [("command", "command")]
    for i, repo in enumerate(result["repos"]):
        columns += [(f"s{i}", f"s [{i}]"), (f"rc{i}", f"exit [{i}]")]
    lines = [table(result["rows"], columns), ""]
    lines += [f"[{i}] {repo}" for i, repo in enumerate(result["repos"])]
    lines.append(f"medians of {result['repeats']} fresh processes (python -m vascdist.cli ...), OMP_NUM_THREADS=1")
    for repo, (total, top) in result["imports"].items():
        lines.append(f"`-X importtime -m vascdist.cli models` from {repo}: {total:.2f} s of imports; heaviest: " +
                     ", ".join(f"{name} {s:.2f} s" for name, s in top))
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("startup", help="wall time of --help, models, config, env and early errors (fresh processes)")
    p.add_argument("--repo", action="append", default=None,
                   help="checkout to time (repeatable, e.g. before and after a change; default: this one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    result = bench_startup([Path(r).resolve() for r in (a.repo or [REPO])], a.repeats)
    print(format_startup(result))
    write_json(a.json, result)
    return 0
