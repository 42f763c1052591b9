"""The launchers: `vascdist submit` (submit: one training, or a sweep, as SLURM jobs through submitit),
`vascdist cv --submit` (cv_jobs: the folds as one job array), and two shell scripts shipped as package data,
`train.sbatch` (a plain sbatch template) and `torchrun.sh` (multi-node torchrun), which `vascdist script NAME`
prints (or, with --path, locates) from an installed package."""

from importlib import resources
from pathlib import Path

SCRIPTS = ("train.sbatch", "torchrun.sh")  # package data beside this file


def script_path(name: str) -> Path:
    """The installed file of one of SCRIPTS."""
    return Path(str(resources.files(__name__) / name))
