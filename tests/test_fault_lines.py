"""One line for every fault, with its true reason, from real `vascdist` processes on real files: configs that are
not YAML mappings, paths that are loops, directories or FIFOs, a damaged HDF5 object header, a half-written
metrics.jsonl line, a full disk under a checkpoint, SIGTERM outside a requeueing launcher, no SLURM controller."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from helpers import SMALL, one_error_line, run_cli
from vascdist.train.state import CheckpointManager

pytestmark = pytest.mark.slow  # real training runs


def config_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """{case: (path, what the one line must say)}."""
    (tmp / "binary.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(200)))
    (tmp / "list.yaml").write_text("- data\n- model\n")
    (tmp / "twice.yaml").write_text("data:\n  batch_size: 8\n  batch_size: 16\n")
    os.symlink(tmp / "loop-b.yaml", tmp / "loop-a.yaml")
    os.symlink(tmp / "loop-a.yaml", tmp / "loop-b.yaml")
    (tmp / "dir.yaml").mkdir()
    os.mkfifo(tmp / "fifo.yaml")
    return {"binary": (tmp / "binary.yaml", "not a YAML text file (byte 0x"),
            "list": (tmp / "list.yaml", "top level must be a mapping of sections, not a list"),
            "twice": (tmp / "twice.yaml", "line 3: key 'batch_size' is given twice in one mapping (first on line 2)"),
            "loop": (tmp / "loop-a.yaml", "a symbolic link loop"),
            "dir": (tmp / "dir.yaml", "a directory, not a file"),
            "fifo": (tmp / "fifo.yaml", "a FIFO (named pipe), not a regular file")}


def test_configs_that_are_not_yaml_mappings_are_one_line_each(tmp_path):
    for case, (path, said) in config_cases(tmp_path).items():
        for command in (["config", str(path)], ["train", str(path)]):
            line = one_error_line(run_cli(*command, timeout=60), command[0])
            assert said in line and str(path.name) in line, (case, line)


def test_predict_and_preprocess_name_loops_directories_and_fifos(synth_dir, tmp_path):
    cases = config_cases(tmp_path)
    for case in ("loop", "dir", "fifo"):
        path, said = cases[case]
        line = one_error_line(run_cli("predict", str(synth_dir / "manifest.csv"), str(path), timeout=60), "predict")
        assert line.startswith(f"vascdist predict: error: {path}: {said}"), line
    manifest = tmp_path / "manifest.csv"
    lines = (synth_dir / "manifest.csv").read_text().splitlines()
    first = lines[1].split(",")
    first[0] = str(cases["loop"][0])
    manifest.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    line = one_error_line(run_cli("preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "shards"),
                                  "--quiet"), "preprocess")
    assert f"{cases['loop'][0]}: a symbolic link loop" in line and "manifest row 2" in line


def flip_object_header_byte(shard: Path) -> None:
    """Flip the first byte of the object header of dataset 'x' (its version number)."""
    with h5py.File(shard, "r") as f:
        address = h5py.h5o.get_info(f["x"].id).addr
    data = bytearray(shard.read_bytes())
    data[address] ^= 0xFF
    shard.write_bytes(data)


@pytest.fixture(scope="module")
def short_run(shards_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("short") / "run"
    result = run_cli("train", f"data.shards={shards_dir}", *SMALL, "train.max_steps=3", "--run-dir", str(run),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    return run


def test_a_damaged_hdf5_object_header_is_one_line_naming_the_shard(shards_dir, short_run, tmp_path):
    damaged = tmp_path / "shards"
    shutil.copytree(shards_dir, damaged)
    shard = sorted(damaged.glob("shard-*.h5"))[0]
    flip_object_header_byte(shard)
    line = one_error_line(run_cli("shards", "verify", str(damaged)), "shards")
    assert line.startswith(f"vascdist shards: error: {shard}: unreadable shard (")
    for verify in ("true", "false"):  # the start-up check, and without it the loader
        line = one_error_line(run_cli("train", f"data.shards={damaged}", *SMALL, f"data.verify_checksums={verify}",
                                      "--run-dir", str(tmp_path / f"run-{verify}"), "--quiet"))
        assert line.startswith(f"vascdist train: error: {shard}: "), line
    for split in ("train", "test"):
        line = one_error_line(run_cli("evaluate", str(short_run), "--shards", str(damaged), "--split", split,
                                      "--out", str(tmp_path / "eval.json")), "evaluate")
        assert str(shard) in line, line


def test_a_half_written_metrics_line_is_dropped_on_resume_and_the_report_builds(shards_dir, short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    metrics = run / "metrics.jsonl"
    complete = metrics.read_text()
    with open(metrics, "a") as f:
        f.write('{"step": 4, "split": "train", "train/lo')  # what a full disk or a kill leaves
    report = run_cli("report", str(run))
    assert report.returncode == 0, report.stderr
    resumed = run_cli("train", f"data.shards={shards_dir}", *SMALL, "train.max_steps=5", "--run-dir", str(run),
                      "--resume", "auto", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{metrics}: removed a half-written last line (39 bytes)" in resumed.stderr
    text = metrics.read_text()
    assert text.startswith(complete) and all(json.loads(line) for line in text.splitlines())


def test_sigterm_outside_a_requeueing_launcher_checkpoints_then_exits_143(shards_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vascdist.cli", "train", f"data.shards={shards_dir}", *SMALL,
                             "train.epochs=20", "--run-dir", str(run), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "VASCDIST_REQUEUE"})
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "received SIGTERM" in err and "checkpoint saved in" in out and "Traceback" not in err
    step = CheckpointManager(run / "checkpoints", 1).latest_loadable()[1]["progress"]["step"]
    assert f"stopped at step {step} (SIGTERM)" in out


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=pytest.mark.tmpfs_size("4m"))])
def test_a_full_disk_under_a_checkpoint_is_one_line_and_keeps_the_previous_one(shards_dir, tmpfs, tmp_path, engine):
    run = tmpfs / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vascdist.cli", "train", f"data.shards={shards_dir}", *SMALL,
                             "train.epochs=20", "train.checkpoint_every=1", "train.log_every=1000", "--run-dir",
                             str(run), "--quiet", f"dist.engine={engine}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob("step-*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(tmpfs / "filler", "wb", buffering=0) as f:  # leave less than one checkpoint free
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    out, err = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert f"{run}/" in line and "no space left on device" in line and "free" in line, line
    kept = CheckpointManager(run / "checkpoints", 1).latest_loadable()
    assert kept is not None and not list((run / "checkpoints").glob("*.tmp"))
    if engine == "deepspeed":  # only tags that a step file claims are left
        claimed = {p.stem for p in (run / "checkpoints").glob("step-*.pt")}
        assert {p.name for p in (run / "checkpoints" / "deepspeed").iterdir()} <= claimed


def test_submit_without_a_controller_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    result = subprocess.run([sys.executable, "-m", "vascdist.cli", "submit", "--time", "10",
                             f"run.out_dir={tmp_path / 'runs'}"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch on PATH: submit refuses before asking a controller")
    line = one_error_line(result, "submit")
    assert "no SLURM controller answered (SLURM_CONF is not set" in line and "export SLURM_CONF=" in line
