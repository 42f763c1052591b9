"""Progress for people and for log files: a tqdm bar in a terminal, a plain line at a fixed interval otherwise.

Under a redirected stdout (every SLURM job, every `nohup`) a bar is a stream of carriage returns that log files
keep as one endless line; there a line such as

    train: step 120/600 (20%), epoch 2/6, loss 0.4213, 212 samples/s, ETA 0:03:10

is printed every `interval_s` seconds (0: every update), after the first update and at the end. The caller
calls `update()` once per unit of work (a step, a recording) with the values to show.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import IO


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressReporter:
    """One progress display of `total` units named `unit`, starting at `initial`.

    `rate_scale` and `rate_unit` turn units into the throughput shown (a training step of batch 64: 64, 'samples').
    `enabled=False` shows nothing; `tty=None` asks the stream whether it is a terminal.
    """

    def __init__(self, name: str, total: int, initial: int = 0, unit: str = "step", enabled: bool = True,
                 interval_s: float = 30.0, rate_scale: float = 1.0, rate_unit: str | None = None,
                 tty: bool | None = None, stream: IO[str] | None = None):
        self.name, self.total, self.done, self.unit = name, total, initial, unit
        self.enabled, self.interval_s = enabled, interval_s
        self.rate_scale, self.rate_unit = rate_scale, rate_unit or f"{unit}s"
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.fields: dict[str, str] = {}
        self._start, self._start_done = time.perf_counter(), initial
        self._last_line: float | None = None  # when the last plain line was printed
        self._printed_done: int | None = None  # and at which count
        self._closed = False
        self._bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=name, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **fields: object) -> None:
        """`n` more units done; `fields` (e.g. epoch='2/6', loss=0.42) are shown from now on."""
        self.done += n
        self.fields.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in fields.items()})
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix(self.fields, refresh=False)
            return
        now = time.perf_counter()
        if self._last_line is None or now - self._last_line >= self.interval_s:
            self._print(now)

    def line(self, now: float | None = None) -> str:
        """The plain progress line as of now."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        units_per_s = (self.done - self._start_done) / elapsed
        parts = [f"{self.unit} {self.done}/{self.total}" + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        rate = units_per_s * self.rate_scale
        parts.append(f"{rate:.0f} {self.rate_unit}/s" if rate >= 100 else f"{rate:.3g} {self.rate_unit}/s")
        if units_per_s > 0 and self.total:
            parts.append(f"ETA {_eta(max(self.total - self.done, 0) / units_per_s)}")
        return f"{self.name}: " + ", ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last_line, self._printed_done = now, self.done

    def close(self) -> None:
        """Close the bar, or print the final line (unless the last one printed is already up to date)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done != self._start_done and self._printed_done != self.done:
            self._print(time.perf_counter())

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
