"""`python -m vascdist.bench.highrate FILE write|read`: write a 10-minute 192 kHz 24-bit mono WAV, or time
load_audio_stats on it and report its peak RSS (run each read in a fresh process: the peak is the process's)."""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

RATE, SECONDS = 192000, 600


def write(path: str) -> None:
    """0.1-RMS white noise, PCM_24, written a block at a time (the file is 345 MB)."""
    import soundfile as sf
    n = RATE * SECONDS
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_24") as fh:
        for i in range(0, n, 1 << 20):
            fh.write(0.1 * rng.standard_normal(min(1 << 20, n - i)))


def read(path: str) -> str:
    """One timed load_audio_stats (resampled to the config's rate) and this process's peak RSS."""
    from vascdist.config import AudioConfig
    from vascdist.data.audio import load_audio_stats
    cfg = AudioConfig()
    t0 = time.perf_counter()
    x, _ = load_audio_stats(path, cfg)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"samples out {len(x)} ({len(x) / cfg.sample_rate:.0f} s at {cfg.sample_rate / 1000:g} kHz), "
            f"{seconds:.1f} s, peak RSS {peak_mib:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vascdist.bench.highrate", description=__doc__)
    p.add_argument("file")
    p.add_argument("action", choices=["write", "read"])
    a = p.parse_args(argv)
    if a.action == "write":
        write(a.file)
    else:
        print(read(a.file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
