"""`vascdist env`: what this installation is made of and whether each part a command needs works.

For new users and bug reports: versions of the stack, whether torchaudio's and torchvision's C++ extensions
load against the installed torch, devices and collective backends, and the SLURM commands on PATH.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from vascdist import compat
from vascdist.errors import VascdistError

STACK = ("torch", "torchaudio", "torchvision", "deepspeed", "submitit", "numpy", "scipy", "scikit-learn", "h5py",
         "soundfile", "tensorboard", "pyyaml", "psutil")
EXACT = {"torch": compat.TORCH, "torchaudio": compat.TORCHAUDIO, "torchvision": compat.TORCHVISION}
MINOR = {"deepspeed": "0.19", "submitit": "1.5"}
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "sacct", "scancel")


def _check(fn) -> tuple[str, str | None]:
    """(status text, problem or None) of calling fn()."""
    try:
        return fn() or "ok", None
    except VascdistError as exc:
        return "BROKEN", str(exc)


def _versions(problems: list[str]) -> list[str]:
    lines = [f"python       {platform.python_version()} ({sys.executable})",
             f"platform     {platform.platform()}"]
    for package in STACK:
        found = compat.installed_version(package)
        note = ""
        # A local label names the build, not the release: 2.11.0+cu130 is torch 2.11.0 built for CUDA 13.0.
        if package in EXACT and (found or "").split("+")[0] != EXACT[package]:
            note = f"  <- vascdist is tested with {EXACT[package]}"
            problems.append(f"{package} {found or '(not installed)'} is installed but vascdist pins {EXACT[package]}; "
                            f"fix: {compat.FIX}")
        elif package in MINOR:
            try:
                compat.require_minor(package, MINOR[package], "its private API (vascdist/compat/)")
            except VascdistError as exc:
                note = f"  <- vascdist needs {MINOR[package]}.x"
                problems.append(str(exc))
        lines.append(f"{package:<12} {found or '(not installed)'}{note}")
    return lines


def _devices() -> list[str]:
    import torch
    import torch.distributed as torch_dist
    from vascdist.cpu import thread_settings
    t = thread_settings()
    by = lambda mine: "vascdist's default" if mine else "yours"
    threads = (f"OMP_NUM_THREADS={t.num_threads}: {by(t.num_threads_set_by_vascdist)}" if t.num_threads
               else "torch's default")
    lines = [f"cpu          {os.cpu_count()} cores, {t.usable_cpus} usable (limited by {t.limited_by}); torch uses "
             f"{torch.get_num_threads()} threads ({threads}), OMP_WAIT_POLICY={t.wait_policy} "
             f"({by(t.wait_policy_set_by_vascdist)})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                         f"capability {props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append(f"cuda         {torch.version.cuda} (cuDNN {torch.backends.cudnn.version()})")
    else:
        lines.append("cuda         no CUDA device visible (training runs on the CPU)")
    backends = []
    if torch_dist.is_available():
        backends.append(f"gloo {'yes' if torch_dist.is_gloo_available() else 'no'}")
        nccl = torch_dist.is_nccl_available()
        version = ""
        if nccl and torch.cuda.is_available():
            version = " " + ".".join(str(v) for v in torch.cuda.nccl.version())
        backends.append(f"nccl {'yes' + version if nccl else 'no'}")
    else:
        backends.append("torch.distributed not available")
    lines.append(f"backends     {', '.join(backends)}")
    return lines


def _slurm() -> list[str]:
    found = {c: shutil.which(c) for c in SLURM_COMMANDS}
    have = [c for c, p in found.items() if p]
    if not have:
        return ["slurm        no SLURM commands on PATH (vascdist submit and the sbatch template need them)"]
    version = ""
    if found.get("sbatch"):
        try:
            version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            version = "(sbatch --version did not answer)"
    missing = [c for c, p in found.items() if not p]
    return [f"slurm        {version or 'found'}: {', '.join(have)}" + (f" (missing: {', '.join(missing)})" if missing else ""),
            f"SLURM_CONF   {os.environ.get('SLURM_CONF', '(unset: the system default)')}"]


def environment_report() -> tuple[list[str], list[str]]:
    """(lines to print, problems): each problem is one line saying what is broken and how to fix it."""
    problems: list[str] = []
    lines = _versions(problems)
    try:
        import torch  # noqa: F401
    except Exception as exc:  # a broken torch install: nothing below can be checked
        problems.append(f"torch cannot be imported ({type(exc).__name__}: {exc}); fix: {compat.FIX}")
        return lines, problems
    for label, fn in (("torchaudio extension", lambda: compat.import_torchaudio() and "loads"),
                      ("torchvision ops", lambda: compat.import_torchvision_resnet() and "load")):
        status, problem = _check(fn)
        lines.append(f"{label:<21}{status}")
        if problem:
            problems.append(problem)
    lines += _devices()
    lines += _slurm()
    return lines, problems
