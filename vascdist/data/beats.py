"""Per-beat 1-D signals in the MIT-BIH heartbeat CSV layout -> shards with x [N, 1, L].

Each CSV row holds the samples of one beat, the last column its class: an index 0-4 or a letter of the
AAMI classes N (normal), S (supraventricular ectopic), V (ventricular ectopic), F (fusion), Q (unknown).
The layout carries no patient or record ids, so every beat is its own recording and patient and the split
is stratified per beat; metrics for such shards are reported per beat only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vascdist.config import PreprocessConfig
from vascdist.data.manifest import file_sha256
from vascdist.data.outdir import building_shard_set
from vascdist.data.shards import SCHEMA_VERSION, ShardSetWriter
from vascdist.errors import DataError

BEAT_CLASSES = ["N", "S", "V", "F", "Q"]


def read_beats_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (beats [N, L] float32, labels [N] int64); a malformed row is a DataError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: beats CSV not found")
    beats, labels = [], []
    width = None
    with open(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            fields = line.strip().split(",")
            if not line.strip():
                continue
            if width is None:
                width = len(fields)
                if width < 3:
                    raise DataError(f"{path}:{line_no}: a beat row needs samples and a class column")
            if len(fields) != width:
                raise DataError(f"{path}:{line_no}: {len(fields)} columns, the first row has {width}")
            raw = fields[-1].strip()
            if raw.upper() in BEAT_CLASSES:
                label = BEAT_CLASSES.index(raw.upper())
            else:
                try:
                    value = float(raw)
                except ValueError:
                    raise DataError(f"{path}:{line_no}: class '{raw}' is not one of {', '.join(BEAT_CLASSES)} or 0-4") from None
                if value != int(value) or not 0 <= value < len(BEAT_CLASSES):
                    raise DataError(f"{path}:{line_no}: class '{raw}' is not one of 0-4")
                label = int(value)
            try:
                beats.append(np.array(fields[:-1], dtype=np.float32))
            except ValueError:
                raise DataError(f"{path}:{line_no}: non-numeric sample value") from None
            labels.append(label)
    if not beats:
        raise DataError(f"{path}: no beats")
    return np.stack(beats), np.array(labels, np.int64)


def preprocess_beats(csv_path: str | Path, out_dir: str | Path, cfg: PreprocessConfig, overwrite: bool = False) -> dict:
    """Write shards of beats with a stratified split per beat (seeded by cfg.split.seed)."""
    beats, labels = read_beats_csv(csv_path)
    with building_shard_set(out_dir, "beats", SCHEMA_VERSION, overwrite) as out:
        rng = np.random.default_rng([cfg.split.seed, 1])
        split_of = np.empty(len(labels), dtype=object)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)[rng.permutation(int((labels == label).sum()))]
            n_test = int(round(cfg.split.test_fraction * len(rows)))
            n_val = int(round(cfg.split.val_fraction * len(rows)))
            split_of[rows[:n_test]] = "test"
            split_of[rows[n_test:n_test + n_val]] = "val"
            split_of[rows[n_test + n_val:]] = "train"
        writer = ShardSetWriter(out, "beats", (1, beats.shape[1]), BEAT_CLASSES, dataclasses.asdict(cfg),
                                cfg.shard_size, cfg.chunk_size, file_sha256(csv_path), norm_axis=-1)
        for split in ("train", "val", "test"):
            rows = np.flatnonzero(split_of == split)
            writer.add(split, {"x": beats[rows, None, :].astype(np.float16), "y": labels[rows],
                               "patient": rows.astype(np.int64), "recording": rows.astype(np.int64),
                               "cycle": np.zeros(len(rows), np.int64)})
        return writer.finish([], [])
