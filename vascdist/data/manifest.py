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


def build_manifest(root: str | Path, out: str | Path, classes: list[str], patient_pattern: str | None = None) -> int:
    """Write a manifest for a folder-per-class tree, or for a PhysioNet-style REFERENCE.csv (name,label -1/1).

    Patient ids come from `patient_pattern` (a regex whose first group, searched in the file name, is the
    patient id); without it each file is its own patient. Returns the number of recordings written.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    regex = None
    if patient_pattern:
        try:
            regex = re.compile(patient_pattern)
        except re.error as exc:
            raise DataError(f"--patient-pattern '{patient_pattern}': invalid regex ({exc})") from None
        if regex.groups < 1:
            raise DataError(f"--patient-pattern '{patient_pattern}' needs one capture group for the patient id")

    def patient_of(file: Path) -> str:
        if regex is None:
            return file.stem
        match = regex.search(file.name)
        if not match:
            raise DataError(f"{file}: file name does not match --patient-pattern '{patient_pattern}'")
        return match.group(1)

    entries: list[tuple[Path, str]] = []
    reference = root / "REFERENCE.csv"
    if reference.is_file():
        # PhysioNet 2016 layout: "name,label" with -1 = normal, 1 = abnormal; audio at root/name.wav.
        with open(reference, newline="") as fh:
            for line, row in enumerate(csv.reader(fh), start=1):
                if not row or not row[0].strip():
                    continue
                if len(row) < 2 or row[1].strip() not in ("-1", "1"):
                    raise DataError(f"{reference}:{line}: expected 'name,-1|1', got {','.join(row)}")
                audio = next((root / f"{row[0].strip()}{s}" for s in AUDIO_SUFFIXES
                              if (root / f"{row[0].strip()}{s}").is_file()), None)
                if audio is None:
                    raise DataError(f"{reference}:{line}: no audio file named {row[0].strip()}.wav in {root}")
                entries.append((audio, classes[0] if row[1].strip() == "-1" else classes[1]))
    else:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"{root}: neither a REFERENCE.csv nor one sub-folder per class")
        for d in class_dirs:
            label_index(d.name, classes, f"{d}")  # unknown folder names fail here, naming the folder
            entries += [(f, d.name) for f in sorted(d.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES]
    if not entries:
        raise DataError(f"{root}: no audio files found ({', '.join(AUDIO_SUFFIXES)})")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(REQUIRED_COLUMNS)
    for audio, label in entries:
        rel = audio.resolve()
        try:
            rel = rel.relative_to(out.parent.resolve())
        except ValueError:
            pass
        writer.writerow([rel, label, patient_of(audio), audio.relative_to(root).with_suffix("").as_posix()])
    atomic_write_text(out, text.getvalue())
    return len(entries)
