"""`vascdist config` explains the resolved config, and docs/config.md stays in sync with the dataclasses."""

from __future__ import annotations

import dataclasses

from conftest import REPO, run_cli


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
    assert run_cli("config", "--diff").stdout.strip() == "(every key has its default value)"


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
