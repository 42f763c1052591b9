"""Training on the real two-node SLURM cluster (slurm/local-cluster.sh): `vascdist submit` through submitit and the
plain sbatch template (vascdist/launch/train.sbatch), each preempted with USR2 mid-run, requeued, resumed on the same loss curve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from helpers import STEPS, all_losses, free_port, run_cli, train_args
from slurm_cluster import REPO, ensure_cluster, job_info, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "vascdist" / "launch" / "train.sbatch"


def overrides(shards_dir: Path, *extra: str) -> list[str]:
    """The tiny 50-step run of test_torchrun, as dotted overrides."""
    return [a for a in train_args(shards_dir, "unused", *extra) if "=" in a]


def job_env(**extra: str) -> dict:
    return {**ensure_cluster(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def submit_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vascdist.cli", "submit", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or job_env(), timeout=timeout)


def submitted(output: str) -> list[dict]:
    """Job id, log folder and run dir of every job that `vascdist submit` printed."""
    pattern = r"submitted job (\S+) .*\n  logs: (\S+) .*\n  run dir: (\S+)"
    return [dict(job_id=j, logs=Path(l), run_dir=Path(r)) for j, l, r in re.findall(pattern, output)]


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line still being written is skipped)."""
    path, steps = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return steps


def wait_for_step(run_dir: Path, step: int, job_id: str, env: dict, timeout: float = 300) -> None:
    """Until the run has logged a training step >= `step` (the job must still be running)."""
    deadline = time.monotonic() + timeout
    while True:
        if any(s >= step for s in logged_steps(run_dir)):
            return
        state = job_info(int(job_id), env).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state} before step {step}"
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {step} in {timeout:.0f} s"
        time.sleep(0.1)


def assert_resumed_on_the_curve(run_dir: Path, log: str, reference: list[float], job_id: str, env: dict) -> None:
    stopped = re.findall(r"stopped at step (\d+) \(SIGUSR2\); checkpoint saved", log)
    resumed = re.findall(r"resumed from \S+step-(\d+)\.pt at step (\d+)", log)
    assert len(stopped) == 1 and 10 <= int(stopped[0]) < STEPS, log[-3000:]
    assert resumed == [(f"{int(stopped[0]):08d}", stopped[0])], log[-3000:]
    assert job_info(int(job_id), env)["Restarts"] == "1"
    losses = all_losses(run_dir)
    assert len(losses) == STEPS  # no restart from zero: one loss per step 1..50
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    print(f"max |loss(preempted, requeued) - loss(uninterrupted)| over {STEPS} steps: {worst:.2e}")
    assert worst < 1e-4


@pytest.fixture(scope="module")
def two_node_run(shards_dir, tmp_path_factory) -> dict:
    """An uninterrupted 2-node x 1-task job, submitted with --wait."""
    tmp = tmp_path_factory.mktemp("submit")
    started = time.monotonic()
    proc = submit_cli("quickstart", *overrides(shards_dir), "--nodes", "2", "--tasks-per-node", "1", "--time", "10",
                      "--log-dir", str(tmp / "logs"), "--run-dir", str(tmp / "run-{job_id}"), "--wait", cwd=tmp)
    print(f"submit --wait of a 2-node, {STEPS}-step job took {time.monotonic() - started:.1f} s")
    jobs = submitted(proc.stdout)
    return dict(proc=proc, log_dir=tmp / "logs", **(jobs[0] if jobs else {}))


