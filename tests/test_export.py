"""`vascdist export`: a trained run to ONNX + model card, on CPU. The round trip (torch -> ONNX -> onnxruntime)
is checked by export itself on the run's test samples and on recordings preprocessed end to end; here the
files, the card and README's use-without-vascdist example are checked too."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_cli

pytestmark = pytest.mark.slow  # trains the run it exports

pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed (pip install -e '.[export]')")


@pytest.fixture(scope="module")
def trained_run(shards_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    result = run_cli("train", "quickstart", f"data.shards={shards_dir}", "data.synth_patients=0", "data.batch_size=16",
                     "data.reader_threads=0", "model.width=0.125", "train.epochs=1", "train.max_steps=20",
                     "train.eval_every=10", "eval.bootstrap_resamples=0", "eval.min_patients_per_class=1",
                     "--run-dir", str(run), "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _export(run, out, *recordings):
    args = ["export", str(run), "--out", str(out)] + [a for r in recordings for a in ("--recording", str(r))]
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


def test_export_round_trip(trained_run, synth_dir, tmp_path):
    import onnx
    import onnxruntime
    wav = sorted((synth_dir / "wav").glob("*.wav"))[0]
    out = tmp_path / "export"
    result = _export(trained_run, out, wav)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {out / 'model.onnx'} (ONNX opset 18, dynamic batch axis)" in result.stdout
    card = json.loads((out / "model_card.json").read_text())
    checks = card["parity"]["checks"]
    assert [c["source"] for c in checks][1:] == [wav.name] and checks[0]["source"].endswith("test samples")
    assert all(c["max_abs_diff"] <= card["parity"]["tolerance"] == 1e-4 and c["windows"] > 0 for c in checks)
    assert card["classes"] == ["normal", "stenosis"] and card["opset"] == 18
    assert set(card["thresholds"]) == {"cycle", "recording", "patient"} and card["threshold_rule"]
    assert card["preprocessing"]["parameters"]["spectrogram"]["n_mels"] == 40 and card["normalization"]["std"]
    assert card["training_data"]["quality_range"] and card["checkpoint"]["file"] == "best.pt"
    assert set(card["versions"]) == {"vascdist", "torch", "onnx", "onnxruntime"}

    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is dynamic
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    windows = np.load(out / card["example"]["input"])
    for n in (1, 5):  # any batch size
        probs = session.run(None, {card["input"]["name"]: windows[:n]})[0]
        assert probs.shape == (n, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    mean = session.run(None, {"input": windows})[0].mean(axis=0)
    assert np.allclose(mean, list(card["example"]["mean_probabilities"].values()), atol=1e-4)

    # README's example, run as a user would: a script that needs onnxruntime and numpy, not vascdist or torch.
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Export.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "vascdist" not in code and "torch" not in code and len(code.splitlines()) <= 25
    script = tmp_path / "use_model.py"
    script.write_text(code)
    used = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert used.returncode == 0, used.stderr
    p = card["example"]["mean_probabilities"]["stenosis"]
    verdict = "stenosis" if p >= card["thresholds"]["recording"] else "normal"
    assert used.stdout.startswith(verdict + " ")


def test_export_of_the_real_recordings(trained_run, real_recordings, tmp_path):
    files = sorted(real_recordings.glob("*.wav"))
    result = _export(trained_run, tmp_path / "real", *files)
    assert result.returncode == 0, result.stderr[-2000:]
    checks = json.loads((tmp_path / "real" / "model_card.json").read_text())["parity"]["checks"]
    assert [c["source"] for c in checks[1:]] == [f.name for f in files]
    assert all(c["max_abs_diff"] <= 1e-4 and c["windows"] > 20 for c in checks[1:])  # ~36 cycles in each file


def test_export_says_which_extra_is_missing(trained_run, tmp_path):
    # A Python where onnxruntime cannot be imported (a None entry in sys.modules is how Python marks that).
    code = ("import sys; sys.modules['onnxruntime'] = None; from vascdist.cli import main; "
            f"sys.exit(main(['export', {str(trained_run)!r}, '--out', {str(tmp_path / 'x')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "x").exists()
    assert result.stderr.strip() == ("vascdist export: error: vascdist export needs the 'export' extra (missing: "
                                     "onnxruntime): pip install 'vascdist[export]'")


def test_export_bad_inputs_are_one_line(trained_run, tmp_path):
    missing = run_cli("export", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "nothing" in missing.stderr
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a recording")
    bad = _export(trained_run, tmp_path / "y", not_audio)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "notes.wav" in bad.stderr
    assert not (tmp_path / "y").exists()  # nothing written
