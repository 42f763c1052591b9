"""What a restart restores, and the checkpoint directory kept consistent: CheckpointManager and TrainState.

The names in a run directory belong to `RunLayout` (train/layout.py, importable without torch): step files
(``step-00000040.pt``), ``best.pt`` and DeepSpeed tag directories (``checkpoints/deepspeed/step-00000040/``,
written before the step file, which marks both complete). `CheckpointManager` keeps that checkpoint directory
consistent after a kill at any instant:

- every step file records the best step so far (``progress.best_step``), so a best.pt lost or left stale by a
  kill between writing the step file and copying it is recovered from the step file of the best step
  (`recover_best`, run before a resume and before evaluate reads a run directory; no save prunes in between);
- pruning keeps the step just written and the newest ``keep_last - 1`` below it; files numbered above it come
  from an abandoned attempt (a resume from an older file) and are removed with a line saying so, so that neither
  they nor corrupt leftovers displace the fresh files or hijack a later ``--resume auto``;
- a step whose parameters are not finite is never saved (`TrainState.save`), so the last finite checkpoint stays.

`TrainState` bundles what must survive a restart (engine, scheduler, loader, progress, RNG), each behind
``state_dict``/``load_state_dict``, and saves and resumes it through the layout. What a checkpoint file holds,
and the typed view every reader goes through (`SavedCheckpoint`), are in train/saved.py; `open_checkpoint` reads
the one a command names.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from vascdist.errors import VascdistError
from vascdist.fileio import temp_target
from vascdist.train.checkpoint import (atomic_copy, atomic_torch_save, capture_rng_state, check_weights_only, load_file,
                                       restore_rng_state, try_load)
from vascdist.train.layout import BEST_FILE, DEEPSPEED_DIR, STEP_FILE, STEP_TAG, RunLayout, step_files, step_stem
from vascdist.train.saved import Progress, SavedCheckpoint, checkpoint_entries, saved_progress



# --------------------------------------------------------------------------------------------- layout
def best_checkpoint(layout: RunLayout) -> SavedCheckpoint:
    """A run's best model (best.pt, recovered from its step file if it was lost), read once."""
    manager = CheckpointManager(layout.checkpoints, 1)
    state = manager.best_state()
    if state is not None:
        return SavedCheckpoint.from_state(manager.best_path, state)
    if manager.best_path.is_file():  # there, but unreadable: the loader's line names the problem
        return SavedCheckpoint.read(manager.best_path)
    steps = manager.step_files()
    if not steps:
        raise VascdistError(f"{layout.root}: no checkpoints (neither {BEST_FILE} nor step-*.pt in {layout.checkpoints})")
    raise VascdistError(f"{layout.root}: no {BEST_FILE} (the run stopped before its first evaluation, or it was "
                        f"deleted); pass a step file explicitly, e.g. {steps[-1][1]}")


def open_checkpoint(run_or_checkpoint: str | Path) -> SavedCheckpoint:
    """A checkpoint file as given, or a run directory's best weights (what evaluate, predict and export read),
    read once."""
    path = Path(run_or_checkpoint)
    if path.is_file():
        return SavedCheckpoint.read(path)
    if path.is_dir() and RunLayout(path).checkpoints.is_dir():
        return best_checkpoint(RunLayout(path))
    raise VascdistError(f"{path}: neither a checkpoint file nor a run directory with checkpoints")


def deepspeed_tag(step: int) -> str:
    """The DeepSpeed tag (directory name) of the checkpoint of `step`: the step file's name without '.pt'."""
    return step_stem(step)


def deepspeed_root(checkpoint_dir: str | Path) -> Path:
    """Where DeepSpeed tag directories live for the step files in `checkpoint_dir`."""
    return Path(checkpoint_dir) / DEEPSPEED_DIR


# --------------------------------------------------------------------------------------------- checkpoints
def _saved_step(state: dict | None) -> int | None:
    progress = saved_progress(state)
    return None if progress is None else progress.step