def test_submit_two_nodes_trains_to_the_end(two_node_run):
    proc, job_id, run_dir = two_node_run["proc"], two_node_run["job_id"], two_node_run["run_dir"]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"job {job_id}: COMPLETED" in proc.stdout
    assert "sacct" not in output and "Bypassing" not in output  # accounting is off: squeue answers, quietly
    assert f"tensorboard --logdir {run_dir}/tb" in proc.stdout
    assert (run_dir / "test_metrics.json").exists() and list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(all_losses(run_dir)) == STEPS
    # one log folder per job, one log per task; the job ran the snapshot taken at submission
    logs = two_node_run["logs"]
    assert logs == two_node_run["log_dir"] / job_id
    task0, task1 = ((logs / f"{job_id}_{task}_log.out").read_text() for task in (0, 1))  # submitit logs to stdout
    # rank 0 writes the plain progress line (after the first step, every run.progress_interval_s, at the end)
    assert re.search(rf"^train: step 1/{STEPS} \(2%\), epoch 1/\d+, loss \d", task0, re.M), task0[-3000:]
    assert f"train: step {STEPS}/{STEPS} (100%)" in task0 and "train: step" not in task1
    snapshot = re.search(r"code (\S+)/vascdist", (logs / f"{job_id}_0_log.out").read_text()).group(1)
    assert Path(snapshot).parent == two_node_run["log_dir"] and Path(snapshot, "vascdist", "runner.py").exists()
    # a finished job ends on both nodes together
    ends = [datetime.strptime(re.search(r"\((.+?)\) - Exiting after successful completion", t).group(1),
                              "%Y-%m-%d %H:%M:%S,%f") for t in (task0, task1)]
    assert abs((ends[0] - ends[1]).total_seconds()) < 10


def test_submit_preempted_job_checkpoints_requeues_and_resumes(shards_dir, two_node_run, tmp_path):
    env = job_env()
    proc = submit_cli("quickstart", *overrides(shards_dir), "--nodes", "2", "--time", "10", "--log-dir",
                      str(tmp_path / "logs"), "--run-dir", str(tmp_path / "run"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = submitted(proc.stdout)
    wait_for_step(job["run_dir"], 10, job["job_id"], env)
    # USR2 to the job's tasks, as --signal=USR2@N does at the time limit (not --full: the batch shell would die)
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], env=env, check=True, timeout=30)
    assert wait_job(int(job["job_id"]), env, timeout=300) == "COMPLETED"
    log = (job["logs"] / f"{job['job_id']}_0_log.out").read_text()
    assert "requeue 1 of at most 10" in log and "attempt 2 (requeued 1 of at most 10 times)" in log, log[-3000:]
    assert_resumed_on_the_curve(job["run_dir"], log, all_losses(two_node_run["run_dir"]), job["job_id"], env)


def test_submit_requeues_no_more_than_dist_max_requeues(shards_dir, tmp_path):
    env = job_env()
    proc = submit_cli("quickstart", *overrides(shards_dir, "dist.max_requeues=0"), "--nodes", "2", "--time", "10",
                      "--log-dir", str(tmp_path / "logs"), "--run-dir", str(tmp_path / "run"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = submitted(proc.stdout)
    wait_for_step(job["run_dir"], 10, job["job_id"], env)
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], env=env, check=True, timeout=30)
    assert wait_job(int(job["job_id"]), env, timeout=300) == "FAILED"  # stopped for good, not requeued
    log = (job["logs"] / f"{job['job_id']}_0_log.out").read_text()
    assert "not requeuing: requeued 0 times already (dist.max_requeues=0)" in log, log[-3000:]
    step = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert (job["run_dir"] / "checkpoints" / f"step-{step:08d}.pt").exists()
    assert job_info(int(job["job_id"]), env)["Restarts"] == "0"


