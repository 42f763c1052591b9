"""The wheel holds what an installed vascdist reads, and nothing else at top level: built from this checkout,
installed (not editable) into a folder of its own, and run from an empty directory.

The build is the one .ci/run and README use (pip wheel, the build backend from the lock file, in pip's isolated build
environment: pip fetches setuptools from the index once, then from its cache); .ci/run also runs a short training
from the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # builds and installs a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")  # a copy: the build must not leave build/ or *.egg-info in the checkout
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, build / name)
    shutil.copytree(REPO / "vascdist", build / "vascdist", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(build)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_CONSTRAINT": str(REPO / "requirements" / "lock.txt")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("vascdist-*.whl")
    return path


def test_the_wheel_holds_the_configs_and_launch_scripts_and_one_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("vascdist-")} == {"vascdist"}
    for data in ("vascdist/configs/quickstart.yaml", "vascdist/configs/resnet50.yaml",
                 "vascdist/configs/deepspeed/zero2.json", "vascdist/launch/train.sbatch", "vascdist/launch/torchrun.sh"):
        assert data in names, data
    info = zipfile.ZipFile(wheel).getinfo("vascdist/launch/torchrun.sh")
    assert info.external_attr >> 16 & 0o111  # executable


def test_the_installed_wheel_runs_from_an_empty_directory(wheel, tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy first; its dependencies from this environment

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vascdist.cli", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import vascdist; print(vascdist.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    result = cli("config", "optim.lr=0.01", "--diff")
    assert result.returncode == 0 and "run.name = 'quickstart'" in result.stdout, result.stderr
    assert "run.name = 'resnet50'" in cli("config", "resnet50", "--diff").stdout
    assert "did you mean 'quickstart'?" in cli("config", "quickstrat").stderr
    template = cli("script", "train.sbatch")
    assert template.returncode == 0 and template.stdout == (REPO / "vascdist" / "launch" / "train.sbatch").read_text()
    launcher = Path(cli("script", "torchrun.sh", "--path").stdout.strip())
    assert launcher.is_relative_to(site) and launcher.is_file()
    assert list(cwd.iterdir()) == []  # nothing written where it ran
