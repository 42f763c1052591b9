"""Real torchrun processes on CPU/gloo: world-size invariance (1, 2 and 2x2 ranks), resume 2 -> 1, elastic restart."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import STEPS, all_losses, free_port, torchrun, train_args

pytestmark = [pytest.mark.dist, pytest.mark.slow]

def env():
    # one intra-op thread per rank: several ranks share these 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd, timeout=600):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


@pytest.fixture(scope="module")
def single_run(shards_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run([sys.executable, "-m", "vascdist.cli", *train_args(shards_dir, run_dir)])
    return run_dir


def test_two_ranks_follow_the_single_process_curve(shards_dir, single_run, tmp_path):
    run(torchrun(*train_args(shards_dir, tmp_path / "run")))
    one, two = all_losses(single_run), all_losses(tmp_path / "run")
    assert len(one) == len(two) == STEPS
    worst = max(abs(a - b) for a, b in zip(one, two))
    print(f"max |loss(1 rank) - loss(2 ranks)| over {STEPS} steps: {worst:.2e}")
    assert worst < 1e-4


def test_two_ranks_with_gradient_accumulation_follow_the_single_process_curve(shards_dir, single_run, tmp_path):
    # 16 samples per step = 2 ranks x 4 micro-batches of 2: every sample of the global batch is trained on
    run(torchrun(*train_args(shards_dir, tmp_path / "run", "train.grad_accum=4")))
    one, accumulated = all_losses(single_run), all_losses(tmp_path / "run")
    worst = max(abs(a - b) for a, b in zip(one, accumulated))
    print(f"max |loss(1 rank) - loss(2 ranks x 4 accumulation steps)| over {STEPS} steps: {worst:.2e}")
    assert len(accumulated) == STEPS and worst < 1e-4


def test_a_batch_that_ranks_x_accumulation_does_not_divide_is_refused_before_any_data(tmp_path):
    shards = tmp_path / "would_be_synthesised" / "shards"
    cmd = torchrun(*train_args(shards, tmp_path / "run", "data.batch_size=12", "train.grad_accum=4",
                               "data.synth_patients=4"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode != 0
    assert ("vascdist train: error: config key 'data.batch_size' (12) must be divisible by the number of ranks x "
            "'train.grad_accum' (2 x 4 = 8)") in result.stderr
    assert not shards.parent.exists() and not (tmp_path / "run").exists()


def test_two_nodes_of_two_ranks_follow_the_single_process_curve(shards_dir, single_run, tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(torchrun(*train_args(shards_dir, tmp_path / "run"), nnodes=2, node_rank=rank, port=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    one, four = all_losses(single_run), all_losses(tmp_path / "run")
    worst = max(abs(a - b) for a, b in zip(one, four))
    print(f"max |loss(1 rank) - loss(2 nodes x 2 ranks)| over {STEPS} steps: {worst:.2e}")
    assert len(four) == STEPS and worst < 1e-4


def test_checkpoint_from_two_ranks_resumes_on_one(shards_dir, single_run, tmp_path):
    run_dir = tmp_path / "run"
    run(torchrun(*train_args(shards_dir, run_dir, f"train.max_steps={STEPS // 2}")))
    result = run([sys.executable, "-m", "vascdist.cli", *train_args(shards_dir, run_dir), "--resume", "auto"])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{STEPS // 2:08d}.pt'}" in result.stdout
    one, resumed = all_losses(single_run), all_losses(run_dir)  # TensorBoard purges nothing: steps continue
    worst = max(abs(a - b) for a, b in zip(one, resumed))
    print(f"max |loss(1 rank) - loss(2 ranks, then resumed on 1)|: {worst:.2e}")
    assert len(resumed) == STEPS and worst < 1e-4


def test_elastic_restart_after_kill_9_resumes_and_finishes(shards_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = torchrun(*train_args(shards_dir, run_dir, "train.checkpoint_every=5", "--resume", "auto"),
                   extra=("--max-restarts=1", "--monitor-interval=1"))
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("step-*.pt")):
        assert agent.poll() is None and time.time() < deadline, "no checkpoint before the kill"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "vascdist.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    output = agent.communicate(timeout=600)[0]
    assert agent.returncode == 0, output[-3000:]
    assert "resumed from" in output
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == STEPS


def test_rendezvous_that_never_completes_ends_after_the_timeout(tmp_path):
    port = free_port()
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "vascdist.cli", "train", "quickstart", "dist.timeout_s=5", "--quiet"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert result.returncode == 2 and time.time() - start < 60
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("vascdist train: error: rank 0/2: process group init failed")]
    assert not (tmp_path / "runs").exists()  # nothing written before the group exists


SHUTDOWN_CHECK = """
import os, sys, types
import torch
from vascdist.dist import init_distributed, shutdown, wrap_ddp

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

def one_step(env):  # what train() does with the group: DDP (which imports torch._dynamo) and a backward
    cfg = types.SimpleNamespace(bucket_cap_mb=25, gradient_as_bucket_view=True, static_graph=False)
    model = wrap_ddp(torch.nn.Linear(4, 2), env, cfg)
    model(torch.ones(3, 4)).sum().backward()

before = threads()
env = init_distributed("cpu", timeout_s=60)
one_step(env)
shutdown(env)
after = threads()
print(f"rank {env.rank}: threads before the group {before}, after shutdown {after}", flush=True)
sys.exit(0 if after == before else 1)
"""


def test_shutdown_joins_the_process_group_threads_after_ddp(tmp_path):
    """gloo's threads must be gone when shutdown() returns: alive into interpreter finalization, a thread that takes
    the GIL aborts the finished worker ("terminate called without an active exception", exit -6), failing its job."""
    script = tmp_path / "check.py"
    script.write_text(SHUTDOWN_CHECK)
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
