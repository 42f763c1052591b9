"""What makes a shard set trustworthy, checked in one place: used by `shards verify`, training, `evaluate`.

Three layers, from cheap to thorough:
  * index.json carries `index_sha256`, a sha256 over its own canonical JSON (sorted keys, no spaces) without
    that key: a hand edit (class order, normalisation, a dropped entry) is refused.
  * every shard's header repeats what index.json says about it (kind, split, classes, preprocessing, sample
    count and shape) and index.json records each file's size: `check_shard_set(quick)` compares them all,
    opening each file's header only (about a millisecond per shard, whatever the size of the set).
  * the data carry checksums the loader verifies as it reads (vascdist.data.reader; the format is vascdist.data.shard_format): `x_sum`, one 64-bit
    wrapping sum of each sample's bytes (any changed byte or 8-byte word changes it), and `chunk_crc32`,
    a crc32 of every HDF5 chunk of y, patient, recording, cycle and x_sum. `check_shard_set(full=True)`
    (`shards verify`) also recomputes them all, with each file's sha256 and the patient-leakage check.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from vascdist.data.shard_format import (CRC_FIELDS, DIGEST_KEY, HDF5_ERRORS, HEADER_ATTRS, INDEX, SHARD_GLOB,
                                        chunk_crcs, data_checksum, index_digest, load_index, read_shard, sample_sums)
from vascdist.errors import DataError


# --------------------------------------------------------------------------------------------- the check
def check_shard_set(shards_dir: str | Path, full: bool = False) -> dict:
    """Refuse a shard set that is not exactly what preprocessing wrote; returns its index.

    Quick (training, evaluate): index.json's digest, the set of shard files, their sizes and headers against
    index.json, and index.json's own counts. `full` (`shards verify`): also every file's sha256 and every data
    checksum, label range and patient leakage. Every refusal is one DataError naming the file at fault.
    """
    root = Path(shards_dir)
    index = load_index(root)
    listed = [e["file"] for e in index["shards"]]
    extra = sorted({p.name for p in root.glob(SHARD_GLOB)} - set(listed))
    if extra:
        raise DataError(f"{root / extra[0]}: shard not listed in {INDEX} (an entry was dropped, or the file "
                        f"belongs to another set); re-run `vascdist preprocess`")
    classes = index["classes"]
    totals: dict[str, Counter] = {s: Counter() for s in index["splits"]}
    patient_split: dict[int, str] = {}
    for entry in index["shards"]:
        path = root / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {INDEX} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise DataError(f"{path}: {path.stat().st_size} bytes, {INDEX} says {entry['bytes']} (truncated or "
                            f"replaced); re-run `vascdist preprocess` or restore the file")
        _check_header(path, entry, index)
        if entry["split"] not in totals:
            raise DataError(f"{path}: split '{entry['split']}' is not one of {INDEX}'s splits")
        totals[entry["split"]]["samples"] += entry["samples"]
        for label, count in entry["labels"].items():
            if not 0 <= int(label) < len(classes):
                raise DataError(f"{path}: label {label} is outside the {len(classes)} classes of {INDEX}")
            totals[entry["split"]][classes[int(label)]] += count
        if full:
            _check_data(path, entry, index, patient_split)
    for split, counts in index["splits"].items():
        if counts["samples"] != totals[split]["samples"]:
            raise DataError(f"{root / INDEX}: split '{split}' has {totals[split]['samples']} samples in its shards' "
                            f"entries, but {counts['samples']} in its totals")
        if any(counts["labels"].get(c, 0) != totals[split][c] for c in classes):
            raise DataError(f"{root / INDEX}: split '{split}' per-label counts do not match its shards' entries")
    norm = index["normalization"]
    if not all(np.isfinite(norm["mean"])) or not all(s > 0 and np.isfinite(s) for s in norm["std"]):
        raise DataError(f"{root / INDEX}: normalisation holds a non-finite mean or a std <= 0")
    if index.get(DIGEST_KEY) != index_digest(index):
        raise DataError(f"{root / INDEX}: content does not match its checksum ({DIGEST_KEY}): it was edited or "
                        f"corrupted after preprocessing; re-run `vascdist preprocess`")
    return index


def _check_header(path: Path, entry: dict, index: dict) -> None:
    """The shard's own attributes and dataset shapes against what index.json says of it."""
    want = {"kind": index["kind"], "split": entry["split"], "classes": index["classes"],
            "preprocess": index["preprocess"], "manifest_sha256": index["manifest_sha256"]}
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            shapes = {k: f[k].shape for k in ("x", "y", "x_sum", "chunk_crc32") if k in f}
    except HDF5_ERRORS as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from None
    if attrs.get("schema_version") != index["schema_version"]:
        raise DataError(f"{path}: schema {attrs.get('schema_version')}, {INDEX} says {index['schema_version']}")
    for key in HEADER_ATTRS:
        value = attrs.get(key)
        if key in ("classes", "preprocess") and isinstance(value, str):
            value = json.loads(value)
        if value != want[key]:
            raise DataError(f"{path}: attribute '{key}' is {value!r} in the shard but {want[key]!r} in {INDEX} "
                            f"(edited or mixed sets); re-run `vascdist preprocess`")
    n = entry["samples"]
    expected = {"x": (n, *index["sample_shape"]), "y": (n,), "x_sum": (n,),
                "chunk_crc32": (-(-n // int(index["preprocess"]["chunk_size"])), len(CRC_FIELDS))}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise DataError(f"{path}: field '{name}' has shape {shapes.get(name)}, {INDEX} says {shape}")


def _check_data(path: Path, entry: dict, index: dict, patient_split: dict[int, str]) -> None:
    from vascdist.data.manifest import file_sha256
    if file_sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: file checksum does not match {INDEX} (corrupted or modified)")
    arrays, attrs = read_shard(path)
    if data_checksum(arrays) != attrs.get("checksum"):
        raise DataError(f"{path}: data checksum does not match the shard's own checksum (corrupted)")
    bad = np.flatnonzero(sample_sums(arrays["x"]) != arrays["x_sum"])
    if len(bad):
        raise DataError(f"{path}: sample {bad[0]} of x does not match its checksum (corrupted)")
    size = int(index["preprocess"]["chunk_size"])
    bad = np.argwhere(chunk_crcs(arrays, size) != arrays["chunk_crc32"])
    if len(bad):
        chunk, field = bad[0]
        raise DataError(f"{path}: field '{CRC_FIELDS[field]}', samples {chunk * size}-"
                        f"{min((chunk + 1) * size, entry['samples'])}, does not match its checksum (corrupted)")
    check_labels(arrays["y"], len(index["classes"]), path, 0)
    labels = Counter(int(v) for v in arrays["y"])
    if {str(k): v for k, v in sorted(labels.items())} != entry["labels"]:
        raise DataError(f"{path}: per-label counts {dict(labels)} do not match {INDEX}'s {entry['labels']}")
    for p in np.unique(arrays["patient"]):
        previous = patient_split.setdefault(int(p), entry["split"])
        if previous != entry["split"]:
            names = index["patients"]
            name = names[int(p)] if 0 <= int(p) < len(names) else int(p)
            raise DataError(f"{path}: patient '{name}' appears in split '{entry['split']}' and in '{previous}' (leakage)")


def check_labels(y: np.ndarray, num_classes: int, path: Path, first_sample: int) -> None:
    """Every label an index into the classes (a label out of range would end in a one_hot traceback)."""
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DataError(f"{path}: sample {first_sample + int(bad[0])} has label {int(y[bad[0]])}, outside the "
                        f"{num_classes} classes of {INDEX} (corrupted)")
