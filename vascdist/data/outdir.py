"""Where a new shard set is built: beside the old one, swapped in only when complete and verified.

    parent/.NAME.lock           flock'ed by the one run writing NAME (holds its pid, host and start time)
    parent/.NAME.build-PID/     the set being written; on success exchanged with NAME in one rename
    parent/NAME/                the finished set: only ever a complete, verified one (or nothing)

A failure of any kind (a bad recording, a full disk, Ctrl-C, SIGTERM) removes the build directory; a kill -9
leaves it behind, and the next run (holding the lock, so no one else can be writing it) removes it. The old
set is never touched until the new one has passed `check_shard_set(full=True)`.

The lock sits beside the directory rather than in it, because the directory itself is swapped: a lock
file inside it would move away with the old set while its holder still works.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vascdist.data.integrity import check_shard_set
from vascdist.data.shard_format import INDEX, SHARD_GLOB, is_shard_name
from vascdist.errors import DataError
from vascdist.fileio import disk_full, disk_full_message, fsync_dir
from vascdist.lockfile import exclusive

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@contextmanager
def building_shard_set(out_dir: str | Path, kind: str, schema_version: int, overwrite: bool,
                       full_check: bool = True) -> Iterator[Path]:
    """Yield an empty directory to write a shard set of `kind` into; on a clean exit verify it and make it
    `out_dir`, replacing a finished set there only with `overwrite`. On any exception `out_dir` is untouched.

    `full_check=False` (benchmark sets of random data) checks index and headers only, not every byte."""
    out = Path(out_dir).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(out):
            old = sorted(out.parent.glob(f".{out.name}.old-*"))
            if old and not out.exists():  # a kill between _swap_in's two renames: the old set is whole, restore it
                os.rename(old[0], out)
            _check_target(out, kind, schema_version, overwrite)
            for stale in out.parent.glob(f".{out.name}.build-*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed run's: we hold the lock, no one writes it
            build = out.parent / f".{out.name}.build-{os.getpid()}"
            build.mkdir()
            try:
                yield build
                check_shard_set(build, full=full_check)
                _swap_in(build, out)
            finally:
                shutil.rmtree(build, ignore_errors=True)  # after a swap it holds the old set
    except OSError as exc:
        if disk_full(exc):
            raise DataError(disk_full_message(getattr(exc, "filename", None) or out)) from None
        raise


def _exclusive(out: Path):
    """Hold parent/.NAME.lock (vascdist.lockfile); a second run refuses at once, naming the holder."""
    return exclusive(out.parent / f".{out.name}.lock", f"{out}: another run is writing this shard set",
                     "wait for it to finish or choose another --out", DataError)


def _check_target(out: Path, kind: str, schema_version: int, overwrite: bool) -> None:
    """Refuse to replace a finished set without --overwrite, one of another schema, or anything not a set."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another --out")
    index_path = out / INDEX
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{index_path}: unreadable index ({exc}); remove the directory or choose another --out") from None
        if old.get("schema_version") != schema_version or old.get("kind") != kind:
            raise DataError(f"{out}: holds shards of another schema (schema {old.get('schema_version')}, kind "
                            f"{old.get('kind')}; this is schema {schema_version}, kind {kind}); choose another --out")
        if not overwrite:
            raise DataError(f"{out}: already holds a finished shard set; pass --overwrite to replace it or choose another --out")
    elif any(out.glob(SHARD_GLOB)) and not overwrite:
        raise DataError(f"{out}: holds shard files but no {INDEX} (an unfinished or damaged set); pass --overwrite to "
                        "replace them or choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if foreign:
        raise DataError(f"{out}: holds '{foreign[0]}', which is not part of a shard set (it would be deleted with the "
                        "old set); choose an empty or new --out")


def _ours(name: str) -> bool:
    return (name in (INDEX, "skipped.csv") or is_shard_name(name)
            or (name.startswith((".shard-", f".{INDEX}.")) and name.endswith(".tmp")))


def _swap_in(build: Path, out: Path) -> None:
    """Make `build` the directory `out`: one atomic exchange where Linux offers it, else two renames."""
    if not out.exists():
        os.rename(build, out)
    elif not _exchange(build, out):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)  # a kill between these two renames leaves no `out`; old and new both survive
        os.rename(build, out)
        os.rename(old, build)  # so that the caller's cleanup removes it
    fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two paths atomically. False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
