"""Writing sharded HDF5 sets (one split per shard, atomic writes, index.json written last and sealed), and the
`info` and `verify` commands. The format itself (fields, checksums, the sealed index) is
vascdist.data.shard_format.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

import vascdist
from vascdist.data.integrity import check_shard_set
from vascdist.data.quality import quality_range
from vascdist.data.shard_format import (FIELDS, INDEX, SCHEMA_VERSION, chunk_crcs, data_checksum, load_index,
                                        read_shard, sample_sums, seal_index, shard_name)
from vascdist.errors import DataError
from vascdist.fileio import atomic_write, atomic_write_text, disk_full, disk_full_message


def write_shard(path: Path, arrays: dict[str, np.ndarray], attrs: dict, chunk_size: int) -> dict:
    """Write one shard atomically (temp file, fsync, rename). Returns its index entry.

    The HDF5 file is built in memory and written with one plain write: HDF5 failing to write its own file
    (a full disk) left a file it then crashed closing (a segmentation fault); a failed plain write is an
    OSError like any other, and the temp file goes.
    """
    checksum = data_checksum(arrays)
    n = len(arrays["y"])
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name in FIELDS:
            data = arrays[name]
            chunks = (min(chunk_size, n),) + data.shape[1:] if n else None
            f.create_dataset(name, data=data, chunks=chunks)
        sums = sample_sums(arrays["x"])
        f.create_dataset("x_sum", data=sums, chunks=(min(chunk_size, n),) if n else None)
        f.create_dataset("chunk_crc32", data=chunk_crcs({**arrays, "x_sum": sums}, chunk_size))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["checksum"] = checksum
    image = buffer.getbuffer()
    try:
        atomic_write(path, lambda fh: fh.write(image))
    except OSError as exc:
        if disk_full(exc):
            raise DataError(disk_full_message(path, len(image))) from None
        raise
    labels = Counter(int(v) for v in arrays["y"])
    return {"file": path.name, "split": attrs["split"], "samples": n, "bytes": len(image),
            "sha256": hashlib.sha256(image).hexdigest(), "checksum": checksum,
            "labels": {str(k): v for k, v in sorted(labels.items())}}


class ShardSetWriter:
    """Buffers samples per split and writes `shard_size`-sample shards; keeps train-split sums for normalisation.

    `finish()` flushes the rest and writes index.json last, so a directory without index.json is an
    interrupted run. `abort()` removes everything this writer put in the directory.
    """

    def __init__(self, out_dir: Path, kind: str, sample_shape: tuple[int, ...], classes: list[str],
                 preprocess: dict, shard_size: int, chunk_size: int, manifest_sha256: str, norm_axis: int):
        self.out_dir, self.kind, self.sample_shape = out_dir, kind, tuple(sample_shape)
        self.classes, self.preprocess = classes, preprocess
        self.shard_size, self.chunk_size = shard_size, chunk_size
        self.manifest_sha256 = manifest_sha256
        self.norm_axis = norm_axis  # axis of sample_shape that gets its own mean/std (mel band for spectrograms)
        self.buffers: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "val": [], "test": []}
        self.buffered = Counter()
        self.entries: list[dict] = []
        n_stats = sample_shape[norm_axis] if norm_axis >= 0 else 1
        self.sum = np.zeros(n_stats, np.float64)
        self.sumsq = np.zeros(n_stats, np.float64)
        self.count = 0
        self.written: list[Path] = []

    def add(self, split: str, arrays: dict[str, np.ndarray]) -> None:
        """Add a block of samples (all FIELDS, same length) to `split`."""
        if split == "train" and len(arrays["y"]):
            x = arrays["x"].astype(np.float64)
            axes = tuple(i for i in range(x.ndim) if i != 1 + self.norm_axis) if self.norm_axis >= 0 else None
            self.sum += x.sum(axis=axes)
            self.sumsq += (x * x).sum(axis=axes)
            self.count += x.size // len(self.sum)
        self.buffers[split].append(arrays)
        self.buffered[split] += len(arrays["y"])
        while self.buffered[split] >= self.shard_size:
            self._flush(split, self.shard_size)

    def _flush(self, split: str, n: int) -> None:
        merged = {k: np.concatenate([b[k] for b in self.buffers[split]]) for k in FIELDS}
        head = {k: v[:n] for k, v in merged.items()}
        rest = {k: v[n:] for k, v in merged.items()}
        self.buffers[split] = [rest] if len(rest["y"]) else []
        self.buffered[split] -= n
        path = self.out_dir / shard_name(len(self.entries))
        attrs = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "split": split,
                 "preprocess": json.dumps(self.preprocess), "package_version": vascdist.__version__,
                 "manifest_sha256": self.manifest_sha256, "classes": json.dumps(self.classes)}
        self.written.append(path)
        self.entries.append(write_shard(path, head, attrs, self.chunk_size))

    def finish(self, patients: list[str], recordings: list[dict], excluded: list[dict] = ()) -> dict:
        """Flush, then write index.json; `excluded`: recordings left out ({id, patient, path, label, split,
        reason}), counted per split and label so that no exclusion is silent."""
        for split in self.buffers:
            if self.buffered[split]:
                self._flush(split, self.buffered[split])
        if self.count == 0:
            raise DataError(f"{self.out_dir}: the train split is empty; add patients or lower the val/test fractions")
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean * mean, 1e-12))
        splits = {}
        for split in ("train", "val", "test"):
            entries = [e for e in self.entries if e["split"] == split]
            labels = Counter()
            for e in entries:
                labels.update({int(k): v for k, v in e["labels"].items()})
            recs = [r for r in recordings if r["split"] == split]
            left_out = Counter(r["label"] for r in excluded if r["split"] == split)
            splits[split] = {"samples": sum(e["samples"] for e in entries),
                             "labels": {self.classes[k]: labels.get(k, 0) for k in range(len(self.classes))},
                             "patients": len({r["patient"] for r in recs}), "recordings": len(recs),
                             "excluded": {self.classes[k]: left_out.get(k, 0) for k in range(len(self.classes))}}
        index = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "sample_shape": list(self.sample_shape),
                 "classes": self.classes, "package_version": vascdist.__version__,
                 "manifest_sha256": self.manifest_sha256, "preprocess": self.preprocess,
                 "normalization": {"axis": self.norm_axis, "mean": mean.tolist(), "std": std.tolist(),
                                   "fitted_on": "train"},
                 "shards": self.entries, "splits": splits, "patients": patients, "recordings": recordings,
                 "excluded": list(excluded),
                 "quality_range": quality_range([r["quality"] for r in recordings
                                                 if r["split"] == "train" and "quality" in r])}
        text = json.dumps(seal_index(index), indent=1)
        try:
            atomic_write_text(self.out_dir / INDEX, text)
        except OSError as exc:
            if disk_full(exc):
                raise DataError(disk_full_message(self.out_dir / INDEX, len(text))) from None
            raise
        return index

    def abort(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)
        for tmp in self.out_dir.glob(".shard-*.h5*.tmp"):
            tmp.unlink(missing_ok=True)


def verify_files(shards_dir: str | Path) -> dict:
    """The start-up check of training and evaluation: index.json, file sizes and headers (integrity's quick check)."""
    return check_shard_set(shards_dir)


def verify(shards_dir: str | Path) -> dict:
    """`shards verify`: the quick check plus every file's sha256, every data checksum and patient leakage."""
    return check_shard_set(shards_dir, full=True)


def excluded_counts(index: dict, split: str) -> dict:
    """Metrics-JSON entries for what `split` lost in preprocessing: excluded recordings and the patients left
    with none, their counts per class, and every reason.

    With a split file (data.folds.split_index: 'split_patients') the split is its patient list, so a fold
    counts the excluded recordings of its own patients; a patient with every recording excluded is in no fold."""
    if "split_patients" in index:
        members = set(index["split_patients"][split])
        gone = [r for r in index.get("excluded", []) if r["patient"] in members]
        kept_patients = {r["patient"] for r in index["recordings"] if r["patient"] in members}
    else:
        gone = [r for r in index.get("excluded", []) if r["split"] == split]
        kept_patients = {r["patient"] for r in index["recordings"] if r["split"] == split}
    classes = index["classes"]
    return {"recording/excluded": len(gone),
            "patient/excluded": len({r["patient"] for r in gone} - kept_patients),
            "excluded_per_class": {c: sum(r["label"] == k for r in gone) for k, c in enumerate(classes)},
            "excluded_recordings": [{"id": r["id"], "label": classes[r["label"]], "reason": r["reason"]} for r in gone]}


def site_summary(index: dict) -> str:
    """'per site: training-a 409 kept / 0 excluded, training-b 487 / 3 (aperiodic: 2, ...)'; '' without sites."""
    kept = Counter(r.get("site", "") for r in index.get("recordings", []))
    gone = Counter(r.get("site", "") for r in index.get("excluded", []))
    if not any(kept) and not any(gone):
        return ""
    parts = []
    for site in sorted(set(kept) | set(gone)):
        reasons = Counter(_reason_kind(r["reason"]) for r in index.get("excluded", []) if r.get("site", "") == site)
        why = f" ({'; '.join(f'{n}x {k}' for k, n in reasons.most_common(3))})" if reasons else ""
        parts.append(f"{site or '(no site)'}: {kept[site]} kept, {gone[site]} excluded{why}")
    return "recordings per site: " + ", ".join(parts)


def excluded_summary(index: dict, shards_dir: str | Path) -> str:
    """preprocess --skip-bad's console lines: how many recordings were left out, and why (counted per reason)."""
    excluded = index.get("excluded", [])
    total = len(excluded) + len(index.get("recordings", []))
    reasons = Counter(_reason_kind(r["reason"]) for r in excluded)
    return "\n".join([f"vascdist preprocess: skipped {len(excluded)} of {total} recordings (listed in "
                      f"{Path(shards_dir) / 'skipped.csv'}):"] + [f"  {n:>5}  {reason}" for reason, n in reasons.most_common()])


def _reason_kind(reason: str) -> str:
    """An exclusion reason without the file path in front (so that equal reasons are counted together)."""
    head, sep, tail = reason.partition(": ")
    return tail if sep and ("/" in head or head.endswith((".wav", ".flac"))) else reason


def info(shards_dir: str | Path) -> str:
    """Human-readable summary: counts per split / label / patient and the preprocessing parameters."""
    root = Path(shards_dir)
    index = load_index(root)
    lines = [f"{root}: {len(index['shards'])} shards, kind {index['kind']}, sample shape {index['sample_shape']}, "
             f"schema {index['schema_version']}, vascdist {index['package_version']}",
             f"classes: {', '.join(index['classes'])}", "",
             f"{'split':<6} {'samples':>8} {'patients':>8} {'recordings':>10}  per label"]
    for split, c in index["splits"].items():
        labels = "  ".join(f"{k}={v}" for k, v in c["labels"].items())
        lines.append(f"{split:<6} {c['samples']:>8} {c['patients']:>8} {c['recordings']:>10}  {labels}")
    from vascdist.config.schema import EvalConfig
    from vascdist.data.splits import split_problems
    for problem in split_problems(index, EvalConfig().min_patients_per_class):
        lines.append(f"{'PROBLEM' if problem.fatal else 'warning'}: {problem.text}"
                     + ("; `vascdist train` refuses this set" if problem.fatal else ""))
    excluded = index.get("excluded", [])
    lines.append(f"\nexcluded recordings: {len(excluded)}" + ("" if not excluded else "  (" + "; ".join(
        f"{split}: " + ", ".join(f"{k}={v}" for k, v in c.get("excluded", {}).items())
        for split, c in index["splits"].items()) + ")"))
    reasons = Counter(_reason_kind(r["reason"]) for r in excluded)
    lines += [f"  {n:>5}  {reason}" for reason, n in reasons.most_common()]
    if site_summary(index):
        lines.append(site_summary(index))
    ranges = index.get("quality_range", {})
    if ranges:
        lines.append("quality of the train recordings: " + ", ".join(
            f"{name} {lo:g}..{hi:g}" for name, (lo, hi) in ranges.items()))
    aperiodic = [r for r in index["recordings"] if not r.get("quality", {}).get("periodic", True)]
    if aperiodic:
        lines.append(f"aperiodic recordings cut into fixed windows: {len(aperiodic)}")
    per_patient = Counter()
    for entry in index["shards"]:
        arrays, _ = read_shard(root / entry["file"])
        per_patient.update(int(p) for p in arrays["patient"])
    if per_patient:
        counts = np.array(list(per_patient.values()))
        lines.append(f"\nsamples per patient: min {counts.min()}, median {int(np.median(counts))}, max {counts.max()} "
                     f"over {len(counts)} patients")
    recordings = index.get("recordings", [])
    one_each = len(recordings) > 1 and len({r["patient"] for r in recordings}) == len(recordings)
    if index["kind"] == "spectrogram" and one_each:
        lines.append(f"\nWARNING: every patient has exactly one recording ({len(recordings)}): if patients made more "
                     "than one, their recordings may sit in different splits (build the manifest with "
                     "`vascdist manifest --patient-pattern REGEX`)")
    lines += ["", "preprocessing parameters:", json.dumps(index["preprocess"], indent=1)]
    return "\n".join(lines)
