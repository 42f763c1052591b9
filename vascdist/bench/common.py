"""Shared pieces of the benchmarks: a process-tree memory sampler, tables, machine info, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch


class TreeMemory:
    """Samples the resident memory of this process and all its descendants (DataLoader or pool workers) in a thread.

    `peak_rss` sums RSS over the tree, which counts pages a forked worker shares with its parent twice (an
    upper bound); `peak_pss` sums PSS (shared pages split between sharers), the fair total. PSS comes from
    /proc/PID/smaps_rollup, whose page-table walk costs ~20 ms of CPU per GB resident, so it is read only
    every `pss_interval_s` (RSS every `interval_s`): sampled more often it slowed the measured training by 20 %.
    """

    def __init__(self, interval_s: float = 0.2, pss_interval_s: float = 1.0):
        self.interval_s, self.pss_interval_s = interval_s, pss_interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.timeline: list[tuple[float, int, int | None]] = []  # (perf_counter, tree RSS, tree PSS or None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, with_pss: bool = True) -> None:
        """Take one sample now (e.g. once loader workers are known to be alive)."""
        root = psutil.Process()
        procs = [root] + root.children(recursive=True)
        rss = pss = 0
        for p in procs:
            try:
                if with_pss:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                else:
                    rss += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                continue  # a worker that exited between listing and reading
        self.timeline.append((time.perf_counter(), rss, pss if with_pss else None))
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def _run(self) -> None:
        last_pss = -float("inf")
        while not self._stop.is_set():
            now = time.perf_counter()
            with_pss = now - last_pss >= self.pss_interval_s
            self.sample(with_pss=with_pss)
            last_pss = now if with_pss else last_pss
            self._stop.wait(self.interval_s)

    def peak_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(peak tree RSS, peak tree PSS) among the samples taken between perf_counter times t0 and t1."""
        inside = [(r, p) for t, r, p in self.timeline if t0 <= t <= t1]
        return max((r for r, _ in inside), default=0), max((p for _, p in inside if p is not None), default=0)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(with_pss=True)


def machine() -> dict:
    """CPU model, cores, GPU and library versions: the header of every BENCHMARKS.md section."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "date": datetime.date.today().isoformat(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def machine_line(info: dict | None = None) -> str:
    m = info or machine()
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, GPU {m['gpu']}, torch {m['torch']} "
            f"({m['threads']} threads); {m['date']}; 1-min load average at start {m['load_avg_1m']}")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A fixed-width text table (also valid Markdown). `columns`: (key, header); floats get 3 significant digits."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)
    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h) in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.rjust(w) for s, w in zip(items, widths)) + " |"
    out = [line([h for _, h in columns]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(c) for c in cells])


def write_json(path: str | Path | None, payload: dict) -> None:
    """Save a benchmark's raw results (when --json is given), with the machine it ran on."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine(), **payload}, indent=1, default=str))


def parse_ints(text: str) -> list[int]:
    """'64,256,1e3' -> [64, 256, 1000] (scientific notation accepted for sample counts)."""
    return [int(float(v)) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]
