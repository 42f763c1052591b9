"""The typed checkpoint view (train.saved.SavedCheckpoint): every field read back from real step files written by
both engines (TorchEngine and DeepSpeedEngine, one CPU process each), and a foreign or old file refused in one
line, by the view and by the commands that read checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from vascdist.abstain import InputProfile
from vascdist.config import Config
from vascdist.errors import VascdistError
from vascdist.train.layout import RunLayout
from vascdist.train.saved import SavedCheckpoint
from vascdist.train.state import open_checkpoint

pytestmark = pytest.mark.slow  # trains two short runs

STEPS = 6  # checkpoints at steps 3 and 6 (train.checkpoint_every=3), both kept


@pytest.fixture(scope="module", params=["ddp", "deepspeed"])
def run(request, shards_dir, tmp_path_factory):
    """(engine, run directory) of a finished 6-step run with that engine."""
    engine = request.param
    run = tmp_path_factory.mktemp(engine) / "run"
    result = run_cli("train", "quickstart", f"data.shards={shards_dir}", "data.synth_patients=0",
                     "data.batch_size=16", "data.reader_threads=0", "model.width=0.125", "train.epochs=1",
                     f"train.max_steps={STEPS}", "train.eval_every=3", "train.checkpoint_every=3",
                     "eval.bootstrap_resamples=0", "eval.min_patients_per_class=1", f"dist.engine={engine}",
                     "--run-dir", str(run), "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return engine, run


def test_every_field_reads_back_from_a_real_checkpoint(run, shards_dir):
    engine, root = run
    layout = RunLayout(root)
    step, path = layout.step_files()[-1]
    saved = SavedCheckpoint.read(path)
    index = json.loads((shards_dir / "index.json").read_text())

    assert saved.path == path and saved.step == step == STEPS
    assert isinstance(saved.config, Config)
    assert (saved.config.dist.engine, saved.config.train.max_steps, saved.config.data.shards) == \
        (engine, STEPS, str(shards_dir))
    data = saved.data
    assert (data.kind, data.classes, data.sample_shape) == (index["kind"], index["classes"],
                                                            tuple(index["sample_shape"]))
    assert data.preprocess == index["preprocess"] and data.normalization == index["normalization"]
    assert data.quality_range == index["quality_range"]
    assert data.provenance.source == "synthetic" and data.provenance.classes == index["classes"]
    assert isinstance(data.input_profile, InputProfile) and data.input_profile.recordings > 0

    assert saved.best_step in (3, 6) and saved.progress.best_step == saved.best_step
    assert saved.progress.finished and saved.temperature == 1.0
    assert set(saved.val_thresholds) >= {"recording", "rule"}
    assert saved.world_size == 1
    assert all(isinstance(getattr(saved, k), dict) and getattr(saved, k) for k in ("rng", "scheduler", "loader"))
    saved.require_resumable()

    weights = saved.weights
    assert weights.keys() and all(isinstance(t, torch.Tensor) for t in weights.values())
    assert saved.engine.name == engine
    if engine == "ddp":
        assert saved.engine.optimizer is not None and saved.engine.zero_stage is None
    else:
        assert saved.engine.optimizer is None and saved.engine.zero_stage == saved.config.dist.zero_stage
        assert saved.engine.deepspeed_tag == path.stem
        assert (layout.checkpoints / "deepspeed" / saved.engine.deepspeed_tag).is_dir()

    # A run directory opens as its best checkpoint, the file best.pt holds.
    best = open_checkpoint(root)
    assert best.path == layout.checkpoints / "best.pt" and best.step == saved.best_step
    same_step = dict(layout.step_files())[best.step]  # keep_last's default keeps both steps' files
    assert all(torch.equal(w, SavedCheckpoint.read(same_step).weights[k]) for k, w in best.weights.items())


def test_foreign_and_old_files_are_refused_in_one_line(run, tmp_path):
    _, root = run
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(2)}, foreign)  # a bare state_dict, e.g. from another program
    with pytest.raises(VascdistError, match=r"foreign\.pt: not a vascdist checkpoint \(no 'engine' entry\)"):
        SavedCheckpoint.read(foreign)
    for command in (["evaluate", str(foreign)], ["predict", str(foreign), str(foreign)]):
        result = run_cli(*command)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "not a vascdist checkpoint (no 'engine' entry)" in line and "Traceback" not in result.stderr

    # An inference-only (or older) file: evaluate and predict read it; a resume refuses it in one line.
    state = torch.load(RunLayout(root).step_files()[-1][1], weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k not in ("scheduler", "loader", "rng")}, old)
    saved = SavedCheckpoint.read(old)
    assert saved.scheduler is None and saved.weights.keys() == state["engine"]["model"].keys()
    with pytest.raises(VascdistError, match=r"old\.pt' cannot be resumed: it has no 'scheduler' entry") as raised:
        saved.require_resumable()
    assert "\n" not in str(raised.value)

    bad_data = tmp_path / "bad_data.pt"
    torch.save({**state, "data": {"kind": "spectrogram"}}, bad_data)
    with pytest.raises(VascdistError, match=r"bad_data\.pt: not a vascdist checkpoint \(its data entry has no "
                                            r"'classes'\)"):
        SavedCheckpoint.read(bad_data)


def test_evaluate_and_predict_read_the_checkpoint_once(run, synth_dir, tmp_path, monkeypatch):
    """Each command reads its checkpoint file once (a run directory: best.pt, plus the newest step file that says
    which step best.pt must hold); every torch.load of a file is recorded, none is replaced."""
    from vascdist.inference import evaluate_checkpoint, predict
    _, root = run
    layout = RunLayout(root)
    loads: list[str] = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    step_file = str(layout.step_files()[-1][1])
    evaluate_checkpoint(step_file, out=str(tmp_path / "eval.json"))
    assert loads == [step_file]

    loads.clear()
    evaluate_checkpoint(str(root), out=str(tmp_path / "eval.json"))
    assert sorted(loads) == sorted([str(layout.checkpoints / "best.pt"), step_file])

    loads.clear()
    files = [str(p) for p in sorted(synth_dir.rglob("*.wav"))[:2]]
    results, verdicts, _ = predict(step_file, files, {f: "p1" for f in files})
    assert loads == [step_file] and len(results) == 2 and len(verdicts) == 1
