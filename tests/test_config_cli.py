"""`vascdist config` explains the resolved config, and docs/config.md stays in sync with the dataclasses."""

from __future__ import annotations

import dataclasses

from helpers import REPO, run_cli


def test_config_prints_every_key_with_its_docstring():
    from vascdist.config import Config, to_dict
    from vascdist.config.drift import flatten
    result = run_cli("config", "quickstart", "optim.lr=0.1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in flatten(to_dict(Config())):
        assert f"\n{key} = " in out, key
    assert "optim.lr = 0.1   (default 0.05)\n    Peak learning rate." in out
    assert "train.max_steps = 0\n    Stop after this many optimiser steps (0: no limit)." in out
    assert "[sched]" in out


def test_config_diff_shows_only_what_differs_from_the_defaults():
    result = run_cli("config", "quickstart", "train.max_steps=100", "--diff")
    assert result.returncode == 0, result.stderr
    keys = [line.split(" = ")[0] for line in result.stdout.splitlines() if " = " in line and not line.startswith(" ")]
    assert "train.max_steps" in keys and "model.width" in keys and "run.name" in keys
    assert "optim.lr" not in keys  # quickstart keeps the default 0.05


def test_config_without_a_config_shows_what_train_runs(tmp_path):
    """`vascdist train optim.lr=0.01` runs quickstart with that override: `vascdist config optim.lr=0.01` shows it."""
    result = run_cli("config", "optim.lr=0.01", "--diff", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# config: quickstart (what `vascdist train` runs when given no config)")
    assert "run.name = 'quickstart'" in result.stdout and "optim.lr = 0.01" in result.stdout
    assert result.stdout.split("\n", 1)[1] == run_cli("config", "quickstart", "optim.lr=0.01", "--diff").stdout


def test_config_names_get_did_you_mean_and_paths_resolve_from_the_working_directory(tmp_path):
    result = run_cli("config", "quickstrat", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "did you mean 'quickstart'?" in result.stderr and "shipped: physionet2016, quickstart, resnet50" in result.stderr
    result = run_cli("train", "configs/resnet50.yaml", cwd=tmp_path)  # the old spelling, from a directory without it
    assert result.returncode == 2 and f"relative to the working directory {tmp_path}" in result.stderr
    assert "did you mean the shipped config 'resnet50'" in result.stderr
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "resnet50.yaml").write_text("run:\n  name: mine\n")
    (tmp_path / "quickstart.yaml").write_text("run:\n  name: local\n")
    for argument, name in (("configs/resnet50.yaml", "mine"), ("quickstart.yaml", "local"), ("quickstart", "quickstart")):
        result = run_cli("config", argument, "--diff", cwd=tmp_path)  # a file in the working directory comes first
        assert result.returncode == 0 and f"run.name = '{name}'" in result.stdout, (argument, result.stderr)


def test_config_errors_are_one_line():
    result = run_cli("config", "quickstart", "optim.lrr=0.1")
    assert result.returncode == 2 and "did you mean 'optim.lr'?" in result.stderr
    result = run_cli("config", "model.name=resnet19")
    assert result.returncode == 2 and "model.name 'resnet19' is unknown" in result.stderr


def test_every_field_has_a_docstring():
    from vascdist.config.reference import describe
    from vascdist.config import Config
    assert dataclasses.is_dataclass(Config)
    missing = [row["key"] for row in describe(Config()) if not row["doc"]]
    assert missing == []


def test_the_config_reference_in_docs_is_up_to_date():
    """Regenerated from the dataclasses and compared; fix with `vascdist config --markdown > docs/config.md`."""
    result = run_cli("config", "--markdown")
    assert result.returncode == 0, result.stderr
    assert (REPO / "docs" / "config.md").read_text() == result.stdout, \
        "docs/config.md is stale: run `vascdist config --markdown > docs/config.md`"
