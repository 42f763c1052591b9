"""`vascdist bench loader`: the streaming loader against a naive HDF5 loader, the contiguous-read limit and memory.

Every cell is measured `--repeats` times; within one repeat the contiguous read, the streaming loader and the
naive loader run back to back, so the ratios of a repeat share the machine's load of that moment. The table
shows medians of rates and medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import bisect
import os
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vascdist.bench.common import machine_line, parse_ints, table, write_json
from vascdist.data.dataloader import WorkerLoader
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.shards import load_index
from vascdist.data.transform import InputTransform


def train_files(shards_dir: Path) -> tuple[list[Path], int, int]:
    """(train shard paths, train samples, their bytes on disk)."""
    index = load_index(shards_dir)
    entries = [e for e in index["shards"] if e["split"] == "train"]
    paths = [shards_dir / e["file"] for e in entries]
    return paths, sum(e["samples"] for e in entries), sum(p.stat().st_size for p in paths)


# ------------------------------------------------------------------------------------------- 1. streaming
def stream_rate(shards_dir: Path, batch: int, workers: int, max_samples: int, normalise: bool,
                kind: str = "threads") -> tuple[int, float]:
    """(samples, seconds) of the second epoch of the training loader (as every epoch after the first sees it:
    files open, buffers allocated), reader threads started inside.

    normalise=False: the float16 batches the loader hands to the device (on a GPU host, training normalises
    there); True: plus the normalisation to float32 on this CPU, as CPU training does it. kind: 'threads'
    (StreamingLoader, `workers` reader threads) or 'dataloader' (WorkerLoader: a stock torch DataLoader with
    `workers` persistent worker processes, started in the warm-up epoch).
    """
    stream = ShardStream(shards_dir, "train", batch, seed=0, train=True)
    loader = StreamingLoader(stream, threads=workers) if kind == "threads" else WorkerLoader(stream, workers=workers)
    inputs = InputTransform(loader.stream.index) if normalise else None
    for i, _ in enumerate(loader):  # epoch 0: warm-up
        if max_samples and (i + 1) * batch >= max_samples:
            break
    loader.set_epoch(1)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        if inputs is not None:
            inputs(b["x"])
        n += len(b["y"])
        if max_samples and n >= max_samples:
            break
    seconds = time.perf_counter() - t0
    loader.close()
    return n, seconds


# ------------------------------------------------------------------------------------------- 2. naive
class NaiveH5Dataset(Dataset):
    """What users write first: one HDF5 index per sample (handle opened lazily per process), normalised."""

    def __init__(self, shards_dir: Path):
        index = load_index(shards_dir)
        entries = [e for e in index["shards"] if e["split"] == "train"]
        self.paths = [str(shards_dir / e["file"]) for e in entries]
        self.starts = list(np.cumsum([0] + [e["samples"] for e in entries]))
        norm = index["normalization"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).reshape(1, -1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).reshape(1, -1, 1)
        self.handles: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        f = bisect.bisect_right(self.starts, i) - 1
        if f not in self.handles:
            self.handles[f] = h5py.File(self.paths[f], "r")
        h, row = self.handles[f], i - self.starts[f]
        x = torch.from_numpy(h["x"][row].astype(np.float32))
        return (x - self.mean) / self.std, int(h["y"][row])


def naive_rate(shards_dir: Path, batch: int, workers: int, max_samples: int) -> tuple[int, float]:
    """(samples, seconds) after its first batch (worker start-up excluded)."""
    loader = DataLoader(NaiveH5Dataset(shards_dir), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    n, t0 = 0, None
    for x, y in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(y)
        if max_samples and n >= max_samples:
            break
    return n, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- 3. the limit
def contiguous_read(paths: list[Path], buffer: np.ndarray) -> float:
    """Seconds to read every file whole, one readinto per file, into the preallocated `buffer`."""
    view, offset = memoryview(buffer), 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            while size:  # readinto may return less than asked for
                got = fh.readinto(view[offset:offset + size])
                offset, size = offset + got, size - got
    return time.perf_counter() - t0


def evict(paths: list[Path], global_drop: bool) -> str:
    """Drop the files from the page cache: the global drop_caches (root) or posix_fadvise DONTNEED per file."""
    if global_drop:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "echo 3 > /proc/sys/vm/drop_caches (permitted)"
        except OSError as exc:
            note = f"drop_caches refused ({exc.strerror}); "
    else:
        note = ""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return note + "posix_fadvise(DONTNEED) per shard file"


# ------------------------------------------------------------------------------------------- 4. in memory
def memory_rate(x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[int, float]:
    """A shuffled pass over tensors already in RAM (gather per batch, as a TensorDataset loader would)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n, t0 = 0, time.perf_counter()
    for i in range(0, len(x) - batch + 1, batch):
        idx = perm[i:i + batch]
        xb, yb = x[idx], y[idx]
        n += len(yb)
    return n, time.perf_counter() - t0


