"""A preemption signal mid-run: checkpoint at the next step boundary, exit cleanly, resume on the same curve."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import all_losses, torchrun, train_args

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def start(args, torchrun_ranks=0):
    cmd = torchrun(*args, nproc=torchrun_ranks) if torchrun_ranks else [sys.executable, "-m", "vascdist.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def wait_for_steps(run_dir, n, proc, timeout=300):
    deadline = time.time() + timeout
    while True:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l).get("step", 0) >= n for l in path.read_text().splitlines()):
            return
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)


@pytest.mark.parametrize("sig, ranks", [(signal.SIGUSR2, 0), (signal.SIGTERM, 2)])
def test_signal_checkpoints_and_resume_continues_the_curve(shards_dir, tmp_path, sig, ranks):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "vascdist.cli", *train_args(shards_dir, reference)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = tmp_path / "run"
    proc = start(train_args(shards_dir, run_dir), ranks)
    wait_for_steps(run_dir, 12, proc)
    os.killpg(proc.pid, sig)  # what SLURM does: the signal reaches every process of the step
    output = proc.communicate(timeout=120)[0]
    # torchrun's agent itself exits non-zero on SIGTERM (it was told to stop); its workers exit cleanly
    assert proc.returncode == (0 if not ranks else 1), output[-3000:]
    assert f"received {sig.name}" in output and "checkpoint saved" in output, output[-3000:]
    stopped_at = max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert 12 <= stopped_at < 50
    resumed = subprocess.run([sys.executable, "-m", "vascdist.cli", *train_args(shards_dir, run_dir), "--resume", "auto"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two = all_losses(reference), all_losses(run_dir)
    assert len(two) == len(one) == 50  # no restart from zero: one loss per step, steps 1..50
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
