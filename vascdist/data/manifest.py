"""Reading, checking and building the recordings manifest (path,label,patient_id,recording_id[,split][,site])."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vascdist.errors import DataError
from vascdist.fileio import atomic_write_text

REQUIRED_COLUMNS = ("path", "label", "patient_id", "recording_id")
SPLITS = ("train", "val", "test")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")


@dataclass(frozen=True)
class Recording:
    """One manifest row, resolved: `path` is absolute, `label` an index into the class list."""
    path: Path
    label: int
    patient_id: str
    recording_id: str
    split: str | None
    row: int  # 1-based line number in the manifest (header is line 1), for error messages
    site: str = ""  # optional `site` column (arterial, venous, anastomosis...): metrics per site in evaluate


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """A CSV file as text: UTF-8, with or without the byte-order mark spreadsheet programs write; anything else
    is a DataError naming the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}; Latin-1 or another legacy "
                        "encoding?); save the file as UTF-8") from None


def label_index(label: str, classes: list[str], where: str) -> int:
    """Map a label string to its class index (case-insensitive); an unknown label names the row."""
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    key = label.strip().lower()
    if key not in lookup:
        raise DataError(f"{where}: unknown label '{label}' (classes: {', '.join(classes)}; "
                        "set preprocess.classes to add one)")
    return lookup[key]


