"""predict abstains outside the model's training data (NO VERDICT, its reasons, exit code 3), says what the model
was trained on, and names the bad file it cannot read: real processes on real WAV files and a trained model."""

import json
import os
from pathlib import Path

import pytest

from helpers import run_cli
from vascdist.bench.abstain import write_garbage
from vascdist.data.shards import load_index

pytestmark = pytest.mark.slow  # trains a model / runs preprocess processes

SOURCE_REASON = "the model was trained on synthetic recordings (vascdist synth) only"


@pytest.fixture(scope="module")
def model(shards_dir, tmp_path_factory):
    """A three-step model trained by `vascdist train` on the synthetic fixture shards."""
    out = tmp_path_factory.mktemp("abstain_runs")
    result = run_cli("train", f"data.shards={shards_dir}", f"run.out_dir={out}", "run.name=tiny", "model.name=mlp",
                     "model.width=0.25", "data.batch_size=32", "data.reader_threads=0", "train.device=cpu",
                     "train.epochs=1", "train.max_steps=3", "run.progress_interval_s=0", cwd=out)
    assert result.returncode == 0, result.stderr
    (run,) = (out / "tiny").iterdir()
    return run


@pytest.fixture(scope="module")
def garbage(shards_dir, tmp_path_factory):
    test = [r["path"] for r in load_index(shards_dir)["recordings"] if r["split"] == "test"]
    return write_garbage(tmp_path_factory.mktemp("garbage"), example=Path(test[0]))


def test_every_kind_of_garbage_gets_no_verdict_for_a_reason_of_its_own(model, garbage):
    result = run_cli("predict", str(model), *map(str, garbage.values()), "--json")
    assert result.returncode == 3, result.stderr  # read, but some recordings got no verdict
    assert f"NO VERDICT for {len(garbage)} of {len(garbage)} recordings" in result.stderr
    by_file = {r["file"]: r for r in json.loads(result.stdout)}
    for name, path in garbage.items():
        r = by_file[str(path)]
        assert r["verdict"] is None and r["probabilities"] is None and r["cycles"] == [], name
        # Not only because the model is synthetic and the file is not: the physics says no as well.
        physics = [reason for reason in r["reasons"] if SOURCE_REASON not in reason]
        assert physics, f"{name}: {r['reasons']}"
    reasons = {name: " | ".join(by_file[str(path)]["reasons"]) for name, path in garbage.items()}
    assert "sample rate 1 Hz holds frequencies up to 0.5 Hz" in reasons["1 Hz sample rate"]
    assert "fully clipped: 100 %" in reasons["clipped square wave"]
    assert "silent recording" in reasons["near-silence (-85 dBFS noise)"]
    assert "fewer than the minimum of 5" in reasons["one-window clip (0.5 s)"]
    assert "hum_db" in reasons["50 Hz mains hum"]
    assert "level_dbfs" in reasons["white noise at -75 dBFS"]
    assert "spectrum unlike the training recordings'" in reasons["white noise"]


def test_held_out_recordings_keep_their_verdicts_and_the_text_names_the_demonstration_model(model, shards_dir):
    test = [r for r in load_index(shards_dir)["recordings"] if r["split"] == "test"]
    result = run_cli("predict", str(model), *[r["path"] for r in test], "--json")
    assert result.returncode in (0, 3), result.stderr
    results = json.loads(result.stdout)
    abstained = [r for r in results if r["verdict"] is None]
    print(f"held-out synthetic test recordings without a verdict: {len(abstained)} of {len(results)}")
    # Only those the rule names on physical grounds: aperiodic recordings, never the spectrum or the source.
    assert all(all("aperiodic" in reason for reason in r["reasons"]) for r in abstained), abstained
    assert len(abstained) <= len(results) // 5

    periodic = [r["path"] for r, p in zip(test, results) if p["verdict"] is not None][:2]
    text = run_cli("predict", str(model), *periodic)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"model trained on ") and "synthetic recordings (vascdist synth)" in lines[0]
    assert lines[1] == "DEMONSTRATION MODEL: TRAINED ON SYNTHETIC RECORDINGS (VASCDIST SYNTH), NEVER ON REAL ONES"
    verdicts = [line for line in lines if line.startswith(tuple(periodic))]
    assert len(verdicts) == 2 and all("[demonstration model: trained on synthetic recordings" in v for v in verdicts)
    assert text.stdout.count("model trained on ") == 1


def test_a_patient_verdict_uses_only_recordings_with_a_verdict_and_names_the_others(model, shards_dir, garbage):
    test = [r for r in load_index(shards_dir)["recordings"] if r["split"] == "test" and r["quality"]["periodic"]]
    files = [test[0]["path"], str(garbage["white noise"])]
    result = run_cli("predict", str(model), *files, "--patient", "P7", "--json")
    assert result.returncode == 3, result.stderr
    out = json.loads(result.stdout)
    (patient,) = out["patients"]
    assert patient["recordings"] == [files[0]] and patient["left_out"] == [files[1]]
    assert patient["probabilities"] == out["recordings"][0]["probabilities"]  # the garbage is not averaged in
    text = run_cli("predict", str(model), *files, "--patient", "P7")
    assert f"no verdict, left out: {files[1]}" in text.stdout

    result = run_cli("predict", str(model), str(garbage["white noise"]), "--patient", "P8", "--json")
    (patient,) = json.loads(result.stdout)["patients"]
    assert patient["verdict"] is None and patient["reasons"] == ["no recording of this patient got a verdict"]


def test_the_minimum_of_cycles_is_configurable(model, shards_dir):
    rec = next(r for r in load_index(shards_dir)["recordings"] if r["split"] == "test" and r["quality"]["periodic"])
    result = run_cli("predict", str(model), rec["path"], "--min-cycles", str(rec["cycles"] + 1), "--json")
    assert result.returncode == 3
    (r,) = json.loads(result.stdout)
    assert r["reasons"] == [f"{rec['cycles']} usable cycle window(s), fewer than the minimum of {rec['cycles'] + 1} "
                            "(predict --min-cycles)"]


def test_evaluate_prints_the_provenance_once(model):
    result = run_cli("evaluate", str(model), "--out", str(model / "eval-abstain.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model trained on ") == 1 and "DEMONSTRATION MODEL" in result.stdout


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink loop", "dangling symlink"])
def test_predict_names_the_true_reason_a_file_cannot_be_read(model, tmp_path, kind):
    path = tmp_path / "input"
    if kind == "directory":
        path.mkdir()
        expected = "a directory, not a file"
    elif kind == "fifo":
        os.mkfifo(path)
        expected = "a FIFO (named pipe), not a regular file"
    elif kind == "symlink loop":
        path.symlink_to(path)
        expected = "a symbolic link loop"
    else:
        path.symlink_to(tmp_path / "gone.wav")
        expected = "a broken symbolic link"
    result = run_cli("predict", str(model), str(path), timeout=120)  # a FIFO must not be opened: no hang
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vascdist predict: error: {path}: {expected}"), line
    assert "file not found" not in result.stderr and "Traceback" not in result.stderr