def _saved_best_step(state: dict | None) -> int | None:
    progress = saved_progress(state)
    best = None if progress is None else progress.best_step
    return best if isinstance(best, int) and best >= 0 else None


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
        return self.directory / f"{step_stem(step)}.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_FILE

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step file, oldest step first; temp files and best.pt are not listed."""
        return step_files(self.directory)

    def save(self, step: int, state: dict, is_best: bool = False) -> Path:
        """Atomically write `state` as the checkpoint of `step` (and as best.pt), then prune old step files.

        Older files are deleted only after the new ones are in place, so a crash at any point leaves at
        least the previous loadable checkpoint, and the best step's file until best.pt holds it.
        """
        if step < 0:
            raise VascdistError(f"checkpoint step must be >= 0, got {step}")
        if not isinstance(state, dict):
            raise VascdistError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
        if self.weights_only:
            check_weights_only(state)
        path = self.step_path(step)
        atomic_torch_save(state, path)
        if is_best:
            atomic_copy(path, self.best_path)
        self._prune(step)
        self._remove_stale_temp_files()
        return path

    def _prune(self, step: int) -> None:
        """Keep the file of `step` (just written) and the newest keep_last - 1 below it; remove any above it."""
        older = [p for s, p in self.step_files() if s < step]
        for path in older[: max(0, len(older) - (self.keep_last - 1))]:
            path.unlink(missing_ok=True)
        for s, path in self.step_files():
            if s > step:
                print(f"removing {path} (newer than step {step}, from an attempt this run did not resume)",
                      file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a crash or a kill mid-write; safe now because our own writes are finished."""
        for path in self.directory.iterdir():
            target = temp_target(path.name)
            if target is not None and (target == BEST_FILE or STEP_FILE.match(target)):
                path.unlink(missing_ok=True)

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict:
        """Load one checkpoint file; VascdistError naming the file if it is missing, truncated or corrupt."""
        return load_file(path, map_location, self.weights_only)

    def read(self, path: str | Path, map_location: Any = "cpu") -> SavedCheckpoint:
        """One vascdist checkpoint file through the typed view (`load`'s errors, and one line for a foreign file)."""
        return SavedCheckpoint.from_state(Path(path), self.load(path, map_location))

    def latest_loadable(self, map_location: Any = "cpu") -> tuple[Path, dict] | None:
        """The newest step file that loads, with its state; corrupt files are skipped with one stderr line."""
        for _, path in reversed(self.step_files()):
            state, reason = try_load(path, map_location, self.weights_only)
            if state is not None:
                return path, state
            print(f"skipping corrupt checkpoint {path}: {reason}", file=sys.stderr, flush=True)
        return None

    def recover_best(self) -> Path | None:
        """Rewrite best.pt from the step file of the best step recorded in the newest loadable step file, when
        best.pt is missing, unreadable or older than that step (a kill between the two writes). Returns best.pt's
        path if it was rewritten."""
        return self._recover()[0]

    def best_state(self) -> dict | None:
        """best.pt's state after `recover_best` (None when there is no loadable best.pt)."""
        return self._recover()[1]

    def _recover(self) -> tuple[Path | None, dict | None]:
        """(best.pt if it was rewritten, best.pt's state now); each file is read once."""
        found = self.latest_loadable()
        best_step = _saved_best_step(found[1]) if found else None
        on_disk = try_load(self.best_path, weights_only=self.weights_only)[0] if self.best_path.is_file() else None
        if best_step is None or _saved_step(on_disk) == best_step:
            return None, on_disk
        source = self.step_path(best_step)
        state = found[1] if found[0] == source else \
            try_load(source, weights_only=self.weights_only)[0] if source.is_file() else None
        if state is None:
            return None, on_disk
        atomic_copy(source, self.best_path)
        print(f"recovered {self.best_path} from {source.name} (best step {best_step})", file=sys.stderr, flush=True)
        return self.best_path, state


