"""`vascdist env` and the one-line errors for a broken binary-coupled install, in real subprocesses.

The broken install is simulated at the import boundary only: a `torchaudio` package earlier on sys.path whose
import raises the OSError a torchaudio wheel built for another torch raises (undefined symbol in libtorchaudio.so).
Everything else (torch, the CLI, the preprocess code) is the real installation.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import REPO, run_cli

import vascdist.compat as compat

UNDEFINED_SYMBOL = ("Could not load this library: /venv/lib/python3.11/site-packages/torchaudio/lib/libtorchaudio.so: "
                    "undefined symbol: torch_exception_get_what_without_backtrace")


def broken_torchaudio_env(tmp_path: Path) -> dict:
    fake = tmp_path / "fake_site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise OSError({UNDEFINED_SYMBOL!r})\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_env_reports_the_stack_and_exits_zero_when_healthy():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    for line in ("torch        2.11.0", "torchaudio   2.11.0", "torchvision  0.26.0", "torchaudio extension loads",
                 "backends     gloo yes"):
        assert line in result.stdout
    assert "deepspeed    0.19." in result.stdout and "submitit     1.5." in result.stdout
    assert "slurm  " in result.stdout and "cuda  " in result.stdout


def test_env_names_both_versions_and_the_fix_when_torchaudio_cannot_load(tmp_path):
    result = run_cli("env", env=broken_torchaudio_env(tmp_path))
    assert result.returncode == 2
    assert "torchaudio extension BROKEN" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vascdist env: error: torchaudio 2.11.0 cannot load with torch 2.11.0 (OSError: ")
    assert "undefined symbol" in line and f"pip install torch=={compat.TORCH} torchaudio=={compat.TORCHAUDIO}" in line


def test_preprocess_fails_with_one_line_not_a_traceback_when_torchaudio_cannot_load(synth_dir, tmp_path):
    result = run_cli("preprocess", "--manifest", str(synth_dir / "manifest.csv"), "--out", str(tmp_path / "shards"),
                     "--quiet", env=broken_torchaudio_env(tmp_path))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vascdist preprocess: error: torchaudio 2.11.0 cannot load with torch 2.11.0")
    assert not (tmp_path / "shards").exists()


def test_a_wrong_release_of_a_package_whose_internals_we_use_is_one_line():
    message = ""
    try:
        compat.require_minor("numpy", "0.1", "a test")
    except compat.VascdistError as exc:
        message = str(exc)
    found = compat.installed_version("numpy")
    assert message == f"vascdist needs numpy 0.1.x for a test; found {found} (pip install 'numpy==0.1.*')"
    assert compat.require_minor("deepspeed", "0.19", "x").startswith("0.19.")