def load_in_memory(shards_dir: Path, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_samples` train samples, normalised float32, as one tensor."""
    loader = StreamingLoader(ShardStream(shards_dir, "train", 256, seed=0, train=False), threads=0)
    inputs = InputTransform(loader.stream.index)
    xs, ys, n = [], [], 0
    for b in loader:
        xs.append(inputs(b["x"])), ys.append(b["y"])
        n += len(b["y"])
        if n >= max_samples:
            break
    return torch.cat(xs)[:max_samples].contiguous(), torch.cat(ys)[:max_samples]


# ------------------------------------------------------------------------------------------- the benchmark
def bench_loader(shards_dir: Path, batches: list[int], workers: list[int], repeats: int, max_samples: int,
                 naive_samples: int, memory_samples: int, drop_caches: bool) -> dict:
    paths, n_train, n_bytes = train_files(shards_dir)
    per_sample = n_bytes / n_train  # bytes on disk per sample (float16 x plus four int64 fields, HDF5 overhead)
    buffer = np.empty(n_bytes, np.uint8)
    buffer[::4096] = 0  # touch every page now, so the timed reads do not also pay for page faults

    eviction = evict(paths, drop_caches)
    cold_s = contiguous_read(paths, buffer)
    contiguous_read(paths, buffer)  # warm the page cache for everything below

    x_mem, y_mem = load_in_memory(shards_dir, memory_samples)
    rows = []
    for b in batches:
        mem = statistics.median(n / s for n, s in (memory_rate(x_mem, y_mem, b) for _ in range(repeats)))
        rows.append({"loader": "4. in-memory tensor", "batch": b, "workers": "-", "samples_s": mem,
                     "mb_s": mem * per_sample / 1e6})
        for w in workers:
            runs = []
            for _ in range(repeats):
                limit = n_train / contiguous_read(paths, buffer)
                sn, ss = stream_rate(shards_dir, b, w, max_samples, normalise=False)
                cn, cs = stream_rate(shards_dir, b, w, max_samples, normalise=True)
                dn, ds = stream_rate(shards_dir, b, w, max_samples, normalise=False, kind="dataloader")
                nn, ns = naive_rate(shards_dir, b, w, naive_samples)
                runs.append({"limit": limit, "stream": sn / ss, "cpu": cn / cs, "dl": dn / ds, "naive": nn / ns,
                             "r_limit": sn / ss / limit, "r_naive": (sn / ss) / (nn / ns),
                             "c_limit": cn / cs / limit, "c_naive": (cn / cs) / (nn / ns),
                             "d_limit": dn / ds / limit, "d_naive": (dn / ds) / (nn / ns)})
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"loader": "1. vascdist streaming", "batch": b, "workers": w, "samples_s": med["stream"],
                         "mb_s": med["stream"] * per_sample / 1e6, "vs_limit": med["r_limit"], "vs_naive": med["r_naive"],
                         "limit_s": med["limit"]})
            rows.append({"loader": "1b. + normalise on CPU", "batch": b, "workers": w, "samples_s": med["cpu"],
                         "mb_s": med["cpu"] * per_sample / 1e6, "vs_limit": med["c_limit"], "vs_naive": med["c_naive"]})
            rows.append({"loader": "1c. vascdist DataLoader", "batch": b, "workers": w, "samples_s": med["dl"],
                         "mb_s": med["dl"] * per_sample / 1e6, "vs_limit": med["d_limit"], "vs_naive": med["d_naive"]})
            rows.append({"loader": "2. naive map-style", "batch": b, "workers": w, "samples_s": med["naive"],
                         "mb_s": med["naive"] * per_sample / 1e6})
    warm = statistics.median(r["limit_s"] for r in rows if "limit_s" in r)
    return {"rows": rows, "train_samples": n_train, "bytes": n_bytes, "bytes_per_sample": per_sample,
            "limit_warm_samples_s": warm, "limit_cold_samples_s": n_train / cold_s, "eviction": eviction,
            "repeats": repeats}


def format_loader(result: dict) -> str:
    per = result["bytes_per_sample"]
    warm, cold = result["limit_warm_samples_s"], result["limit_cold_samples_s"]
    rows = result["rows"] + [
        {"loader": "3. contiguous read, page cache", "batch": "-", "workers": "-", "samples_s": warm, "mb_s": warm * per / 1e6},
        {"loader": "3. contiguous read, cold", "batch": "-", "workers": "-", "samples_s": cold, "mb_s": cold * per / 1e6}]
    text = table(rows, [("loader", "loader"), ("batch", "batch"), ("workers", "workers"), ("samples_s", "samples/s"),
                        ("mb_s", "MB/s"), ("vs_limit", "1/3 (same repeat)"), ("vs_naive", "1/2 (same repeat)")])
    lines = [text, "",
             f"{result['train_samples']:,} train samples, {result['bytes'] / 1e6:.0f} MB on disk ({per:.0f} B/sample; "
             f"MB/s = samples/s x that); medians of {result['repeats']} repeats; cold read after {result['eviction']}"]
    for r in result["rows"]:
        if r["loader"][:2] in ("1.", "1c") and r["batch"] == 256 and r["workers"] == 2:
            ok = r["vs_limit"] >= 0.5 and r["vs_naive"] >= 20
            lines.append(f"target at batch 256, 2 workers: >= 0.5 of the limit and >= 20x naive -> {r['loader']}: "
                         f"{r['vs_limit']:.2f} and {r['vs_naive']:.1f}x: {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("loader", help="streaming loader (threads, DataLoader) vs naive loader vs contiguous read vs in-memory tensor")
    p.add_argument("--shards", required=True, help="shards directory (`vascdist bench make-shards` writes one)")
    p.add_argument("--batch-sizes", default="64,256,1024", help="comma-separated (default: %(default)s)")
    p.add_argument("--workers", default="0,1,2",
                   help="comma-separated worker counts: reader threads of the streaming loader, DataLoader processes "
                        "of vascdist's DataLoader path and of the naive one (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per cell; the table shows medians (default: %(default)s)")
    p.add_argument("--max-samples", type=float, default=0, help="stop the streaming epoch after this many (0: whole)")
    p.add_argument("--naive-samples", type=float, default=20000, help="samples the naive loader reads per repeat")
    p.add_argument("--memory-samples", type=float, default=32768, help="samples held in the in-memory tensor")
    p.add_argument("--drop-caches", action="store_true",
                   help="cold read after `echo 3 > /proc/sys/vm/drop_caches` (root; affects the whole machine) "
                        "instead of posix_fadvise on the shard files")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    result = bench_loader(Path(a.shards), parse_ints(a.batch_sizes), parse_ints(a.workers), a.repeats,
                          int(a.max_samples), int(a.naive_samples), int(a.memory_samples), a.drop_caches)
    print(format_loader(result))
    write_json(a.json, result)
    return 0
