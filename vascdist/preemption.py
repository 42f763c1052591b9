"""Preemption and time-limit signals, handled so that they cannot hang or corrupt a checkpoint.

The handler only records that a signal came (USR2 by default: SLURM's `--signal` and submitit use it, and
unlike SIGUSR1 it does not collide with NCCL; SIGTERM, sent at the time limit, is handled too). The
training loop polls `requested()` at every step boundary; all ranks agree on it with one collective, save
one checkpoint together, flush TensorBoard and return. Nothing heavy ever runs inside the handler.
"""

from __future__ import annotations

import signal
import sys

from vascdist.errors import ConfigError


def signal_number(name: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or '12' -> signal.SIGUSR2."""
    key = name.upper()
    if key.isdigit():
        return signal.Signals(int(key))
    try:
        return signal.Signals[key if key.startswith("SIG") else f"SIG{key}"]
    except KeyError:
        raise ConfigError(f"config key 'dist.requeue_signal': unknown signal '{name}'") from None


class StopSignals:
    """Installs flag-setting handlers for `names`; `requested()` tells whether one arrived.

    Use as a context manager: the previous handlers come back on exit.
    """

    def __init__(self, names: tuple[str, ...] = ("USR2", "TERM")):
        self.signals = sorted({signal_number(n) for n in names})
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            # one line, written with os-level safety in mind: print may be interrupted, but never blocks on a lock we hold
            sys.stderr.write(f"vascdist: received {self.received.name}; checkpointing at the next step boundary\n")

    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
