"""Adapters around other packages: binary-coupled imports (torchaudio, torchvision) that fail with one clear line,
and every use of a private API (DeepSpeed, submitit) kept in one small module per package behind a version check.

Nothing outside this package touches another package's private attributes.
"""

from __future__ import annotations

from importlib import metadata

from vascdist.errors import VascdistError

# The binary-coupled trio, exactly as setup.py pins it.
TORCH, TORCHAUDIO, TORCHVISION = "2.11.0", "2.11.0", "0.26.0"
FIX = (f"pip install torch=={TORCH} torchaudio=={TORCHAUDIO} torchvision=={TORCHVISION} "
       "(or reinstall with: pip install -c requirements/lock.txt -e .)")


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None if it is not installed (no import: cheap)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def require_minor(package: str, minor: str, purpose: str) -> str:
    """Check that `package` is installed at release series `minor` ('0.19'); returns the version found.

    Raises VascdistError "vascdist needs deepspeed 0.19.x for X; found 0.20.1 (pip install 'deepspeed==0.19.*')".
    """
    found = installed_version(package)
    if found is None or not (found == minor or found.startswith(minor + ".")):
        raise VascdistError(f"vascdist needs {package} {minor}.x for {purpose}; found {found or 'none'} "
                            f"(pip install '{package}=={minor}.*')")
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def import_torchaudio():
    """`import torchaudio`, or one line naming both versions and the fix when its C++ extension cannot load.

    torchaudio's extension is compiled against one torch release, but its wheel's metadata admits newer and older
    ones: a mismatch surfaces as an OSError (undefined symbol) deep inside `import torchaudio`.
    """
    try:
        import torchaudio
    except (OSError, ImportError, RuntimeError) as exc:
        raise VascdistError(coupled_failure("torchaudio", exc)) from None
    return torchaudio


def import_torchvision_resnet():
    """torchvision's ResNet building blocks, or one line naming both versions and the fix (its C++ operators,
    e.g. torchvision::nms, are registered at import and fail the same way against another torch)."""
    try:
        from torchvision.models import resnet
    except (OSError, ImportError, RuntimeError) as exc:
        raise VascdistError(coupled_failure("torchvision", exc)) from None
    return resnet


def coupled_failure(package: str, exc: BaseException) -> str:
    """The one-line message for a binary-coupled package that does not load next to the installed torch."""
    return (f"{package} {installed_version(package) or '(not installed)'} cannot load with torch "
            f"{installed_version('torch') or '(not installed)'} ({_first_line(exc)}); {package}'s C++ extension is "
            f"built for one torch release; fix: {FIX}")