def test_sbatch_template_preempted_job_checkpoints_requeues_and_resumes(shards_dir, two_node_run, tmp_path):
    env = job_env(VASCDIST_RUN_ROOT=str(tmp_path / "runs"), VASCDIST_NPROC_PER_NODE="1",
                  VASCDIST_PYTHON=sys.executable)
    out, sbatch = tmp_path / "job.out", tmp_path / "train.sbatch"
    template = run_cli("script", "train.sbatch", cwd=tmp_path)  # as a user gets it from the installed package
    assert template.returncode == 0 and template.stdout == SBATCH.read_text(), template.stderr
    sbatch.write_text(template.stdout)
    proc = subprocess.run(["sbatch", "--parsable", "--time=10", f"--output={out}", str(sbatch), "quickstart",
                           *overrides(shards_dir)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / f"slurm-{job_id}"
    wait_for_step(run_dir, 10, job_id, env)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
    assert wait_job(int(job_id), env, timeout=300) == "COMPLETED"
    log = out.read_text()
    assert log.count("vascdist: received SIGUSR2") == 2, log[-3000:]  # both workers, not the torchrun agents
    assert f"job {job_id}: attempt 2 on n[1-2]" in log
    assert re.search(rf"^train: step 1/{STEPS} \(2%\)", log, re.M) and f"step {STEPS}/{STEPS} (100%)" in log, log[-3000:]
    assert_resumed_on_the_curve(run_dir, log, all_losses(two_node_run["run_dir"]), job_id, env)


def test_torchrun_script_keeps_the_agent_alive_through_usr2(shards_dir, tmp_path):
    """SLURM signals every process of the step; torchrun.sh's agent must ignore USR2 while its workers checkpoint."""
    run_dir = tmp_path / "run"
    agent = subprocess.Popen(["bash", str(REPO / "vascdist" / "launch" / "torchrun.sh"), "--nnodes", "1", "--nproc-per-node", "2",
                              "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "quickstart", *overrides(shards_dir),
                              "--run-dir", str(run_dir), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                  "VASCDIST_PYTHON": sys.executable})
    deadline = time.monotonic() + 300
    while not any(s >= 10 for s in logged_steps(run_dir)):
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][-3000:]
        time.sleep(0.1)
    # like SLURM's proctrack: every process of the step (torchrun puts its workers in sessions of their own,
    # so a process-group kill would miss them)
    for process in [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]:
        process.send_signal(signal.SIGUSR2)
    output = agent.communicate(timeout=120)[0]
    assert agent.returncode == 0, output[-3000:]
    assert output.count("vascdist: received SIGUSR2") == 2 and "checkpoint saved" in output, output[-3000:]
    assert list((run_dir / "checkpoints").glob("step-*.pt"))


def test_sweep_submits_a_job_array(shards_dir, tmp_path):
    proc = submit_cli("quickstart", *overrides(shards_dir, "train.max_steps=6"), "--sweep", "optim.lr=0.01,0.02",
                      "--time", "5", "--log-dir", str(tmp_path / "logs"), "--wait", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = submitted(proc.stdout)
    array = jobs[0]["job_id"].split("_")[0]
    assert [j["job_id"] for j in jobs] == [f"{array}_0", f"{array}_1"]
    assert f"tensorboard --logdir {jobs[0]['run_dir'].parent}" in proc.stdout
    for job, lr in zip(jobs, ("0.01", "0.02")):  # one line per job at the end: state, test metric, run dir
        assert re.search(rf"^job {job['job_id']} \(optim.lr={lr}\): COMPLETED, test recording/balanced_accuracy "
                         rf"\d\.\d\d \[\d\.\d\d-\d\.\d\d\], run dir {job['run_dir']}$", proc.stdout, re.M), proc.stdout
        assert f"lr: {lr}" in (job["run_dir"] / "config.yaml").read_text()
        assert job["logs"] == tmp_path / "logs" / job["job_id"]


def test_submit_refused_by_sbatch_shows_its_error_in_one_line(tmp_path):
    proc = submit_cli("quickstart", "--partition", "nosuch", "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in lines[0]


def test_submit_rejects_unknown_options_listing_the_valid_ones(tmp_path):
    proc = submit_cli("quickstart", "--gpus", "4", cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 2
    assert "unknown option(s) --gpus 4" in proc.stderr and "--gpus-per-node" in proc.stderr and "--sweep" in proc.stderr


def test_submit_without_slurm_tools_is_a_one_line_error(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = submit_cli("quickstart", cwd=tmp_path, env={**os.environ, "PATH": str(empty)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("vascdist submit: error: 'sbatch' is not on PATH: submit from a SLURM login node (or "
                                   "start the local test cluster with slurm/local-cluster.sh start and export SLURM_CONF)")
