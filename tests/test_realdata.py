"""The front end on the two shared real recordings and on synthetic ones, through a real trained model:
predictions independent of the recording gain, quality records, no verdict on real files from a synthetic model,
patient verdicts, `inspect`."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from helpers import run_cli
from vascdist.inference import predict_files
from vascdist.runner import run_training

pytestmark = pytest.mark.slow

REAL_NAMES = ["arterial_20190923.wav", "venous_20190923.wav"]
GAINS_DB = (-20.0, -12.0, -6.0, 6.0, 12.0)


@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory):
    """A small model trained for a few steps: invariance must hold for any weights, trained or not."""
    tmp = tmp_path_factory.mktemp("tiny")
    run_training(None, [f"data.shards={shards_dir}", f"run.out_dir={tmp}", "run.name=tiny", "model.width=0.125",
                        "data.batch_size=16", "data.reader_threads=0", "train.max_steps=12", "train.min_steps=0",
                        "train.device=cpu"], run_dir=str(tmp / "run"), quiet=True)
    return tmp / "run"


def _gained(src: Path, out_dir: Path) -> list[Path]:
    """Copies of `src` at GAINS_DB, written as 32-bit float so that no gain clips."""
    samples, rate = sf.read(str(src), dtype="float64")
    paths = []
    for gain in GAINS_DB:
        path = out_dir / f"{src.stem}_{gain:+.0f}dB.wav"
        sf.write(path, samples * 10 ** (gain / 20), rate, subtype="FLOAT")
        paths.append(path)
    return paths


def test_probabilities_do_not_depend_on_gain(real_recordings, tiny_run, synth_dir, tmp_path):
    sources = [real_recordings / n for n in REAL_NAMES] + sorted((synth_dir / "wav").glob("*.wav"))[:2]
    moved = {}
    for src in sources:
        copies = _gained(src, tmp_path)
        # abstain=False: the model's own output, also where predict would give no verdict (real files)
        results = predict_files(str(tiny_run), [str(src)] + [str(p) for p in copies], abstain=False)
        base = results[0]
        for r in results[1:]:
            assert len(r["cycles"]) == len(base["cycles"])
            per_cycle = max(abs(a["probabilities"][k] - b["probabilities"][k])
                            for a, b in zip(r["cycles"], base["cycles"]) for k in a["probabilities"])
            moved[Path(r["file"]).name] = per_cycle
    print("largest per-cycle probability change under -20..+12 dB:", json.dumps(moved, indent=1))
    assert max(moved.values()) < 0.05


def test_a_synthetic_model_gives_real_recordings_no_verdict_but_their_quality(real_recordings, tiny_run, tmp_path):
    real_files = [str(real_recordings / n) for n in REAL_NAMES]
    result = run_cli("predict", str(tiny_run), *real_files, "--patient", "P1", "--json")
    assert result.returncode == 3, result.stderr  # read, but no verdict
    out = json.loads(result.stdout)
    for r in out["recordings"]:
        q = r["quality"]
        assert 65 <= q["heart_rate_bpm"] <= 72 and q["periodic"] and q["clipping_fraction"] == 0.0
        assert q["level_dbfs"] is not None and q["snr_db"] is not None
        assert r["verdict"] is None and r["probabilities"] is None
        assert "a real recording, and the model was trained on synthetic recordings (vascdist synth) only" \
            in r["reasons"]
    (patient,) = out["patients"]
    assert patient["patient"] == "P1" and patient["verdict"] is None
    assert patient["left_out"] == real_files and patient["recordings"] == []

    # A heart rate far outside the training data's is a reason of its own.
    rate = 4000
    t = np.arange(20 * rate) / rate
    fast = np.random.default_rng(0).standard_normal(len(t)) * (1.2 + np.sin(2 * np.pi * 2.4 * t)) * 0.05  # 144 bpm
    path = tmp_path / "fast.wav"
    sf.write(path, fast.astype(np.float32), rate)
    result = run_cli("predict", str(tiny_run), str(path))
    assert result.returncode == 3, result.stderr
    assert "no verdict: heart_rate_bpm 14" in result.stdout and "outside the training data's" in result.stdout


def test_metrics_count_exclusions_and_report_sites(tiny_run, tmp_path):
    summary = json.loads((tiny_run / "test_metrics.json").read_text())
    assert summary["recording/excluded"] == 0 and summary["excluded_recordings"] == []
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", str(tiny_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "excluded" in result.stdout.splitlines()[1]  # on the table's n line
    metrics = json.loads(out.read_text())
    assert metrics["recording/excluded"] == 0
    sites = metrics["sites"]  # the synthetic manifest has a site column
    assert sites and set(sites) <= {"arterial_anastomosis", "mid_fistula", "venous_outflow", "upper_arm"}
    assert sum(m["recording/n"] for m in sites.values()) == metrics["recording/n"]
    assert "per site, recording level" in result.stdout


def test_inspect_writes_one_picture(tmp_path, real_recordings):
    out = tmp_path / "arterial.png"
    result = run_cli("inspect", str(real_recordings / REAL_NAMES[0]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 600
    colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
    red = (colours[:, 0] > 150) & (colours[:, 1] < 90) & (colours[:, 2] < 90)
    assert red.sum() > 100  # the onset lines are drawn
