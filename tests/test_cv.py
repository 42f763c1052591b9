"""`vascdist cv`: patient-level folds without leakage, fold runs under one directory, the aggregate
(tests/test_slurm_cv.py runs the same cross-validation as a SLURM job array)."""

from __future__ import annotations

import json

import pytest

from helpers import check_folds, run_cli
from vascdist.data.shards import load_index

pytestmark = pytest.mark.slow


def test_local_cv_folds_runs_and_aggregate(local_cv, shards_dir):
    out, result = local_cv
    check_folds(out, shards_dir)
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["finished"] == ["r0-f0", "r0-f1", "r0-f2"] and not aggregate["missing"]
    for name in aggregate["finished"]:
        assert (out / name / "test_metrics.json").is_file() and (out / name / "checkpoints" / "best.pt").is_file()
    pooled = aggregate["pooled"]["0"]
    assert pooled["complete"] and sum(pooled["counts"]["patients"].values()) == len(load_index(shards_dir)["patients"])
    lo, hi = pooled["intervals"]["recording/balanced_accuracy"]
    assert lo <= pooled["metrics"]["recording/balanced_accuracy"] <= hi
    spread = aggregate["spread"]["recording/auroc"]
    assert spread["folds"] == 3 and spread["min"] <= spread["mean"] <= spread["max"]
    assert "3 of 3 folds finished" in result.stdout and "pooled out-of-fold predictions, repeat 0" in result.stdout


def test_report_names_a_missing_fold_and_averages_only_finished_ones(local_cv, tmp_path):
    import shutil
    out, _ = local_cv
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    plan = json.loads((broken / "cv.json").read_text())
    (broken / "r0-f1" / "test_metrics.json").unlink()
    result = run_cli("cv", "--report", str(broken))
    assert result.returncode == 1
    assert "2 of 3 folds finished" in result.stdout and "MISSING r0-f1" in result.stdout
    assert "INCOMPLETE: only r0-f0, r0-f2" in result.stdout
    aggregate = json.loads((broken / "aggregate.json").read_text())
    assert aggregate["spread"]["recording/auroc"]["folds"] == 2 and "r0-f1" in aggregate["missing"]
    assert plan["folds"] == 3


def test_bad_fold_count_is_one_line(shards_dir, tmp_path):
    result = run_cli("cv", "quickstart", "--folds", "40", "--out", str(tmp_path / "x"), f"data.shards={shards_dir}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "40 folds" in result.stderr
