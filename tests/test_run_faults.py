"""Nothing invented, replaced or trained on garbage without a word: real `vascdist` processes on real shard sets.

A typo of data.shards, a shard directory without its index.json, a split whose metrics would be undefined and a
diverging run each end in one line and a non-zero exit before anything is written (or, where the run can still
mean something, with a line saying what is weaker); `--resume auto` with nothing to resume says it starts anew.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SMALL, one_error_line, run_cli

pytestmark = pytest.mark.slow  # real training runs




def tree(path: Path) -> dict[str, int]:
    """Every file under `path` with its size (what a refused command must leave as it was)."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_typo_of_data_shards_is_refused_with_a_near_name_and_nothing_synthesised(shards_dir, tmp_path):
    shutil.copytree(shards_dir, tmp_path / "data" / "shards")
    before = tree(tmp_path)
    result = run_cli("train", "data.shards=data/shrads", f"run.out_dir={tmp_path / 'runs'}", "--quiet", cwd=tmp_path)
    line = one_error_line(result)
    assert "data.shards 'data/shrads' holds no shard set (did you mean 'data/shards'?)" in line
    assert tree(tmp_path) == before  # no synthetic recordings, no shards, no run directory

    # the quickstart's synthesis stays available where it is asked for explicitly
    assert "give data.synth_patients too" in line


def test_a_shard_directory_without_its_index_is_never_written_into(shards_dir, tmp_path, synth_dir):
    broken = tmp_path / "shards"
    shutil.copytree(shards_dir, broken)
    (broken / "index.json").unlink()
    before = tree(broken)
    line = one_error_line(run_cli("train", f"data.shards={broken}", "data.synth_patients=60", *SMALL,
                                  f"run.out_dir={tmp_path / 'runs'}", "--quiet"))
    assert f"data.shards '{broken}' holds shard files but no index.json" in line and "--overwrite" in line
    line = one_error_line(run_cli("preprocess", "--manifest", str(synth_dir / "manifest.csv"), "--out", str(broken),
                                  "--quiet"), "preprocess")
    assert f"{broken}: holds shard files but no index.json" in line and "--overwrite" in line
    assert tree(broken) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "recordings").exists()


def fixed_split_manifest(synth_dir: Path, out: Path, split_of) -> Path:
    """synth_dir's manifest with a split column: `split_of(patient_id, label)` for every row."""
    lines = (synth_dir / "manifest.csv").read_text().splitlines()
    rows = [lines[0] + ",split"]
    for line in lines[1:]:
        fields = line.split(",")
        fields[0] = str(synth_dir / fields[0])
        rows.append(",".join(fields) + "," + split_of(fields[2], fields[1]))
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.mark.parametrize("case", ["empty_val", "test_without_stenosis"])
def test_splits_with_undefined_metrics_are_said_by_preprocess_and_info_and_refused_by_train(synth_dir, tmp_path, case):
    rows = [line.split(",") for line in (synth_dir / "manifest.csv").read_text().splitlines()[1:]]
    normal = sorted({r[2] for r in rows if r[1] == "normal"})
    stenosis = sorted({r[2] for r in rows if r[1] == "stenosis"})
    if case == "empty_val":
        test = {*normal[:1], *stenosis[:1]}
        split_of = lambda p, label: "test" if p in test else "train"
        problem = "the val split is empty"
    else:
        val = {*normal[1:2], *stenosis[:1]}
        split_of = lambda p, label: "test" if p in normal[:1] else "val" if p in val else "train"
        problem = "the test split has no stenosis samples"
    manifest = fixed_split_manifest(synth_dir, tmp_path / "manifest.csv", split_of)
    shards = tmp_path / "shards"
    result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(shards), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"vascdist preprocess: warning: {problem}; `vascdist train` refuses this set" in result.stderr

    info = run_cli("shards", "info", str(shards))
    assert info.returncode == 0 and f"PROBLEM: {problem}" in info.stdout

    runs = tmp_path / "runs"
    line = one_error_line(run_cli("train", f"data.shards={shards}", *SMALL, f"run.out_dir={runs}", "--quiet"))
    assert f"data.shards '{shards}': {problem}, so its metrics would be undefined" in line
    assert not runs.exists()


