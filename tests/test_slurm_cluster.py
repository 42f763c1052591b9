"""The local two-node SLURM cluster really runs what vascdist needs: a 4-rank torchrun job across both nodes,
USR2 delivered to srun tasks by `scancel --signal`, and `scontrol requeue`."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SCRIPT, ensure_cluster, job_info, submit, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ALLREDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)  # 1 + 2 + 3 + 4 = 10 over four ranks
# One write per line: two workers share their srun task's stdout, and under PYTHONUNBUFFERED=1 print()
# writes the text and the newline separately, so lines from the two workers can interleave.
line = f"rank={rank} world={world} node={os.environ['SLURMD_NODENAME']} sum={value.item():g}\\n"
os.write(1, line.encode())
dist.destroy_process_group()
"""

# One srun task per node runs a torchrun agent with two workers; the rendezvous is on the first node.
TORCHRUN_JOB = """#!/bin/bash
#SBATCH -N 2 --ntasks-per-node=1 --time=2 -o {out}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
port=$((20000 + SLURM_JOB_ID % 10000))
srun {python} -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
    --rdzv-endpoint "$head:$port" --rdzv-id "$SLURM_JOB_ID" {script}
"""

USR2_TASK = """
import os, signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
rank = os.environ["SLURM_PROCID"]
Path(sys.argv[1], f"ready-{rank}").touch()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.1)
print(f"rank={rank} node={os.environ['SLURMD_NODENAME']} usr2={len(got)}", flush=True)
"""

USR2_JOB = """#!/bin/bash
#SBATCH -N 2 --ntasks-per-node=1 --time=2 -o {out}
srun {python} {script} {dir}
"""

# The first run marks itself ready and sleeps until requeued; the second run (SLURM_RESTART_COUNT=1) ends.
REQUEUE_JOB = """#!/bin/bash
#SBATCH -N 1 --time=2 -o {out} --open-mode=append
echo "run restarts=${{SLURM_RESTART_COUNT:-0}}"
if [ -z "$SLURM_RESTART_COUNT" ]; then touch {ready}; sleep 60; fi
"""


def _submit_python_job(tmp_path: Path, env: dict, task: str, job_template: str, **fields) -> tuple[int, Path]:
    """Write TASK as a Python script and JOB_TEMPLATE (filled with out, python, script and FIELDS) as the batch
    script, submit it; returns the job id and the job's output file."""
    script, out, job = tmp_path / "task.py", tmp_path / "out.txt", tmp_path / "job.sh"
    script.write_text(task)
    job.write_text(job_template.format(out=out, python=sys.executable, script=script, **fields))
    return submit(job, env), out


def _wait_for_files(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"job never created {[str(p) for p in paths]}"
        time.sleep(0.2)


def test_status_reports_both_nodes():
    env = ensure_cluster()
    proc = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "debug*" in proc.stdout and "n[1-2]" in proc.stdout


def test_torchrun_gloo_allreduce_across_two_nodes(tmp_path: Path):
    env = ensure_cluster()
    job_id, out = _submit_python_job(tmp_path, env, ALLREDUCE, TORCHRUN_JOB)
    state = wait_job(job_id, env, timeout=90)

    text = out.read_text()
    assert state == "COMPLETED", text
    results = re.findall(r"rank=(\d) world=(\d) node=(n\d) sum=(\d+)", text)
    assert sorted(int(r[0]) for r in results) == [0, 1, 2, 3], text
    assert {r[1] for r in results} == {"4"}
    assert {r[3] for r in results} == {"10"}
    assert {r[2] for r in results} == {"n1", "n2"}  # two ranks on each node


def test_scancel_signal_usr2_reaches_srun_tasks(tmp_path: Path):
    env = ensure_cluster()
    job_id, out = _submit_python_job(tmp_path, env, USR2_TASK, USR2_JOB, dir=tmp_path)
    _wait_for_files([tmp_path / "ready-0", tmp_path / "ready-1"], timeout=60)
    subprocess.run(["scancel", "--signal=USR2", str(job_id)], env=env, check=True, timeout=30)
    state = wait_job(job_id, env, timeout=60)

    text = out.read_text()
    assert state == "COMPLETED", text
    assert sorted(re.findall(r"rank=(\d) node=n\d usr2=1", text)) == ["0", "1"], text


def test_scontrol_requeue_reruns_the_job(tmp_path: Path):
    env = ensure_cluster()
    out, ready = tmp_path / "out.txt", tmp_path / "ready"
    job = tmp_path / "job.sh"
    job.write_text(REQUEUE_JOB.format(out=out, ready=ready))

    job_id = submit(job, env)
    _wait_for_files([ready], timeout=60)
    subprocess.run(["scontrol", "requeue", str(job_id)], env=env, check=True, timeout=30)
    # A requeued job may not start again before cred_expire (5 s in our slurm.conf) has passed.
    state = wait_job(job_id, env, timeout=90)

    assert state == "COMPLETED"
    assert re.findall(r"run restarts=(\d)", out.read_text()) == ["0", "1"]
    assert job_info(job_id, env)["Restarts"] == "1"
