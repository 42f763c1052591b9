"""`vascdist train` checks everything it can before it starts work (issue 12), through the real CLI.

Config-only mistakes are reported before anything is synthesised, preprocessed or written (and before torch is
imported); mistakes that need the shards' index before the run directory exists.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import run_cli


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("override, key", [
    ("model.name=resnet19", "model.name 'resnet19' is unknown; did you mean 'resnet18'?"),
    ("dist.requeue_signal=USR9", "dist.requeue_signal"),
    ("train.early_stop_metric=balanced_accuracy", "train.early_stop_metric"),
    ("train.max_steps=20", "sched.warmup_steps"),  # with sched.warmup_steps=50 below
    ("model.name=resnext1d model.norm=group", "model.norm': model 'resnext1d' has no choice of normalisation"),
    ("optim.lr=nan", "optim.lr' must be finite"),
    ("optim.name=adabound optim.final_lr=0", "optim.final_lr"),
    ("dist.engine=deepspeed dist.zero_stage=3", "dist.zero_stage' = 3 is not supported by vascdist's DeepSpeed engine"),
    ("dist.engine=deepspeed train.compile=true", "train.compile' is not supported with dist.engine=deepspeed"),
])
def test_config_mistakes_fail_before_data_is_synthesised(tmp_path, override, key):
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("train", "data.synth_patients=6", f"data.shards={work / 'data' / 'shards'}",
                     f"run.out_dir={work / 'runs'}", "sched.name=cosine", "sched.warmup_steps=50", *override.split(), cwd=work)
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "synthesising" not in result.stdout
    assert _tree(work) == []  # nothing synthesised, preprocessed or made


def test_config_errors_and_models_do_not_import_torch(tmp_path):
    """What makes them answer at once (timings: `vascdist bench startup`, BENCHMARKS.md)."""
    code = ("import sys; from vascdist.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, rc)")
    for argv in (["models"], ["config", "quickstart", "--diff"], ["train", "model.name=resnet19"],
                 ["train", "optim.lrr=1"], ["train", "no-such-config.yaml"],
                 ["preprocess", "--manifest", "missing.csv", "--out", "shards"], ["predict", "runs/none", "a.wav"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert out.stdout.strip().splitlines()[-1].startswith("False"), (argv, out.stdout, out.stderr)


def test_model_names_read_from_the_source_match_the_registry():
    from vascdist.model_names import registered_models
    from vascdist.models.registry import _accepted_ranks, list_models
    assert sorted(registered_models()) == list_models()
    assert all(registered_models()[n] == _accepted_ranks(n) for n in list_models())
    assert run_cli("models", "resnet*").stdout.split() == list_models("resnet*")


@pytest.fixture(scope="module")
def beat_shards(tmp_path_factory):
    from vascdist.config import PreprocessConfig
    from vascdist.data.beats import preprocess_beats
    root = tmp_path_factory.mktemp("beats")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    beats = rng.normal(0, 1, (len(labels), 187))
    np.savetxt(root / "beats.csv", np.concatenate([beats, labels[:, None]], 1), delimiter=",")
    preprocess_beats(root / "beats.csv", root / "shards", PreprocessConfig(chunk_size=32))
    return root / "shards"


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    # README's beat instruction with the default early-stop metric: beats report cycle/ metrics only
    (["model.name=resnext1d"], "train.early_stop_metric' is 'recording/balanced_accuracy', which beats shards"),
    (["model.name=resnet18", "train.early_stop_metric=cycle/macro_f1"], "model.name 'resnet18' does not take beats"),
    (["model.name=resnext1d", "train.early_stop_metric=cycle/macro_f1", "loss.class_weights=[1,2]"],
     "loss.class_weights' has 2 values but"),
    (["model.name=resnext1d", "train.early_stop_metric=cycle/macro_f1", "sched.name=cosine",
      "sched.warmup_steps=100", "train.epochs=2"], "must be below the 8 optimiser steps of this run"),
])
def test_index_mistakes_fail_before_the_run_directory_exists(tmp_path, beat_shards, overrides, message):
    result = run_cli("train", f"data.shards={beat_shards}", f"run.out_dir={tmp_path / 'runs'}", "data.batch_size=32",
                     *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists() and "run directory" not in result.stdout


def test_a_config_too_big_for_this_machine_is_refused_with_one_line(tmp_path, shards_dir):
    """The resnet50 config at batch 256 on a 24 GB CPU host was killed by the OOM killer (exit 137, no message)."""
    result = run_cli("train", "resnet50", f"data.shards={shards_dir}", f"run.out_dir={tmp_path / 'runs'}",
                     "data.batch_size=256", "train.device=cpu", "sched.warmup_steps=0", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs about" in result.stderr and "train.check_memory=false" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