def read_manifest(path: str | Path, classes: list[str], allow_mixed_patient_labels: bool = False) -> list[Recording]:
    """Read and check a manifest; every problem is a DataError naming the manifest and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
    rows = list(reader)
    if not rows:
        raise DataError(f"{path}: manifest has no rows")

    recordings: list[Recording] = []
    seen_paths: dict[Path, int] = {}
    seen_ids: dict[str, int] = {}
    patient_label: dict[str, tuple[int, int]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line}"
        for column in REQUIRED_COLUMNS:
            if not (row.get(column) or "").strip():
                raise DataError(f"{where}: empty '{column}'")
        audio = Path(row["path"].strip())
        audio = Path(os.path.realpath(audio if audio.is_absolute() else path.parent / audio))  # no error on a loop
        if audio in seen_paths:
            raise DataError(f"{where}: duplicate path {row['path']} (also on line {seen_paths[audio]})")
        seen_paths[audio] = line
        rec_id = row["recording_id"].strip()
        if rec_id in seen_ids:
            raise DataError(f"{where}: duplicate recording_id '{rec_id}' (also on line {seen_ids[rec_id]})")
        seen_ids[rec_id] = line
        label = label_index(row["label"], classes, where)
        patient = row["patient_id"].strip()
        if patient in patient_label and patient_label[patient][0] != label and not allow_mixed_patient_labels:
            first_label, first_line = patient_label[patient]
            raise DataError(f"{where}: patient '{patient}' labelled '{classes[label]}' but '{classes[first_label]}' "
                            f"on line {first_line} (set preprocess.allow_mixed_patient_labels=true if intended)")
        patient_label.setdefault(patient, (label, line))
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split '{split}' must be one of {', '.join(SPLITS)} or empty")
        site = (row.get("site") or "").strip()
        recordings.append(Recording(audio, label, patient, rec_id, split, line, site))
    return recordings


def physionet_folders(root: Path) -> list[Path]:
    """The PhysioNet 2016 folders under `root`: root itself when it holds a REFERENCE.csv, else its sub-folders
    that do (training-a, training-b, ...), sorted; empty when neither."""
    if (root / "REFERENCE.csv").is_file():
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "REFERENCE.csv").is_file())


def _reference_entries(folder: Path, classes: list[str]) -> list[tuple[Path, str]]:
    """(audio file, class name) per row of folder/REFERENCE.csv ("name,-1|1": -1 = classes[0], 1 = classes[1])."""
    if len(classes) != 2:
        raise DataError(f"{folder / 'REFERENCE.csv'}: its -1/1 labels need exactly two preprocess.classes "
                        f"(the normal one first, e.g. [normal,abnormal]); the config has {classes}")
    reference = folder / "REFERENCE.csv"
    entries = []
    for line, row in enumerate(csv.reader(io.StringIO(read_text(reference), newline="")), start=1):
        if not row or not row[0].strip():
            continue
        if len(row) < 2 or row[1].strip() not in ("-1", "1"):
            raise DataError(f"{reference}:{line}: expected 'name,-1|1', got {','.join(row)}")
        name = row[0].strip()
        audio = next((folder / f"{name}{s}" for s in AUDIO_SUFFIXES if (folder / f"{name}{s}").is_file()), None)
        if audio is None:
            raise DataError(f"{reference}:{line}: no audio file named {name}.wav in {folder}")
        entries.append((audio, classes[0] if row[1].strip() == "-1" else classes[1]))
    return entries


def build_manifest(roots: str | Path | list, out: str | Path, classes: list[str], patient_pattern: str | None = None,
                   site: str | None = None) -> int:
    """Write a manifest for folder-per-class trees or for the PhysioNet 2016 layout; returns the number of rows.

    Each root is a folder with one sub-folder per class, a PhysioNet folder (REFERENCE.csv "name,-1|1" beside
    the audio; -1 = classes[0], 1 = classes[1]), or a folder of PhysioNet folders (training-a/, training-b/,
    ...). A PhysioNet folder's recordings get the folder's name as `site` (the centre: what `vascdist cv
    --group-by site` holds out); `site` overrides it for every recording. Patient ids come from
    `patient_pattern` (a regex whose first group, searched in the file name, is the patient id); without it each
    file is its own patient. A patient found in two sites is refused: a site must be a centre that owns its
    patients.
    """
    patient_of = _patient_namer(patient_pattern)
    rows: list[tuple[Path, str, str, str]] = []  # (audio, label, recording id, site)
    for root in [Path(r) for r in (roots if isinstance(roots, (list, tuple)) else [roots])]:
        rows += _rows_of_root(root, classes, site)
    _check_one_site_per_patient(rows, patient_of)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    with_site = any(where for *_, where in rows)
    writer.writerow(REQUIRED_COLUMNS + (("site",) if with_site else ()))
    for audio, label, rec_id, where in rows:
        rel = audio.resolve()
        try:
            rel = rel.relative_to(out.parent.resolve())
        except ValueError:
            pass
        writer.writerow([rel, label, patient_of(audio), rec_id] + ([where] if with_site else []))
    atomic_write_text(out, text.getvalue())
    return len(rows)


def _patient_namer(patient_pattern: str | None):
    """file -> patient id: the first group of `patient_pattern` searched in the file name, else the file stem."""
    if not patient_pattern:
        return lambda file: file.stem
    try:
        regex = re.compile(patient_pattern)
    except re.error as exc:
        raise DataError(f"--patient-pattern '{patient_pattern}': invalid regex ({exc})") from None
    if regex.groups < 1:
        raise DataError(f"--patient-pattern '{patient_pattern}' needs one capture group for the patient id")

    def patient_of(file: Path) -> str:
        match = regex.search(file.name)
        if not match:
            raise DataError(f"{file}: file name does not match --patient-pattern '{patient_pattern}'")
        return match.group(1)
    return patient_of


def _rows_of_root(root: Path, classes: list[str], site: str | None) -> list[tuple[Path, str, str, str]]:
    """(audio, label, recording id, site) of every recording under one root: PhysioNet folders (site = the
    folder's name unless `site` is given) or one sub-folder per class."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    folders = physionet_folders(root)
    if folders:
        return [(audio, label, f"{folder.name}/{audio.stem}", site or folder.name)
                for folder in folders for audio, label in _reference_entries(folder, classes)]
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise DataError(f"{root}: neither a REFERENCE.csv, nor training-* folders with one, nor one sub-folder "
                        "per class")
    rows = []
    for d in class_dirs:
        label_index(d.name, classes, f"{d}")  # unknown folder names fail here, naming the folder
        rows += [(f, d.name, f.relative_to(root).with_suffix("").as_posix(), site or "")
                 for f in sorted(d.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES]
    if not rows:
        raise DataError(f"{root}: no audio files found ({', '.join(AUDIO_SUFFIXES)})")
    return rows


def _check_one_site_per_patient(rows, patient_of) -> None:
    """A patient found in two sites is refused: a site must be a centre that owns its patients."""
    site_of_patient: dict[str, tuple[str, Path]] = {}
    for audio, _, _, where in rows:
        patient = patient_of(audio)
        first = site_of_patient.setdefault(patient, (where, audio))
        if first[0] != where:
            raise DataError(f"{audio}: patient '{patient}' is also in site '{first[0]}' ({first[1]}); a patient "
                            "belongs to one site (give --patient-pattern, or one --site for all)")
