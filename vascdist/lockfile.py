"""One writer per directory: an flock'ed lock file that says who holds it (pid, host, start time, SLURM job).

`preprocess` holds one beside the shard set it writes (data/outdir.py), a training one in its run directory
(runner.py) for its whole life. A second writer is refused at once, naming the holder. The holder's line stays in
the file only while it runs (a clean exit, an error or a signal empties it), so a line found in a lock nobody holds
was left by a process that died (kill -9, a crashed node):

- on this host (or by an earlier attempt of this SLURM job): the lock is taken over, with a line saying so;
- on another host: on a shared file system flock may not reach that host, so its process may still be writing;
  the lock is respected, and the message says how to release it by hand.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vascdist.errors import VascdistError

_LINE = re.compile(r"^pid (\d+) on (\S+) since ([\d: -]+?)(?:, SLURM job (\S+))?$")


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: the line written into the lock file."""
    pid: int
    host: str
    since: str
    job: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}" + (f", SLURM job {self.job}" if self.job else "")

    @staticmethod
    def me() -> "Holder":
        return Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"),
                      os.environ.get("SLURM_JOB_ID", ""))

    @staticmethod
    def parse(text: str) -> "Holder | None":
        match = _LINE.match(text.strip())
        return Holder(int(match.group(1)), match.group(2), match.group(3), match.group(4) or "") if match else None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


@contextmanager
def exclusive(lock: str | Path, busy: str, remedy: str, error: type[VascdistError] = VascdistError) -> Iterator[None]:
    """Hold `lock` (created if missing) until the block ends. Refused (`error`): "{busy} ({holder}, lock {lock});
    {remedy}" while another process holds it, and for a line left by a process on another host."""
    lock = Path(lock)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{busy} ({_read(fd) or 'unknown process'}, lock {lock}); {remedy}") from None
        me = Holder.me()
        left = Holder.parse(_read(fd))
        if left is not None and left.pid != me.pid:
            same_job = bool(left.job) and left.job == me.job  # a requeued SLURM job: its own earlier attempt
            if left.host != me.host and not same_job:
                raise error(f"{busy} ({left}, lock {lock}): a process on another host may still be writing it; "
                            f"if none runs there any more, remove {lock}; {remedy}")
            print(f"taking over {lock} from {left} (that process is gone)", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no claim (removing the file would race with a waiting process)
    finally:
        os.close(fd)  # releases the flock


def holder(lock: str | Path) -> Holder | None:
    """Who holds `lock` now (None: nobody, or no such file); for commands that only read what it guards."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Holder.parse(_read(fd)) or Holder(0, "unknown host", "unknown time")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
