"""Checkpoint files, whatever directory they live in: atomic torch.save, RNG capture, safe and checked loading.

The run directory's layout (step files, best.pt, DeepSpeed tag directories) and what a run saves belong to
`train/state.py`; nothing here knows them. Nothing here imports ``torch.distributed`` either.

Every file is written through `vascdist.fileio.atomic_write`, so a crash or a signal mid-write never leaves a
half-written file under the final name.

States are kept loadable with ``torch.load(weights_only=True)`` (the safe unpickler): ``capture_rng_state``
stores numpy's key as a tensor, and `check_weights_only` refuses, at save time and naming the key, a value that
the safe unpickler would refuse at resume time (a numpy scalar, a slice, a defaultdict ...).
"""

from __future__ import annotations

import collections
import io
import os
import random
import re
import shutil
import zipfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write, fsync_dir, said_if_disk_full


# Types the safe unpickler of torch.load(weights_only=True) accepts without add_safe_globals (checked on
# torch 2.11; exact types: a subclass such as defaultdict or a namedtuple is refused).
_SAFE_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device,
                torch.Tensor, torch.nn.Parameter)
_SAFE_MAPPINGS = (dict, collections.OrderedDict)
_SAFE_SEQUENCES = (list, tuple, set)


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that either fully replaces `path` or leaves it untouched (no temp file left).

    Serialised in memory first and written with one plain write: torch's own file writer turns a full disk into
    a RuntimeError of its C++ internals; a plain write is an OSError, said in one line naming the file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    image = buffer.getbuffer()
    with said_if_disk_full(path, len(image)):
        atomic_write(Path(path), lambda f: f.write(image))


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy the bytes of `src` to `dst` atomically (no second serialisation)."""
    def write(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=16 * 1024 * 1024)
    with said_if_disk_full(dst, src.stat().st_size):
        atomic_write(dst, write)


# --------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """RNG states of python ``random``, numpy's global generator, torch CPU and every visible CUDA device.

    The result holds only ints, strings, floats, tuples and tensors, so it loads with weights_only=True.
    """
    np_state = np.random.get_state(legacy=False)  # {'bit_generator', 'state': {'key', 'pos'}, 'has_gauss', 'gauss'}
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # uint32 (624,) as int64
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`: the next draws equal those that followed the capture."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].cpu().numpy().astype(np.uint32), "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    torch.set_rng_state(state["torch"].cpu())  # a map_location='cuda' load would have moved it
    saved_cuda = state.get("cuda")
    if saved_cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(saved_cuda) != n:
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(saved_cuda)} devices but {n} are visible; "
                          f"restoring the first {min(n, len(saved_cuda))}", stacklevel=2)
        for device, dev_state in enumerate(saved_cuda[:n]):
            torch.cuda.set_rng_state(dev_state.cpu(), device)


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples; a state that went through JSON or lists would hold lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------- checking
def check_weights_only(state: Any, key: str = "state") -> None:
    """Raise VascdistError naming the first value that torch.load(weights_only=True) would refuse."""
    kind = type(state)
    if kind in _SAFE_MAPPINGS:
        for k, v in state.items():
            if type(k) not in _SAFE_LEAVES:
                raise VascdistError(f"checkpoint state key '{key}' has a key of type {_type_name(k)}; "
                                    "use str or int keys")
            check_weights_only(v, f"{key}.{k}")
    elif kind in _SAFE_SEQUENCES:
        for i, v in enumerate(state):
            check_weights_only(v, f"{key}[{i}]")
    elif kind not in _SAFE_LEAVES:
        raise VascdistError(
            f"checkpoint state key '{key}' holds a {_type_name(state)}, which torch.load(weights_only=True) "
            "refuses; convert it (float(x), int(x), torch.as_tensor(x), dict(x)) or use "
            "CheckpointManager(weights_only=False) (train/state.py)")


def _zip_problem(path: Path) -> str:
    """'' if `path` is a complete zip whose members match their CRC-32s, else why not.

    torch.save writes a zip archive with its directory at the end (so truncation is caught) and a CRC per
    member, which torch.load itself does not check: flipped bytes in a tensor would load silently.
    """
    if not zipfile.is_zipfile(path):
        return "not a complete torch zip archive (truncated, or not a checkpoint)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"damaged zip archive: {exc}"
    return f"member '{bad}' fails its CRC-32 check" if bad else ""


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _short_reason(exc: BaseException) -> str:
    """One line: torch's weights_only messages are paragraphs whose useful part follows 'WeightsUnpickler error:'."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its weights_only message
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
        return f"torch.load(weights_only=True) refused it: {detail[:200]}"
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:200]}"


def try_load(path: Path, map_location: Any = "cpu", weights_only: bool = True) -> tuple[dict | None, str]:
    """(state, '') or (None, why `path` cannot be loaded: truncated, CRC mismatch, unpickling refused, not a dict)."""
    problem = _zip_problem(path)
    if problem:
        return None, problem
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
        return None, _short_reason(exc)
    if not isinstance(state, dict):
        return None, f"not a vascdist checkpoint (holds a {_type_name(state)}, not a dict)"
    return state, ""


def load_file(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """Load one checkpoint file; VascdistError naming the file if it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise VascdistError(f"checkpoint '{path}' does not exist or is not a file")
    state, reason = try_load(path, map_location, weights_only)
    if state is None:
        raise VascdistError(f"checkpoint '{path}' is unreadable: {reason}")
    return state


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under `directory` and the directories themselves (DeepSpeed writes with plain torch.save)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *[p for p in directory.rglob("*") if p.is_dir()], directory.parent]:
        fsync_dir(path)
