"""Cost of the reader's per-chunk verification: `python -m vascdist.bench.chunkverify SHARDS [--repeats N]`.

Times steady epochs of the training StreamingLoader (as `vascdist bench loader` row 1 does) with the
verification on (x summed per chunk, right after its read, as the reader does; and per batch once the whole
window is read, as it did before), and with it switched off in this process only (the reader's checks replaced
by no-ops), interleaving the modes so that all see the same host load. Prints medians and their ratios to the
unverified rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vascdist.data import reader
from vascdist.data.loader import ShardStream, StreamingLoader


def _epoch(loader: StreamingLoader) -> float:
    t0 = time.perf_counter()
    n = sum(len(b["y"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vascdist.bench.chunkverify")
    p.add_argument("shards")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    check, check_x, read = reader.ChunkLayout.check, reader.WindowReader._check_x, reader.WindowReader.read
    modes = {"per chunk": (check, check_x, read), "per batch": (check, _no_check, _read_then_sum(read)),
             "off": (_no_check, _no_check, read)}
    for workers in a.workers:
        loader = StreamingLoader(ShardStream(a.shards, "train", a.batch), num_workers=workers)
        _epoch(loader)  # warm-up: buffers allocated, files in the page cache
        rates = {mode: [] for mode in modes}
        try:
            for _ in range(a.repeats):
                for mode, methods in modes.items():
                    reader.ChunkLayout.check, reader.WindowReader._check_x, reader.WindowReader.read = methods
                    rates[mode].append(_epoch(loader))
        finally:
            reader.ChunkLayout.check, reader.WindowReader._check_x, reader.WindowReader.read = check, check_x, read
        off = statistics.median(rates["off"])
        print(f"batch {a.batch} workers {workers}: unverified {off:,.0f} samples/s; " + "; ".join(
            f"verified {mode} {statistics.median(r):,.0f} samples/s, ratio {statistics.median(r) / off:.3f} "
            f"(cost {1 - statistics.median(r) / off:.1%})" for mode, r in rates.items() if mode != "off"))
        loader.close()
    return 0


def _no_check(*args) -> None:
    return None


def _read_then_sum(read):
    """The reader as it was before: x checked per batch after the whole window was read (out of cache)."""
    def read_then_sum(self, chunks, rows, cuts):
        xs, ints = read(self, chunks, rows, cuts)
        for x, lo, hi in zip(xs, cuts[:-1], cuts[1:]):
            if (reader.sample_sums(x.numpy()) != self.ints["x_sum"][rows[lo:hi]]).any():
                raise AssertionError("bench: a sample does not match its checksum")
        return xs, ints
    return read_then_sum


if __name__ == "__main__":
    raise SystemExit(main())