def prune_deepspeed_tags(manager: CheckpointManager) -> list[Path]:
    """Remove DeepSpeed tag directories whose step file is gone (pruned, or never written); returns them."""
    root = deepspeed_root(manager.directory)
    if not root.is_dir():
        return []
    kept = {path.stem for _, path in manager.step_files()}
    removed = []
    for path in sorted(root.iterdir()):
        if STEP_TAG.match(path.name) and path.is_dir() and path.name not in kept:
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
        manager = CheckpointManager(run_dir_checkpoints, 1, weights_only)
        found = manager.latest_loadable()
        if found is None and manager.step_files():  # starting over would prune the fresh files for the corrupt ones
            raise VascdistError(f"every checkpoint in {manager.directory} is unreadable (see the lines above); move "
                                "them away to start this run over, or resume another file with --resume FILE")
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


# --------------------------------------------------------------------------------------------- train state
def all_finite(module: torch.nn.Module) -> bool:
    """Whether every floating parameter and buffer of `module` is finite (a diverged step leaves NaN or inf)."""
    return all(bool(torch.isfinite(t).all()) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())


class TrainState:
    """Everything a restart restores, saved to and resumed from one run directory.

    `extra` holds what is saved for readers but not restored (saved.reader_entries: the config, the data entry, the
    world size).
    """

    def __init__(self, engine, scheduler, loader, layout: RunLayout, keep_last: int, extra: dict, writer: bool):
        self.engine, self.scheduler, self.loader = engine, scheduler, loader
        self.progress = Progress()
        self.layout, self.extra = layout, extra
        self.writer = writer  # this process repairs files (global rank 0); the engine decides who saves
        self.checkpoints = CheckpointManager(layout.checkpoints, keep_last)

    def state_dict(self) -> dict:
        return checkpoint_entries(self.engine.state_dict(), self.scheduler.state_dict(), self.loader.state_dict(),
                                  capture_rng_state(), self.progress, self.extra)

    def load_state_dict(self, saved: SavedCheckpoint) -> None:
        """Restore scheduler, loader, RNG and progress (the engine restores itself from the file: DeepSpeed
        reads its own directory)."""
        saved.require_resumable()
        self.scheduler.load_state_dict(saved.scheduler)
        self.loader.load_state_dict(saved.loader)
        restore_rng_state(saved.rng)
        self.progress.load_state_dict(saved.progress.state_dict())

    def save(self, finite: bool, is_best: bool = False) -> bool:
        """Checkpoint the current step on every rank (the engine decides who writes); `finite` must be the same on
        every rank (see dist.any_rank). A non-finite state is never saved: the last finite checkpoint stays."""
        if not finite:
            return False
        self.engine.save_checkpoint(self.checkpoints, self.progress.step, self.state_dict(), is_best=is_best)
        return True

    def resume(self, resume: str | None) -> Path | None:
        """Load the checkpoint `resume` names ('auto', a file or a directory); returns its path (None: fresh start)."""
        path = resolve_resume(resume, self.layout.checkpoints) if resume else None
        if path is None:
            return None
        if self.writer:
            self.checkpoints.recover_best()
        saved = self.engine.load_checkpoint(self.checkpoints, path)
        self.load_state_dict(saved)
        return path

    def load_best_weights(self) -> None:
        """Put the best checkpoint's weights into the model (for the final test); an error if they are gone.
        Every rank reads best.pt: the caller puts a barrier between the writer's last save and this call."""
        if self.progress.best_step < 0:
            return
        best = self.checkpoints.best_path
        saved = self.checkpoints.read(best) if best.is_file() else None
        if saved is None or saved.step != self.progress.best_step:
            raise VascdistError(f"the best checkpoint (step {self.progress.best_step}) is not in {best}; "
                                f"evaluate the run's step files explicitly with `vascdist evaluate FILE`")
        self.engine.module.load_state_dict(saved.weights)
