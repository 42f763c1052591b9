"""What a model was trained on: a summary of its shard set, stored in every checkpoint (data entry `provenance`)
and printed once by `predict` and `evaluate`, so that no verdict travels without it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vascdist.data.audio import SYNTH_MARK

DEMONSTRATION_NOTE = "demonstration model: trained on synthetic recordings (vascdist synth), never on real ones"


@dataclass(frozen=True)
class Provenance:
    """The shard-set summary of a checkpoint's training data."""
    kind: str
    """'spectrogram' (recordings) or 'beats' (a per-beat CSV)."""
    source: str
    """'synthetic' (every recording made by `vascdist synth`), 'real' (none), 'mixed', or 'unknown' (shards
    preprocessed before vascdist recorded the source)."""
    classes: list[str]
    recordings: dict[str, int] = field(default_factory=dict)
    """Recordings per split (train, val, test)."""
    patients: dict[str, int] = field(default_factory=dict)
    """Patients per split."""
    synthetic_recordings: int = 0
    sites: list[str] = field(default_factory=list)
    quality_range: dict[str, list[float]] = field(default_factory=dict)
    """Per quality field, [min, max] over the training recordings."""
    manifest_sha256: str = ""

    @property
    def demonstration(self) -> bool:
        """Whether every recording the model learnt from was synthetic."""
        return self.source == "synthetic"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: what the model was trained on."""
        if self.kind != "spectrogram":
            return f"model trained on {self.kind} data, classes {', '.join(self.classes)}"
        total = sum(self.recordings.values())
        what = {"synthetic": "synthetic recordings (vascdist synth)", "real": "real recordings (files, not vascdist "
                "synth)", "mixed": f"recordings, {self.synthetic_recordings} of them synthetic (vascdist synth)",
                "unknown": "recordings of unrecorded source (shards from before vascdist recorded it)"}[self.source]
        splits = ", ".join(f"{s} {self.recordings.get(s, 0)}/{self.patients.get(s, 0)}" for s in ("train", "val", "test"))
        sites = f"; sites {', '.join(self.sites)}" if self.sites else ""
        ranges = "; train quality " + ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in self.quality_range.items()) \
            if self.quality_range else ""
        line = (f"model trained on {total} {what} (recordings/patients: {splits}); classes "
                f"{', '.join(self.classes)}{sites}{ranges}")
        return f"{line}\n{DEMONSTRATION_NOTE.upper()}" if self.demonstration else line


def provenance_of(index: dict) -> Provenance:
    """The Provenance of a shard set from its index.json."""
    recordings = index.get("recordings", [])
    per_split = {s: [r for r in recordings if r.get("split") == s] for s in ("train", "val", "test")}
    known = [r for r in recordings if "source" in r]
    synthetic = sum(r["source"] == SYNTH_MARK for r in known)
    if index.get("kind") != "spectrogram" or not recordings:
        source = "unknown"
    elif len(known) < len(recordings):
        source = "unknown"
    else:
        source = "synthetic" if synthetic == len(known) else "real" if synthetic == 0 else "mixed"
    return Provenance(
        kind=index.get("kind", "unknown"), source=source, classes=list(index.get("classes", [])),
        recordings={s: len(rs) for s, rs in per_split.items()},
        patients={s: len({r["patient"] for r in rs}) for s, rs in per_split.items()},
        synthetic_recordings=synthetic, sites=sorted({r["site"] for r in recordings if r.get("site")}),
        quality_range=dict(index.get("quality_range", {})), manifest_sha256=index.get("manifest_sha256", ""))


def provenance_from_info(info: dict) -> Provenance:
    """The Provenance stored in a checkpoint's data entry; for a checkpoint from before it was stored, what the
    entry still says (kind, classes, quality range) with source 'unknown'."""
    stored = info.get("provenance")
    if stored:
        return Provenance(**stored)
    return Provenance(kind=info.get("kind", "unknown"), source="unknown", classes=list(info.get("classes", [])),
                      quality_range=dict(info.get("quality_range", {})))
