"""`vascdist bench make-shards`: shards of random spectrograms in the real schema, without the audio pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np

from vascdist.config import PreprocessConfig
from vascdist.data.outdir import building_shard_set
from vascdist.data.shards import SCHEMA_VERSION, ShardSetWriter
from vascdist.errors import DataError

SAMPLE_SHAPE = (1, 40, 100)  # the default 1 x n_mels x n_frames
BYTES_PER_SAMPLE = int(np.prod(SAMPLE_SHAPE)) * 2 + 4 * 8  # float16 x plus y, patient, recording, cycle (int64)
CYCLES_PER_RECORDING = 100  # keeps index.json small (one recording entry per 100 samples)
RECORDINGS_PER_PATIENT = 4
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def check_disk(out: Path, samples: int, margin_gb: float = 2.0) -> None:
    """Refuse (DataError) when the shards would not fit on the disk with `margin_gb` to spare."""
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free
    need = samples * BYTES_PER_SAMPLE * 1.02 + margin_gb * 2**30
    if need > free:
        raise DataError(f"{out}: {samples:,} samples need {need / 2**30:.1f} GiB with margin but only "
                        f"{free / 2**30:.1f} GiB are free; choose a smaller --samples")


def samples_for_steps(batch: int, steps: int) -> int:
    """Samples for one epoch of `steps` training steps at `batch` (80 % are the train split; 4 steps spare), and
    at least enough that validation and test each hold two patients, so both classes (labels alternate by
    patient): `vascdist train` refuses a split whose metrics are undefined."""
    val_fraction = dict(SPLIT_FRACTIONS)["val"]
    two_patients = math.ceil((RECORDINGS_PER_PATIENT * CYCLES_PER_RECORDING + 1) / val_fraction)
    return max(math.ceil(batch * (steps + 4) / dict(SPLIT_FRACTIONS)["train"]) + 20, two_patients)


def split_sizes(samples: int) -> dict[str, int]:
    """Samples per split: 80/10/10, the rounding remainder to train."""
    sizes = {s: int(samples * f) for s, f in SPLIT_FRACTIONS}
    sizes["train"] += samples - sum(sizes.values())
    return sizes


def make_shards(out_dir: str | Path, samples: int, seed: int = 0, shard_size: int = 8192, chunk_size: int = 256,
                block: int = 2048, overwrite: bool = True) -> dict:
    """Write `samples` random log-mel-like spectrograms (float16, about -40 +- 10 dB) as a finished shard set.

    Splits are 80/10/10 by patient (no leakage: `vascdist shards verify` passes); labels alternate per
    patient. Returns the index written to out_dir/index.json.
    """
    if samples < 10:
        raise DataError(f"make-shards: --samples must be >= 10, got {samples}")
    out = Path(out_dir)
    check_disk(out, samples)
    with building_shard_set(out_dir, "spectrogram", SCHEMA_VERSION, overwrite, full_check=False) as out:
        cfg = PreprocessConfig(shard_size=shard_size, chunk_size=chunk_size)
        writer = ShardSetWriter(out, "spectrogram", SAMPLE_SHAPE, cfg.classes, dataclasses.asdict(cfg), shard_size,
                                chunk_size, manifest_sha256="bench-random", norm_axis=1)
        rng = np.random.default_rng(seed)
        recordings: list[dict] = []
        first_rec = first_patient = 0  # ids where the current split starts; every split has its own patients
        for split, n in split_sizes(samples).items():
            for lo in range(0, n, block):
                local = np.arange(lo, min(lo + block, n))  # sample index within the split
                rec = local // CYCLES_PER_RECORDING  # recording within the split
                patient = first_patient + rec // RECORDINGS_PER_PATIENT
                x = rng.standard_normal((len(local), *SAMPLE_SHAPE), dtype=np.float32) * 10.0 - 40.0
                writer.add(split, {"x": x.astype(np.float16), "y": patient % 2, "patient": patient,
                                   "recording": first_rec + rec, "cycle": local % CYCLES_PER_RECORDING})
            n_rec = -(-n // CYCLES_PER_RECORDING)
            for r in range(n_rec):
                p = first_patient + r // RECORDINGS_PER_PATIENT
                recordings.append({"id": f"r{first_rec + r:07d}", "patient": f"bench{p:06d}", "path": "",
                                   "label": p % 2, "split": split,
                                   "cycles": min(CYCLES_PER_RECORDING, n - r * CYCLES_PER_RECORDING)})
            first_rec += n_rec
            first_patient += -(-n_rec // RECORDINGS_PER_PATIENT)
        patients = [f"bench{p:06d}" for p in range(first_patient)]
        return writer.finish(patients, recordings)


def add_parser(sub) -> None:
    p = sub.add_parser("make-shards", help="write shards of random spectrograms (real schema, no audio pipeline)")
    p.add_argument("--samples", required=True, type=float, help="total samples (80/10/10 train/val/test), e.g. 1e5")
    p.add_argument("--out", required=True, help="shards directory (replaced if it holds a shard set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=256)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    index = make_shards(a.out, int(a.samples), a.seed, a.shard_size, a.chunk_size)
    size = sum((Path(a.out) / e["file"]).stat().st_size for e in index["shards"])
    print(f"wrote {len(index['shards'])} shards ({size / 1e9:.2f} GB) to {a.out} in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{s}={c['samples']}" for s, c in index["splits"].items()))
    return 0
