"""Writing files so that a crash, a kill or a full disk never leaves a half-written file under the final name.

Every write is temp file beside the target -> flush -> fsync -> ``os.replace`` -> fsync(directory). Temp files
are named ``.<final name>.<pid>.<random>.tmp``, so no glob for the final names ever matches one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator

def not_a_readable_file(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file, in a few words (None: it can): not found, a broken link, a
    symbolic link loop, a directory, a FIFO, a socket or device, no permission. Said before an open() would block
    (a FIFO) or fail with a misleading message ("not found" for a loop)."""
    path = str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a broken symbolic link (to {os.readlink(path)})" if os.path.islink(path) else "not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (the link points, through others, back to itself)"
        return exc.strerror or str(exc)
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a socket or device)"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def temp_path(path: Path) -> Path:
    """A fresh temp name beside `path` (what `atomic_write` writes to before the rename)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


_TEMP_NAME = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # the names temp_path makes


def temp_target(name: str) -> str | None:
    """The file name whose `temp_path` `name` is (a leftover of an interrupted `atomic_write`); None otherwise."""
    match = _TEMP_NAME.match(name)
    return match.group(1) if match else None


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms / file systems cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temp file beside `path`, fsync it, rename it over `path`, fsync the directory.

    On any exception (a full disk, a signal's KeyboardInterrupt) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # "x": never reuse a name; normal umask permissions (mkstemp gives 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the file system being full (or a quota exceeded)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(path: str | Path, needed: int | None = None) -> str:
    """One line for a full disk: the path, the space needed (when known) and the space free."""
    where = Path(path)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f"needs {_megabytes(needed)}, " if needed is not None else ""
    return f"{path}: no space left on device ({need}{_megabytes(free)} free); free some space or write elsewhere"


@contextmanager
def said_if_disk_full(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into one VascdistError line (`disk_full_message`); other errors pass."""
    try:
        yield
    except OSError as exc:
        if disk_full(exc):
            from vascdist.errors import VascdistError
            raise VascdistError(disk_full_message(path, needed)) from None
        raise


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 1) -> None:
    """Replace `path` with `value` as JSON (NaN written as null) atomically."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=indent) + "\n")


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None, tuples -> lists, numpy scalars -> python numbers: valid, portable JSON."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return json_safe(value.item())
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl); a last line without its newline (a write cut short by a
    kill or a full disk) is left out, as `drop_partial_last_line` would remove it."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def drop_partial_last_line(path: str | Path) -> int:
    """Truncate a JSON-lines file to its last complete line (before appending to it); returns the bytes dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep
