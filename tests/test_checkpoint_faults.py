"""The checkpoint set stays consistent under faults: a best.pt lost between the step file and its copy is
recovered, non-finite state is never saved, all-corrupt checkpoints and another architecture are one line.

The lost-best.pt state is made the way a kill leaves it (the step file of the new best step is complete, best.pt
was never written), on a real run directory; training, resume and evaluate are the real code paths.
"""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli
from vascdist.errors import VascdistError
from vascdist.runner import run_training
from vascdist.train.saved import SavedCheckpoint
from vascdist.train.state import CheckpointManager

pytestmark = pytest.mark.slow


def overrides(shards_dir, *extra):
    return [f"data.shards={shards_dir}", "data.synth_patients=0", "model.name=resnet18", "model.width=0.125",
            "model.stem=imagenet", "data.batch_size=16", "train.epochs=2", "train.device=cpu", "sched.name=none",
            "optim.lr=0.05", "train.keep_last=1", "train.min_steps=0", *extra]


def step_of(path) -> int:
    return CheckpointManager(path.parent, 1).load(path)["progress"]["step"]


def test_best_pt_lost_before_its_copy_is_recovered_by_resume_and_by_evaluate(shards_dir, tmp_path):
    run = tmp_path / "run"
    first = run_training(None, overrides(shards_dir, "train.epochs=1"), run_dir=str(run), quiet=True)
    checkpoints = run / "checkpoints"
    best_step = first.best_step
    assert best_step == first.step and step_of(checkpoints / "best.pt") == best_step
    (checkpoints / "best.pt").unlink()  # a kill after the step file was renamed into place, before the best copy

    result = run_cli("evaluate", str(run), "--split", "val")
    assert result.returncode == 0, result.stderr
    assert f"recovered {checkpoints / 'best.pt'} from step-{best_step:08d}.pt (best step {best_step})" in result.stderr
    assert step_of(checkpoints / "best.pt") == best_step
    assert f"best step {best_step}" in result.stdout

    (checkpoints / "best.pt").unlink()
    resumed = run_training(None, overrides(shards_dir), resume="auto", run_dir=str(run), quiet=True)
    best = CheckpointManager(checkpoints, 1).load(checkpoints / "best.pt")
    assert best["progress"]["step"] == resumed.best_step
    newest = CheckpointManager(checkpoints, 1).latest_loadable()[1]
    assert newest["progress"]["best_step"] == resumed.best_step


def test_non_finite_state_is_never_saved(shards_dir, tmp_path, capfd):
    run = tmp_path / "run"
    with pytest.raises(VascdistError) as raised:  # the run ends at the first state it may not save
        run_training(None, overrides(shards_dir, "optim.lr=1e30", "optim.momentum=0.0", "train.max_bad_steps=3",
                                     "train.checkpoint_every=1", "train.keep_last=3"), run_dir=str(run), quiet=True)
    files = CheckpointManager(run / "checkpoints", 1).step_files()
    assert f"last finite checkpoint kept: {files[-1][1]}" in str(raised.value)
    assert files, "at least the checkpoints before the divergence are kept"
    for _, path in files:
        weights = CheckpointManager(path.parent, 1).read(path).weights
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path.name
    assert str(raised.value).startswith("not saving step")


def test_lr_that_is_not_finite_is_refused_at_load():
    for value, problem in ((".inf", "must be finite"), (".nan", "must be finite"), ("-1", "must be > 0")):
        result = run_cli("train", f"optim.lr={value}")
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"vascdist train: error: config key 'optim.lr' {problem}"), line


def test_all_corrupt_checkpoints_are_refused_not_restarted(shards_dir, tmp_path):
    run = tmp_path / "run"
    run_training(None, overrides(shards_dir, "train.max_steps=5", "train.checkpoint_every=2", "train.keep_last=2"),
                 run_dir=str(run), quiet=True)
    files = CheckpointManager(run / "checkpoints", 1).step_files()
    for _, path in files:
        path.write_bytes(path.read_bytes()[:100])
    result = run_cli("train", *overrides(shards_dir, "train.max_steps=8"), "--run-dir", str(run), "--resume", "auto",
                     "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"vascdist train: error: every checkpoint in {run / 'checkpoints'} is unreadable")
    assert all(line.startswith("skipping corrupt checkpoint") for line in lines[:-1])
    assert [p.stat().st_size for _, p in files] == [100] * len(files)  # nothing pruned, nothing overwritten


def test_resume_with_another_architecture_is_one_line(shards_dir, tmp_path):
    run = tmp_path / "run"
    run_training(None, overrides(shards_dir, "train.max_steps=3"), run_dir=str(run), quiet=True)
    result = run_cli("train", *overrides(shards_dir, "model.width=0.25"), "--run-dir", str(run), "--resume", "auto",
                     "--quiet")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vascdist train: error: ") and "Traceback" not in result.stderr
    assert CheckpointManager(run / "checkpoints", 1).latest_loadable()[1]["progress"]["step"] == 3


def test_kill_while_best_pt_is_being_written_loses_nothing(shards_dir, tmp_path):
    """The issue's reproduction with a real kill: SIGKILL `vascdist train` while checkpoints/.best.pt.*.tmp exists
    (the step file of the new best step is complete, best.pt not yet replaced), then resume and evaluate."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    # width 1: best.pt is ~45 MB, so its copy lasts long enough to be caught by a tight listdir loop
    args = [*overrides(shards_dir, "model.width=1", "train.eval_every=2", "train.max_steps=40"), "--run-dir", str(run),
            "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "vascdist.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    caught, deadline = False, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        if any(n.startswith(".best.pt.") and n.endswith(".tmp") for n in names) and any(
                n.startswith("step-") for n in names):
            os.kill(proc.pid, signal.SIGKILL)
            caught = True
            break
    proc.wait(timeout=60)
    assert caught, f"the run ended before a best.pt copy was caught: {proc.stderr.read()[-2000:]}"
    newest = CheckpointManager(checkpoints, 1).latest_loadable()[1]
    best_step = newest["progress"]["best_step"]
    assert best_step == newest["progress"]["step"]  # the kill came while this step's best copy was written

    result = run_cli("evaluate", str(run), "--split", "val")
    assert result.returncode == 0, result.stderr
    assert step_of(checkpoints / "best.pt") == best_step and f"best step {best_step}" in result.stdout
    resumed = run_training(None, overrides(shards_dir, "model.width=1", "train.eval_every=2", "train.max_steps=44"),
                           resume="auto", run_dir=str(run), quiet=True)
    assert step_of(checkpoints / "best.pt") == resumed.best_step >= best_step
    assert not [n for n in os.listdir(checkpoints) if n.endswith(".tmp")]
