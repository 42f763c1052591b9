"""kill -9 at any instant of a real `vascdist train`, then `--resume auto`: the final weights and the test table equal
the uninterrupted run's, bitwise, whether the run ends at its last step or by early stopping; kills right after the
last step file and during the final test included. A finished run stays finished: a second `--resume auto` says
it is complete and trains nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import SMALL
from vascdist.train.saved import SavedCheckpoint
from vascdist.train.state import CheckpointManager

pytestmark = pytest.mark.slow  # kills and resumes real training runs

ENDS = {"last_step": ["train.max_steps=24", "train.eval_every=6"],
        "early_stop": ["train.epochs=6", "train.eval_every=0", "train.early_stop_patience=1",
                       "train.early_stop_metric=recording/auroc"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float summation order in every process


def command(shards_dir, run: Path, end: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vascdist.cli", "train", f"data.shards={shards_dir}", *SMALL, "data.batch_size=32",
            "train.keep_last=2", *ENDS[end], "--run-dir", str(run), "--quiet", *extra]


def final_state(run: Path) -> tuple[int, dict, dict]:
    """(final step, its weights, the test table) of a finished run."""
    manager = CheckpointManager(run / "checkpoints", 1)
    step, path = manager.step_files()[-1]
    return step, manager.read(path).weights, json.loads((run / "test_metrics.json").read_text())


def killed_when(cmd: list[str], ready) -> None:
    """Start `cmd`, SIGKILL it as soon as ready() is true (polled every 10 ms)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    while proc.poll() is None and not ready():
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.parametrize("end", sorted(ENDS))
def test_kill_9_at_any_instant_resumes_to_the_same_final_weights_and_test_table(shards_dir, tmp_path, end):
    reference = tmp_path / "reference"
    start = time.monotonic()
    straight = subprocess.run(command(shards_dir, reference, end), capture_output=True, text=True, env=ENV, timeout=900)
    duration = time.monotonic() - start
    assert straight.returncode == 0, straight.stderr[-3000:]
    step, weights, table = final_state(reference)
    saved = CheckpointManager(reference / "checkpoints", 1).latest_loadable()[1]["progress"]
    assert saved["finished"] and saved["stopped_early"] == (end == "early_stop"), saved["finished"]

    def last_step_file(run: Path) -> bool:
        return (run / "checkpoints" / f"step-{step:08d}.pt").is_file()

    def test_logged(run: Path) -> bool:
        return (run / "metrics.jsonl").is_file() and '"split": "test"' in (run / "metrics.jsonl").read_text()

    rng = random.Random(f"{end}-kills")
    kills = [("right after the last step file", last_step_file),
             ("during the final test, after its log line", test_logged)]
    for t in sorted(rng.uniform(0.2, 1.0) * duration for _ in range(2)):
        kills.append((f"at {t:.1f} s of {duration:.1f} s", lambda run, t=t: time.monotonic() - started >= t))
    for n, (when, ready) in enumerate(kills):
        run = tmp_path / f"killed-{n}"
        started = time.monotonic()
        killed_when(command(shards_dir, run, end), lambda: ready(run))
        resumed = subprocess.run(command(shards_dir, run, end, "--resume", "auto"), capture_output=True, text=True,
                                 env=ENV, timeout=900)
        assert resumed.returncode == 0, (when, resumed.stderr[-3000:])
        got_step, got_weights, got_table = final_state(run)
        assert got_step == step, (when, got_step, step)  # never trained past the end
        assert all(torch.equal(weights[k], got_weights[k]) for k in weights), when
        assert got_table == table, when
        again = subprocess.run(command(shards_dir, run, end, "--resume", "auto"), capture_output=True, text=True,
                               env=ENV, timeout=900)
        assert again.returncode == 0 and f"{run}: the run is complete ({saved['finished']})" in again.stdout, when
        assert CheckpointManager(run / "checkpoints", 1).step_files()[-1][0] == step
