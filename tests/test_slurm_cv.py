"""`vascdist cv --submit`: the folds as a 3-task SLURM job array on the local cluster (slurm/local-cluster.sh), and
leave-one-site-out (--group-by site) as a 2-task array; each aggregate must equal the local run's for the same seed."""

from __future__ import annotations

import json
import re

import pytest

from helpers import check_folds, check_site_folds, cv_args, run_cli, site_cv_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SUBMIT = ("--submit", "--wait", "--time", "20", "--signal-delay", "60")


def submit_and_wait(args: list[str]):
    """`vascdist cv ... --submit --wait` on the local cluster; it must exit 0."""
    from slurm_cluster import ensure_cluster
    env = {**ensure_cluster(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = run_cli(*args, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_slurm_array_aggregate_equals_local(local_cv, shards_dir, tmp_path):
    out = tmp_path / "slurm"
    result = submit_and_wait(cv_args(shards_dir, out, *SUBMIT))
    assert result.stdout.count("submitted job") == 3 and len({l.split()[2] for l in result.stdout.splitlines()
                                                             if l.startswith("submitted job")}) == 3
    for fold in ("r0-f0", "r0-f1", "r0-f2"):  # one line per fold at the end
        assert re.search(rf"^job \S+ \({fold}\): COMPLETED, test recording/balanced_accuracy \d\.\d\d \[", result.stdout,
                         re.M), result.stdout[-3000:]
    check_folds(out, shards_dir)
    local = json.loads((local_cv[0] / "aggregate.json").read_text())
    slurm = json.loads((out / "aggregate.json").read_text())
    assert slurm["finished"] == local["finished"]
    assert slurm["pooled"]["0"]["metrics"] == local["pooled"]["0"]["metrics"]
    assert slurm["pooled"]["0"]["intervals"] == local["pooled"]["0"]["intervals"]


def test_slurm_leave_one_site_out_equals_local(local_site_cv, site_shards, tmp_path):
    """`vascdist cv --group-by site --submit`: one array task per site; the same folds and aggregate as locally."""
    out = tmp_path / "slurm-sites"
    result = submit_and_wait(site_cv_args(site_shards, out, *SUBMIT))
    assert result.stdout.count("submitted job") == 2 and "for fold site-centre-1" in result.stdout
    check_site_folds(out, site_shards)
    local = json.loads((local_site_cv[0] / "aggregate.json").read_text())
    slurm = json.loads((out / "aggregate.json").read_text())
    assert slurm["finished"] == local["finished"] == ["site-centre-1", "site-centre-2"]
    assert slurm["sites"] == local["sites"] and slurm["pooled"]["0"]["metrics"] == local["pooled"]["0"]["metrics"]
