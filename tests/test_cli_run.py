"""A run through the real CLI as a person or a log file sees it (issue 12): progress lines under a redirected
stdout and a bar in a terminal, "run directory:" once, resume drift refused or recorded, predict --skip-bad."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import yaml

from helpers import REPO, run_cli

pytestmark = pytest.mark.slow


def _train_args(shards, out_dir, *extra):
    return ("train", f"data.shards={shards}", f"run.out_dir={out_dir}", "run.name=tiny", "model.name=mlp",
            "model.width=0.25", "data.batch_size=32", "data.reader_threads=0", "train.device=cpu", "train.epochs=1",
            "train.max_steps=3", "run.progress_interval_s=0", *extra)


@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory):
    """A three-step run trained by `vascdist train` with stdout piped (as under SLURM or nohup)."""
    out_dir = tmp_path_factory.mktemp("runs")
    result = run_cli(*_train_args(shards_dir, out_dir), cwd=out_dir)
    assert result.returncode == 0, result.stderr
    (run,) = (out_dir / "tiny").iterdir()
    return run, result


def test_piped_stdout_gets_plain_progress_lines_and_the_run_directory_once(tiny_run):
    run, result = tiny_run
    assert "\r" not in result.stdout and "\r" not in result.stderr  # no bar
    lines = [line for line in result.stdout.splitlines() if line.startswith("train: step")]
    assert [line.split(",")[0] for line in lines] == ["train: step 1/3 (33%)", "train: step 2/3 (67%)",
                                                      "train: step 3/3 (100%)"]  # total from train.max_steps
    assert all("loss " in line and "samples/s" in line and "ETA" in line and "epoch 1/1" in line for line in lines)
    assert result.stdout.count("run directory:") == 1 and f"run directory: {run}" in result.stdout


def test_a_terminal_gets_a_bar_with_the_total_of_max_steps(shards_dir, tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "vascdist.cli", *_train_args(shards_dir, tmp_path)],
                            stdout=terminal, stderr=terminal, cwd=tmp_path)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=300) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "\r" in text and "3/3" in text and "train: step" not in text  # a tqdm bar, not plain lines


def test_preprocess_prints_lines_not_carriage_returns_into_a_log(synth_dir, tmp_path):
    result = run_cli("preprocess", "--manifest", str(synth_dir / "manifest.csv"), "--out", str(tmp_path / "shards"),
                     "run.progress_interval_s=0")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr
    n = len(list((synth_dir / "wav").glob("*.wav")))
    assert f"preprocess: recording {n}/{n} (100%)" in result.stdout


def test_resume_refuses_a_different_experiment_and_keeps_the_original_config(tiny_run, shards_dir):
    run, _ = tiny_run
    original = (run / "config.yaml").read_text()
    result = run_cli(*_train_args(shards_dir, run.parent.parent, "optim.lr=0.5", "data.batch_size=64"),
                     "--resume", "auto")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.batch_size: 32 -> 64, optim.lr: 0.05 -> 0.5" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == original and not (run / "config_history.jsonl").exists()


def test_resume_with_safe_changes_records_them_in_the_config_history(tiny_run, shards_dir, tmp_path):
    run, _ = tiny_run
    original = (run / "config.yaml").read_text()
    result = run_cli(*_train_args(shards_dir, run.parent.parent, "train.max_steps=5", "train.eval_every=2"),
                     "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "train: step 5/5 (100%)" in result.stdout
    (entry,) = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert entry["step"] == 3
    assert entry["changes"] == {"train.eval_every": [0, 2], "train.max_steps": [3, 5]}
    assert (run / "config.yaml").read_text() == original  # never rewritten
    assert yaml.safe_load(original)["train"]["max_steps"] == 3
    # the next resume compares against the config as last changed, so the same values are no change at all
    again = run_cli(*_train_args(shards_dir, run.parent.parent, "train.max_steps=5", "train.eval_every=2"),
                    "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert len((run / "config_history.jsonl").read_text().splitlines()) == 1


def test_the_safe_keys_exist_in_the_config():
    from vascdist.config import Config, to_dict
    from vascdist.config.drift import RESUME_SAFE, flatten
    assert RESUME_SAFE <= set(flatten(to_dict(Config())))


def test_predict_skip_bad_goes_on_and_shows_the_threshold(tiny_run, shards_dir, tmp_path):
    from vascdist.data.shards import load_index
    run, _ = tiny_run
    good = [r["path"] for r in load_index(shards_dir)["recordings"] if r["quality"]["periodic"]][:2]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    files = [str(good[0]), str(bad), str(good[1])]
    result = run_cli("predict", str(run), *files)
    assert result.returncode == 2 and "broken.wav" in result.stderr  # without --skip-bad one bad file stops all

    result = run_cli("predict", str(run), *files, "--skip-bad")
    assert result.returncode == 1, result.stderr  # some files were skipped
    verdict_lines = [line for line in result.stdout.splitlines() if line.startswith(tuple(good))]
    assert [line.split(":")[0] for line in verdict_lines] == [str(good[0]), str(good[1])]
    assert "verdict: stenosis when the mean P(stenosis) over cycles >= " in result.stdout
    assert "threshold chosen on the validation set" in result.stdout
    assert f"skipped {bad}: unreadable audio file" in result.stderr and "1 of 3 files skipped" in result.stderr

    result = run_cli("predict", str(run), str(good[0]), "--skip-bad", "--json")
    assert result.returncode == 0, result.stderr
    (prediction,) = json.loads(result.stdout)
    assert prediction["threshold_source"] == "validation" and 0 <= prediction["threshold"] <= 1


def test_readme_names_no_config_key_that_does_not_exist():
    """The README's dotted keys must be keys of the config tree (it is what a new user copies)."""
    import re

    from vascdist.config import Config, to_dict
    from vascdist.config.drift import flatten
    keys = set(flatten(to_dict(Config())))
    sections = {k.split(".")[0] for k in keys}
    readme = (REPO / "README.md").read_text()
    named = {m for m in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)=", readme) if m.split(".")[0] in sections}
    assert named and named <= keys, sorted(named - keys)
