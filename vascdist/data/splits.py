"""Patient-level train/val/test splits: deterministic for a seed, stratified by label, never leaking."""

from __future__ import annotations

import zlib

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