def test_resume_auto_with_nothing_to_resume_says_it_starts_a_new_run(shards_dir, tmp_path):
    result = run_cli("train", f"data.shards={shards_dir}", *SMALL, "train.max_steps=2", "run.name=never_ran",
                     f"run.out_dir={tmp_path / 'runs'}", "--resume", "auto", "--quiet")
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("--resume auto")]
    assert "no earlier checkpoint of this run to resume; starting a new run in" in line and "never_ran" in line
    # too few validation patients per class for the threshold rule: training goes on, and says so once
    assert result.stdout.count("fewer than eval.min_patients_per_class=3: the threshold rule falls back") == 1


@pytest.mark.parametrize("lr, extra", [(1000, ["train.eval_every=5"]), (1000, ["train.eval_every=5",
                                                                               "train.checkpoint_every=1"]),
                                       (30, [])])
def test_a_diverging_run_ends_in_one_line_naming_the_last_finite_checkpoint(shards_dir, tmp_path, lr, extra):
    run = tmp_path / "run"
    line = one_error_line(run_cli("train", f"data.shards={shards_dir}", *SMALL, f"optim.lr={lr}", *extra,
                                  "--run-dir", str(run), "--quiet"))
    assert "diverged" in line or "non-finite losses in a row" in line, line
    files = sorted((run / "checkpoints").glob("step-*.pt"))
    if files:
        assert f"last finite checkpoint kept: {files[-1]}" in line
    else:
        assert "no checkpoint was saved before it" in line and "checkpoints" not in line.split(";")[-1]


# --------------------------------------------------------------------------------------------- one writer
def start_training(shards_dir, runs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vascdist.cli", "train", f"data.shards={shards_dir}", *SMALL,
                             f"run.out_dir={runs}", "run.name=live", *extra, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_step_file(proc: subprocess.Popen, runs: Path) -> Path:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(runs.glob("live/*/checkpoints/step-*.pt"))
        if found:
            return found[0].parent.parent
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step file appeared: {proc.communicate()[1][-2000:]}")


def test_a_live_run_has_one_writer_and_a_dead_ones_lock_is_taken_over(shards_dir, tmp_path):
    runs = tmp_path / "runs"
    live = start_training(shards_dir, runs, "train.epochs=50", "train.checkpoint_every=1")
    try:
        run = wait_for_step_file(live, runs)
        before = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
        second = run_cli("train", f"data.shards={shards_dir}", *SMALL, f"run.out_dir={runs}", "run.name=live",
                         "--resume", "auto", "--quiet")
        line = one_error_line(second)
        assert f"{run}: another training is writing this run directory (pid {live.pid} on {socket.gethostname()} " \
               "since" in line and "--resume" in line
        evaluated = run_cli("evaluate", str(run))
        assert f"{run}: still training (pid {live.pid} on" in one_error_line(evaluated, "evaluate")
        assert (run / "metrics.jsonl").read_text().startswith(before)
        assert not (run / "eval-test.json").exists()
    finally:
        live.kill()  # kill -9: its lock file keeps the line of a process that is gone
        live.wait()
    resumed = run_cli("train", f"data.shards={shards_dir}", *SMALL, f"run.out_dir={runs}", "run.name=live",
                      "train.max_steps=3", "--resume", "auto", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over {run / '.lock'} from pid {live.pid} on {socket.gethostname()}" in resumed.stderr
    assert (run / ".lock").read_text() == ""  # a clean end leaves no claim


def test_a_lock_left_on_another_host_is_respected_with_the_remedy(shards_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 4242 on node-elsewhere since 2026-12-06 10:00:00, SLURM job 17\n")
    line = one_error_line(run_cli("train", f"data.shards={shards_dir}", *SMALL, "--run-dir", str(run), "--quiet"))
    assert (f"{run}: another training is writing this run directory (pid 4242 on node-elsewhere since 2026-12-06 "
            f"10:00:00, SLURM job 17, lock {run / '.lock'}): a process on another host may still be writing it; if "
            f"none runs there any more, remove {run / '.lock'}") in line
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_two_runs_started_in_the_same_second_get_their_own_directories(shards_dir, tmp_path):
    runs = tmp_path / "runs"
    procs = [start_training(shards_dir, runs, "train.max_steps=2") for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    dirs = sorted((runs / "live").iterdir())
    assert len(dirs) == 2 and all((d / "checkpoints" / "best.pt").is_file() for d in dirs)
    for d in dirs:  # each directory's log is one run's: its steps once each
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("split", "train") == "train"]
        assert len(steps) == len(set(steps))
