"""Splits by patient list instead of by shard file: the cross-validation folds of `vascdist cv`.

A shard set is written once with its own train/val/test split (one split per shard file). A fold is a *split
file*, JSON {"train": [patient ids], "val": [...], "test": [...], "normalization": {...}}, that data.split_file
points at: the loader then reads, for each split, the rows of those patients from every shard, whatever split
the shard was written for, as row segments that never cross an HDF5 chunk (vascdist.data.reader reads a
segment like a chunk). Nothing is rewritten. The normalisation is fitted on the fold's training patients (the
shards' own was fitted on their train split, which contains other folds' test patients).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from vascdist.data.reader import Chunk
from vascdist.data.shard_format import HDF5_ERRORS
from vascdist.data.shards import load_index
from vascdist.errors import DataError
from vascdist.fileio import atomic_write_text

SPLITS = ("train", "val", "test")


def patient_labels(index: dict) -> dict[str, int]:
    """Each patient's label: the largest of its recordings' (a stenosis anywhere makes the patient positive)."""
    labels: dict[str, int] = {}
    for rec in index["recordings"]:
        labels[rec["patient"]] = max(labels.get(rec["patient"], 0), int(rec["label"]))
    return labels


def fold_assignment(index: dict, folds: int, repeats: int, seed: int, val_fraction: float) -> list[dict]:
    """Stratified patient-level k-fold, `repeats` times: a list of {repeat, fold, train, val, test} (patient ids).

    Every patient is in the test part of exactly one fold per repeat; the validation part (thresholds, early
    stopping, temperature) is split off that fold's training patients, per label, so the test fold chooses
    nothing. Deterministic for (patients, labels, folds, repeats, seed).
    """
    from sklearn.model_selection import StratifiedKFold
    labels = patient_labels(index)
    patients = sorted(labels)
    y = np.array([labels[p] for p in patients])
    smallest = np.bincount(y).min() if len(y) else 0
    if folds < 2 or smallest < folds:
        raise DataError(f"{folds} folds need at least {folds} patients of every class; the smallest class has {smallest}")
    out = []
    for repeat in range(repeats):
        kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for k, (train_idx, test_idx) in enumerate(kfold.split(np.zeros(len(y)), y)):
            rng = np.random.default_rng([seed, repeat, k])
            val = []
            for label in np.unique(y[train_idx]):
                members = train_idx[y[train_idx] == label]
                n_val = min(len(members) - 1, max(1, int(round(val_fraction * len(members)))))
                val += [patients[i] for i in rng.permutation(members)[:n_val]]
            train = sorted(set(patients[i] for i in train_idx) - set(val))
            out.append({"repeat": repeat, "fold": k, "train": train, "val": sorted(val),
                        "test": sorted(patients[i] for i in test_idx)})
    return out


def patient_sites(index: dict) -> dict[str, str]:
    """Each patient's site (the manifest's `site` column: the centre); a DataError when a recording has no site or
    a patient has recordings at two sites (then the site is not a centre that owns its patients)."""
    sites: dict[str, str] = {}
    unnamed = [r["id"] for r in index["recordings"] if not r.get("site")]
    if unnamed:
        raise DataError(f"grouping by site needs a site on every recording; {len(unnamed)} have none (first: "
                        f"{unnamed[0]}): give the manifest a `site` column (vascdist manifest --site NAME)")
    for rec in index["recordings"]:
        first = sites.setdefault(rec["patient"], rec["site"])
        if first != rec["site"]:
            raise DataError(f"patient '{rec['patient']}' has recordings at sites '{first}' and '{rec['site']}'; "
                            "grouping by site needs each patient at one site (the centre)")
    return sites


def site_assignment(index: dict, seed: int, val_fraction: float) -> list[dict]:
    """Leave-one-site-out: per site (sorted), {repeat 0, fold, site, train, val, test} (patient ids).

    The test part is every patient of the held-out site; the validation part is drawn from the other sites
    only, `val_fraction` of each (site, label) group of patients, so every training site is represented in
    validation and the held-out site chooses nothing. Deterministic for (patients, sites, labels, seed).
    """
    labels, sites = patient_labels(index), patient_sites(index)
    names = sorted(set(sites.values()))
    if len(names) < 2:
        raise DataError(f"leave-one-site-out needs at least 2 sites; the shards hold {len(names)} ({', '.join(names)})")
    out = []
    for k, held_out in enumerate(names):
        rng = np.random.default_rng([seed, k])
        train, val = [], []
        for site in names:
            if site == held_out:
                continue
            for label in sorted({labels[p] for p in sites if sites[p] == site}):
                members = sorted(p for p in sites if sites[p] == site and labels[p] == label)
                n_val = min(len(members) - 1, max(1, int(round(val_fraction * len(members)))))
                chosen = set(rng.permutation(members)[:n_val].tolist())
                val += sorted(chosen)
                train += [p for p in members if p not in chosen]
        out.append({"repeat": 0, "fold": k, "site": held_out, "train": sorted(train), "val": sorted(val),
                    "test": sorted(p for p in sites if sites[p] == held_out)})
    return out


# --------------------------------------------------------------------------------------------- rows of patients
@lru_cache(maxsize=8)
def _shard_patients(root: str, file: str, samples: int) -> np.ndarray:
    try:
        with h5py.File(Path(root) / file, "r") as f:
            return f["patient"][:] if samples else np.zeros(0, np.int64)
    except HDF5_ERRORS as exc:
        raise DataError(f"{Path(root) / file}: unreadable shard ({exc})") from None


def patient_segments(root: str | Path, index: dict, patients: list[str]) -> list[Chunk]:
    """Row segments (file, start, stop) of every shard holding the given patients, in storage order; a segment
    never crosses an HDF5 chunk boundary."""
    wanted = np.zeros(len(index["patients"]), dtype=bool)
    number = {p: i for i, p in enumerate(index["patients"])}
    unknown = [p for p in patients if p not in number]
    if unknown:
        raise DataError(f"split file names patient(s) {unknown[:3]} that {root} does not hold")
    wanted[[number[p] for p in patients]] = True
    size = int(index["preprocess"]["chunk_size"])
    segments = []
    for entry in index["shards"]:
        mine = wanted[_shard_patients(str(root), entry["file"], entry["samples"])]
        rows = np.flatnonzero(mine)
        if not rows.size:
            continue
        # A new segment where the rows stop being consecutive or a chunk starts.
        cut = np.flatnonzero((np.diff(rows) != 1) | (rows[1:] % size == 0)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, rows.size]):
            segments.append(Chunk(entry["file"], int(rows[a]), int(rows[b - 1]) + 1))
    return segments


def train_normalization(root: str | Path, index: dict, segments: list[Chunk]) -> dict:
    """Mean and std per normalisation axis over the given rows (as the shard writer fits the train split)."""
    axis = int(index["normalization"]["axis"])
    total, total_sq, count = 0.0, 0.0, 0
    by_file: dict[str, list[Chunk]] = {}
    for s in segments:
        by_file.setdefault(s.file, []).append(s)
    for file, parts in by_file.items():
        try:
            with h5py.File(Path(root) / file, "r") as f:
                for s in parts:
                    x = f["x"][s.start:s.stop].astype(np.float64)
                    axes = tuple(i for i in range(x.ndim) if i != 1 + axis) if axis >= 0 else None
                    total = total + x.sum(axis=axes)
                    total_sq = total_sq + (x * x).sum(axis=axes)
                    count += x.size // np.size(total)
        except HDF5_ERRORS as exc:
            raise DataError(f"{Path(root) / file}: unreadable shard ({exc})") from None
    if count == 0:
        raise DataError(f"{root}: the fold's training patients hold no samples")
    mean = np.atleast_1d(total / count)
    std = np.sqrt(np.maximum(np.atleast_1d(total_sq / count) - mean * mean, 1e-12))
    return {"axis": axis, "mean": mean.tolist(), "std": std.tolist(), "fitted_on": "split file train patients"}


# --------------------------------------------------------------------------------------------- split files
def write_split_file(path: str | Path, shards: str | Path, parts: dict[str, list[str]]) -> None:
    """Write a split file for `parts` ({split: patient ids}), with the normalisation of its train patients."""
    index = load_index(shards)
    normalization = train_normalization(shards, index, patient_segments(shards, index, parts["train"]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**{s: list(parts[s]) for s in SPLITS}, "normalization": normalization},
                                       indent=1))


def read_split_file(path: str | Path) -> dict:
    """A split file, checked: the three splits present, no patient in two of them."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"data.split_file '{path}': cannot read it ({exc})") from None
    missing = [s for s in (*SPLITS, "normalization") if s not in data]
    if missing:
        raise DataError(f"data.split_file '{path}': no {', '.join(missing)} (write it with `vascdist cv`)")
    seen: dict[str, str] = {}
    for split in SPLITS:
        for p in data[split]:
            if p in seen:
                raise DataError(f"data.split_file '{path}': patient '{p}' is in both '{seen[p]}' and '{split}'")
            seen[p] = split
    return data


def split_index(shards: str | Path, split_file: str = "") -> dict:
    """The shard set's index as a run sees it: with a split file, its normalisation and per-split patients."""
    index = load_index(shards)
    if not split_file:
        return index
    data = read_split_file(split_file)
    return {**index, "normalization": data["normalization"], "split_patients": {s: data[s] for s in SPLITS}}
