"""The on-disk shard format, in one place: what the writer (data.shards) writes and the checker
(data.integrity) and the reader (data.reader) check.

A shards directory:
  shard-00000.h5 ...  datasets x [N, *sample_shape] float16 (chunked along N), y, patient, recording, cycle
                      (int64; patient/recording index into index.json's tables), x_sum [N] (per-sample
                      checksum, sample_sums) and chunk_crc32 [chunks, 5] (chunk_crcs over CRC_FIELDS); attrs:
                      schema_version, kind, split, classes, preprocess (JSON), package_version, manifest_sha256,
                      checksum (data_checksum)
  index.json          shards (file, split, samples, bytes, sha256 of the file, checksum of the data), per-split
                      and per-label counts, the train-split normalisation, class names, patient/recording
                      tables (each recording with its site and quality record), the excluded recordings with
                      their reasons (per split and label in `splits`), the train recordings' quality range,
                      and index_sha256 over all of that (seal_index).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import h5py
import numpy as np

import vascdist
from vascdist.errors import DataError

SCHEMA_VERSION = 3
SCHEMA_CHANGES = {  # what each version added; load_index names what an older set lacks
    2: "level-normalised spectrograms, per-recording quality, excluded recordings",
    3: "per-chunk checksums (x_sum, chunk_crc32), file sizes and a sealed index.json",
}
FIELDS = ("x", "y", "patient", "recording", "cycle")
INDEX = "index.json"
DIGEST_KEY = "index_sha256"
CRC_FIELDS = ("y", "patient", "recording", "cycle", "x_sum")  # columns of a shard's chunk_crc32 table
HEADER_ATTRS = ("kind", "split", "classes", "preprocess", "manifest_sha256")  # repeated from index.json
SHARD_GLOB = "shard-*.h5"


def shard_name(number: int) -> str:
    """The file name of the set's `number`-th shard."""
    return f"shard-{number:05d}.h5"


def is_shard_name(name: str) -> bool:
    """Whether `name` is a shard file's name (shard_name's pattern)."""
    return name.startswith("shard-") and name.endswith(".h5")


# --------------------------------------------------------------------------------------------- checksums
def index_digest(index: dict) -> str:
    """sha256 of index.json's content (without its own digest) in canonical JSON."""
    body = {k: v for k, v in index.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_index(index: dict) -> dict:
    """`index` with its digest set (what the writer stores)."""
    return {**{k: v for k, v in index.items() if k != DIGEST_KEY}, DIGEST_KEY: index_digest(index)}


def sample_sums(x: np.ndarray) -> np.ndarray:
    """One checksum per sample of an (N, ...) array: the wrapping uint64 sum of its 8-byte words (of its
    2-byte words when a sample is not a whole number of 8-byte words), as int64.

    Not a CRC: chosen because it is one vectorised pass at memory speed (crc32 costs 4 us per 8 KB sample,
    4x the loader's whole cost per sample). A change confined to one word (every flipped byte or bit) always
    changes the sum; wider damage goes unnoticed only if its word deltas cancel modulo 2^64.
    """
    flat = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
    if flat.shape[1] % 8 == 0:
        return flat.view(np.uint64).sum(axis=1).view(np.int64)
    return flat.view(np.uint16).sum(axis=1, dtype=np.uint64).view(np.int64)


def chunk_crcs(arrays: dict[str, np.ndarray], chunk_size: int) -> np.ndarray:
    """crc32 of each chunk of the CRC_FIELDS columns (the bytes the reader gets with one pread): (chunks, 5)."""
    n = len(arrays["y"])
    starts = range(0, n, chunk_size)
    return np.array([[zlib.crc32(np.ascontiguousarray(arrays[k][s:s + chunk_size])) for k in CRC_FIELDS]
                     for s in starts], np.int64).reshape(len(starts), len(CRC_FIELDS))


def data_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the datasets' bytes, in FIELDS order (stored in the shard, so it cannot hash the file)."""
    digest = hashlib.sha256()
    for name in FIELDS:
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def load_index(shards_dir: str | Path) -> dict:
    """Read index.json and check the schema; errors name the directory."""
    path = Path(shards_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{shards_dir}: no {INDEX} (not a shards directory, or preprocessing did not finish)")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    version = index.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: {schema_mismatch(version, index.get('package_version'))}")
    return index


def schema_mismatch(version, package_version=None) -> str:
    """Why a set of schema `version` cannot be read, and what to do: one line for every older or newer set."""
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return (f"shards of schema {version} (written by vascdist {package_version or 'unknown'}), newer than the "
                f"schema {SCHEMA_VERSION} this vascdist {vascdist.__version__} reads; upgrade vascdist")
    lacks = "; ".join(text for v, text in SCHEMA_CHANGES.items() if not isinstance(version, int) or v > version)
    return (f"shards of schema {version}, older than the schema {SCHEMA_VERSION} this vascdist reads (it lacks: "
            f"{lacks}); rebuild them with `vascdist preprocess --out NEW_DIR` (a set of another schema is "
            f"never overwritten in place)")


# What h5py raises for a damaged file: OSError for most, KeyError for an object header it cannot open (a flipped
# byte there), ValueError or RuntimeError for some damaged dataspaces and chunk indexes. Every reader catches these.
HDF5_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


def read_shard(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A whole shard: its datasets (FIELDS, x_sum, chunk_crc32) and its attributes."""
    try:
        with h5py.File(path, "r") as f:
            return {k: f[k][...] for k in (*FIELDS, "x_sum", "chunk_crc32") if k in f}, dict(f.attrs)
    except HDF5_ERRORS as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from None
