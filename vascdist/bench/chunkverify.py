"""Cost of the reader's per-chunk verification: `python -m vascdist.bench.chunkverify SHARDS [--repeats N]`.

Times steady epochs of the training StreamingLoader (as `vascdist bench loader` row 1 does) with the
verification on, and with it switched off in this process only (the reader's checks replaced by no-ops),
alternating the two so that both see the same host load. Prints medians and their ratio.
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
    p.add_argument("--threads", type=int, nargs="+", default=[0, 2], help="reader threads (data.reader_threads)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    check, sums = reader.ChunkLayout.check, reader.sample_sums
    for threads in a.threads:
        loader = StreamingLoader(ShardStream(a.shards, "train", a.batch), threads=threads)
        _epoch(loader)  # warm-up: buffers allocated, files in the page cache
        rates = {"on": [], "off": []}
        for _ in range(a.repeats):
            for mode in ("on", "off"):
                if mode == "off":
                    reader.ChunkLayout.check = lambda *args: None
                    reader.sample_sums = _stored_sums
                rates[mode].append(_epoch(loader))
                reader.ChunkLayout.check, reader.sample_sums = check, sums
        on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
        print(f"batch {a.batch} reader threads {threads}: verified {on:,.0f} samples/s, unverified {off:,.0f} samples/s, "
              f"ratio {on / off:.3f} (cost {1 - on / off:.1%})")
        loader.close()
    return 0


class _Same(np.ndarray):
    """Compares equal to anything: the unverified run skips the sums without changing the reader's code."""

    def __ne__(self, other):
        return np.zeros(len(self), bool)


def _stored_sums(x: np.ndarray) -> np.ndarray:
    return np.empty(len(x), np.int64).view(_Same)


if __name__ == "__main__":
    raise SystemExit(main())
