"""Patient-level train/val/test splits: deterministic for a seed, stratified by label, never leaking."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from vascdist.config import SplitConfig
from vascdist.data.manifest import Recording
from vascdist.errors import DataError


def assign_splits(recordings: list[Recording], cfg: SplitConfig) -> dict[str, str]:
    """Return {patient_id: split}. Rows that fix a split keep it (all rows of a patient must agree);
    the other patients are shuffled per label with `cfg.seed` and cut by val/test fractions."""
    fixed: dict[str, tuple[str, int]] = {}
    patient_label: dict[str, int] = {}
    for rec in recordings:
        patient_label[rec.patient_id] = max(patient_label.get(rec.patient_id, 0), rec.label)
        if rec.split is None:
            continue
        if rec.patient_id in fixed and fixed[rec.patient_id][0] != rec.split:
            raise DataError(f"manifest row {rec.row}: patient '{rec.patient_id}' is in split '{rec.split}' but in "
                            f"'{fixed[rec.patient_id][0]}' on row {fixed[rec.patient_id][1]}; a patient must stay in one split")
        fixed[rec.patient_id] = (rec.split, rec.row)
    for rec in recordings:
        if rec.split is None and rec.patient_id in fixed:
            raise DataError(f"manifest row {rec.row}: patient '{rec.patient_id}' has no split here but "
                            f"'{fixed[rec.patient_id][0]}' on row {fixed[rec.patient_id][1]}; fill in every row of that patient")

    splits = {p: s for p, (s, _) in fixed.items()}
    for label in sorted(set(patient_label.values())):
        # Sort, then shuffle with a seed mixed with the label: the split depends only on the patient set.
        patients = sorted(p for p, lab in patient_label.items() if lab == label and p not in fixed)
        rng = np.random.default_rng([cfg.seed, label, zlib.crc32(b"split")])
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_test = int(round(cfg.test_fraction * len(order)))
        n_val = int(round(cfg.val_fraction * len(order)))
        for i, patient in enumerate(order):
            splits[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits


@dataclass(frozen=True)
class SplitProblem:
    """A property of a shard set's splits that leaves a run's metrics undefined (`fatal`: train refuses) or weaker."""
    text: str
    fatal: bool


def split_problems(index: dict, min_patients_per_class: int) -> list[SplitProblem]:
    """What is wrong with the val and test splits of `index` (a shard set's, or a fold's from data.folds.split_index):
    an empty split or, with two classes, a class the split lacks (no AUROC, sensitivity or threshold: fatal); a
    class that train has but another split lacks with more classes, or fewer validation patients per class than
    eval.min_patients_per_class (the threshold rule falls back to 0.5): stated, not fatal."""
    classes = index["classes"]
    present = {split: _samples_per_class(index, split) for split in ("train", "val", "test")}
    problems = []
    for split in ("val", "test"):
        counts = present[split]
        if not sum(counts.values()):
            problems.append(SplitProblem(f"the {split} split is empty", True))
            continue
        absent = [c for c in classes if not counts.get(c) and present["train"].get(c)]
        if absent:
            problems.append(SplitProblem(f"the {split} split has no {', '.join(absent)} samples", len(classes) == 2))
    if len(classes) == 2 and index["kind"] != "beats" and min_patients_per_class and present["val"]:
        per_class = _patients_per_class(index, "val")
        few = {c: per_class.get(c, 0) for c in classes if 0 < per_class.get(c, 0) < min_patients_per_class}
        if few:
            listed = ", ".join(f"{n} {c}" for c, n in few.items())
            problems.append(SplitProblem(f"the val split has {listed} patient(s), fewer than eval.min_patients_per_class="
                                         f"{min_patients_per_class}: the threshold rule falls back to 0.5", False))
    return problems


def _members(index: dict, split: str) -> list[dict]:
    """The kept recordings of `split` (a fold's patient list where data.split_file gives one)."""
    if "split_patients" in index:
        patients = set(index["split_patients"][split])
        return [r for r in index.get("recordings", []) if r["patient"] in patients]
    return [r for r in index.get("recordings", []) if r["split"] == split]


def _samples_per_class(index: dict, split: str) -> dict[str, int]:
    classes = index["classes"]
    if "split_patients" not in index:
        return dict(index["splits"][split]["labels"])
    counts = {c: 0 for c in classes}
    for r in _members(index, split):
        counts[classes[r["label"]]] += r.get("cycles", 1)
    return counts


def _patients_per_class(index: dict, split: str) -> dict[str, int]:
    """Patients of `split` per class, a patient's class being its highest label (as assign_splits counts them)."""
    label: dict[str, int] = {}
    for r in _members(index, split):
        label[r["patient"]] = max(label.get(r["patient"], 0), r["label"])
    classes = index["classes"]
    return {c: sum(v == k for v in label.values()) for k, c in enumerate(classes)}
