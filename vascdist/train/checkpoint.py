"""Exact, crash-safe checkpoints: atomic writes, RNG capture, keep-last-N pruning and resume resolution.

Nothing here imports ``torch.distributed``: the training loop decides which rank saves (global rank 0) and
which ranks load (all of them).

Every file is written temp file -> flush -> fsync -> ``os.replace`` -> fsync(directory), so a crash or a
signal mid-write never leaves a half-written file under the final name. Temp files are named
``.<final name>.<pid>.<random>.tmp``: they never match ``step-*.pt``, so loading ignores them, and the manager
removes leftovers after its next successful save.

States are kept loadable with ``torch.load(weights_only=True)`` (the safe unpickler): ``capture_rng_state``
stores numpy's key as a tensor, and ``CheckpointManager.save`` refuses, at save time and naming the key, a
value that the safe unpickler would refuse at resume time (a numpy scalar, a slice, a defaultdict ...).
``CheckpointManager(weights_only=False)`` lifts both for states that need arbitrary python objects.
"""

from __future__ import annotations

import collections
import os
import random
import re
import shutil
import sys
import uuid
import zipfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write, fsync_dir

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
BEST_FILE = "best.pt"
TEMP_FILE = re.compile(r"^\.(step-\d+\.pt|best\.pt)\.\d+\.[0-9a-f]+\.tmp$")  # what fileio.atomic_write names

# Types the safe unpickler of torch.load(weights_only=True) accepts without add_safe_globals (checked on
# torch 2.11; exact types: a subclass such as defaultdict or a namedtuple is refused).
_SAFE_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device,
                torch.Tensor, torch.nn.Parameter)
_SAFE_MAPPINGS = (dict, collections.OrderedDict)
_SAFE_SEQUENCES = (list, tuple, set)


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that either fully replaces `path` or leaves it untouched (no temp file left)."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy the bytes of `src` to `dst` atomically (no second serialisation)."""
    def write(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=16 * 1024 * 1024)
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
            "CheckpointManager(weights_only=False)")


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


# --------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes ``step-{step:08d}.pt`` files (and ``best.pt``) in `directory`; keeps the newest `keep_last`.

    Construction does no I/O, so every rank may build one; only the saving rank should call `save`.
    """

    def __init__(self, directory: str | Path, keep_last: int, weights_only: bool = True):
        if keep_last < 1:
            raise VascdistError(f"CheckpointManager keep_last must be >= 1, got {keep_last} (train.keep_last)")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.weights_only = weights_only

    def step_path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_FILE

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step file, oldest step first; temp files and best.pt are not listed."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = STEP_FILE.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict, is_best: bool = False) -> Path:
        """Atomically write `state` as the checkpoint of `step` (and as best.pt), then prune old step files.

        Older files are deleted only after the new ones are in place, so a crash at any point leaves at
        least the previous loadable checkpoint.
        """
        if step < 0:
            raise VascdistError(f"checkpoint step must be >= 0, got {step}")
        if not isinstance(state, dict):
            raise VascdistError(f"checkpoint state must be a dict, got {_type_name(state)}")
        if self.weights_only:
            check_weights_only(state)
        path = self.step_path(step)
        atomic_torch_save(state, path)
        if is_best:
            _atomic_copy(path, self.best_path)
        self._prune(keep=path)
        self._remove_stale_temp_files()
        return path

    def _prune(self, keep: Path) -> None:
        """Keep `keep` (just written) plus the newest keep_last - 1 other step files."""
        others = [p for _, p in self.step_files() if p != keep]
        for path in others[: max(0, len(others) - (self.keep_last - 1))]:
            path.unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a crash or a kill mid-write; safe now because our own writes are finished."""
        for path in self.directory.iterdir():
            if TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)

    def _try_load(self, path: Path, map_location: Any) -> tuple[dict | None, str]:
        """(state, '') or (None, why it cannot be loaded)."""
        problem = _zip_problem(path)
        if problem:
            return None, problem
        try:
            state = torch.load(path, map_location=map_location, weights_only=self.weights_only)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
            return None, _short_reason(exc)
        if not isinstance(state, dict):
            return None, f"not a vascdist checkpoint (holds a {_type_name(state)}, not a dict)"
        return state, ""

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict:
        """Load one checkpoint file; VascdistError naming the file if it is missing, truncated or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise VascdistError(f"checkpoint '{path}' does not exist or is not a file")
        state, reason = self._try_load(path, map_location)
        if state is None:
            raise VascdistError(f"checkpoint '{path}' is unreadable: {reason}")
        return state

    def latest_loadable(self, map_location: Any = "cpu") -> tuple[Path, dict] | None:
        """The newest step file that loads, with its state; corrupt files are skipped with one stderr line."""
        for _, path in reversed(self.step_files()):
            state, reason = self._try_load(path, map_location)
            if state is not None:
                return path, state
            print(f"skipping corrupt checkpoint {path}: {reason}", file=sys.stderr, flush=True)
        return None


# --------------------------------------------------------------------------------------------- DeepSpeed
# A DeepSpeed checkpoint is a directory per step (every rank writes its ZeRO partition into it) beside the
# vascdist step file: <checkpoints>/deepspeed/step-00000040/ and <checkpoints>/step-00000040.pt. The tag
# directory is written first and the step file last, so a step file's presence marks both complete; a tag
# directory without its step file is a crashed save and is removed by `prune_deepspeed_tags`.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = re.compile(r"^step-(\d+)$")


def deepspeed_tag(step: int) -> str:
    """The DeepSpeed tag (directory name) of the checkpoint of `step`: the step file's name without '.pt'."""
    return f"step-{step:08d}"


def deepspeed_root(checkpoint_dir: str | Path) -> Path:
    """Where DeepSpeed tag directories live for the step files in `checkpoint_dir`."""
    return Path(checkpoint_dir) / DEEPSPEED_DIR


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under `directory` and the directories themselves (DeepSpeed writes with plain torch.save)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *[p for p in directory.rglob("*") if p.is_dir()], directory.parent]:
        fsync_dir(path)


def prune_deepspeed_tags(manager: "CheckpointManager") -> list[Path]:
    """Remove DeepSpeed tag directories whose step file is gone (pruned, or never written); returns them."""
    root = deepspeed_root(manager.directory)
    if not root.is_dir():
        return []
    kept = {path.stem for _, path in manager.step_files()}
    removed = []
    for path in sorted(root.iterdir()):
        if DEEPSPEED_TAG.match(path.name) and path.is_dir() and path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resolve_resume(resume: str, run_dir_checkpoints: str | Path, weights_only: bool = True) -> Path | None:
    """The checkpoint file a `--resume` value names.

    '' or 'none': no resume (None). 'auto': the newest loadable step file in `run_dir_checkpoints`, or None
    when there is none. A directory: the newest loadable step file in it (error if none). Otherwise a file
    path, which must exist.
    """
    if resume in ("", "none"):
        return None
    if resume == "auto":
        found = CheckpointManager(run_dir_checkpoints, 1, weights_only).latest_loadable()
        return found[0] if found else None
    path = Path(resume)
    if path.is_dir():
        found = CheckpointManager(path, 1, weights_only).latest_loadable()
        if found is None:
            raise VascdistError(f"resume directory '{path}' holds no loadable step-*.pt checkpoint")
        return found[0]
    if not path.is_file():
        raise VascdistError(f"resume checkpoint '{path}' not found (give a file, a checkpoint directory or 'auto')")
    return path
