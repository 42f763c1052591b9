"""`vascdist bench abstain RUN`: predict on garbage vs on the held-out test recordings of the model's shard set
(verdict / no-verdict counts per group), the table of README's "When predict gives no verdict".

The garbage is made here (`write_garbage`), from signals no vascular access makes, plus, optionally, real
recordings of another kind (--other DIR_OR_FILES: real fistula sounds for a synthetic model, heart sounds for a
fistula model). The held-out recordings are the test split of the shard set the run trained on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

if TYPE_CHECKING:
    from vascdist.train.saved import SavedCheckpoint

DURATION_S = 30.0


def _write(path: Path, x: np.ndarray, rate: int) -> Path:
    sf.write(path, np.clip(x, -1.0, 1.0), rate, subtype="PCM_16")
    return path


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """`x` scaled to an RMS of `dbfs` dB re full scale."""
    return x * (10 ** (dbfs / 20) / max(float(np.sqrt(np.mean(x ** 2))), 1e-12))


def write_garbage(out: Path, rate: int = 4000, example: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """WAV files of signals no recording of a vascular access is: {name: path}. `example`: a real or synthetic
    recording whose first half second becomes the one-window clip (else a noise burst is used)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(DURATION_S * rate)
    t = np.arange(n) / rate
    beat = (np.sin(np.pi * 1.2 * t) ** 2) ** 8  # a 72 bpm pulse envelope, for the periodic kinds of garbage
    files = {
        "white noise": _write(out / "white_noise.wav", _level(rng.standard_normal(n), -20), rate),
        "white noise at -75 dBFS": _write(out / "white_noise_quiet.wav", _level(rng.standard_normal(n), -75), rate),
        "50 Hz mains hum": _write(out / "hum_50hz.wav", 0.3 * np.sin(2 * np.pi * 50 * t), rate),
        "near-silence (-85 dBFS noise)": _write(out / "near_silence.wav", _level(rng.standard_normal(n), -85), rate),
        "clipped square wave": _write(out / "square.wav", np.sign(np.sin(2 * np.pi * 100 * t)), rate),
        "1 Hz sample rate": _write(out / "rate_1hz.wav", rng.uniform(-0.5, 0.5, 40), 1),
        # Kinds the rule was not tuned on: periodic ones, so that periodicity alone cannot stop them.
        "pulsed white noise (72 bpm)": _write(out / "pulsed_noise.wav", _level(rng.standard_normal(n) * beat, -25), rate),
        "click train (72 bpm)": _write(out / "clicks.wav", _level(np.where(np.diff(np.floor(t * 1.2), prepend=0) > 0,
                                                                           1.0, 0.0), -30), rate),
        "pulsed 440 Hz tone (72 bpm)": _write(out / "pulsed_tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t) * beat, rate),
        "brown noise": _write(out / "brown_noise.wav", _level(np.cumsum(rng.standard_normal(n)), -20), rate),
        "chirp 20-1800 Hz": _write(out / "chirp.wav", 0.3 * np.sin(2 * np.pi * (20 * t + (1780 / (2 * DURATION_S)) * t * t)),
                                   rate),
    }
    if example is not None:
        x, r = sf.read(example, dtype="float64")
        files["one-window clip (0.5 s)"] = _write(out / "half_second.wav", x[: int(0.5 * r)], r)
    else:
        files["one-window clip (0.5 s)"] = _write(out / "half_second.wav", _level(rng.standard_normal(rate // 2), -20), rate)
    return files


def held_out_recordings(ckpt: SavedCheckpoint) -> tuple[list[Path], Path]:
    """The test-split recordings of the shard set a checkpoint's run trained on, and that shard set."""
    from vascdist.data.shards import load_index
    shards = Path(ckpt.config.data.shards)
    index = load_index(shards)
    return [Path(r["path"]) for r in index["recordings"] if r["split"] == "test"], shards


REASON_KINDS = {"sample rate": "rate", "level ": "floor", "fully clipped": "clipped", "no energy": "band energy",
                "aperiodic": "aperiodic", "only ": "no cycles", "silent": "silent", "empty": "silent",
                "spectrum unlike": "spectrum", "a real recording": "source", "a synthetic recording": "source"}


def reason_kind(reason: str) -> str:
    """A short name for an abstain reason (abstain.py's wording): the quality field it names, or its kind."""
    if " outside the training data's " in reason:
        return reason.split(" ", 1)[0]
    if "usable cycle window" in reason:
        return "few cycles"
    return next((kind for start, kind in REASON_KINDS.items() if reason.startswith(start)), reason[:30])


def count(results: list[dict]) -> tuple[int, int, Counter]:
    """(verdicts, no verdicts, the no-verdict reasons counted by kind)."""
    abstained = [r for r in results if r["verdict"] is None]
    kinds = Counter(kind for r in abstained for kind in dict.fromkeys(map(reason_kind, r["reasons"])))
    return len(results) - len(abstained), len(abstained), kinds


def run(args) -> int:
    from vascdist.abstain import AbstainRule
    from vascdist.data.audio import load_audio_stats  # noqa: F401 (fails early without soundfile)
    from vascdist.inference import predict_files
    from vascdist.train.state import open_checkpoint
    rule = AbstainRule(args.min_cycles, args.spectral_margin)
    ckpt = open_checkpoint(args.run)  # read once, for every row
    held_out, shards = held_out_recordings(ckpt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        garbage = write_garbage(Path(tmp), example=held_out[0] if held_out else None)
        for name, path in garbage.items():
            (result,) = predict_files(ckpt, [str(path)], skipped=[], rule=rule) or [None]
            rows.append((name, *(count([result]) if result else (0, 0, Counter({"unreadable": 1})))))
        for item in args.other:  # each folder or file is one row
            p = Path(item)
            files = sorted(p.glob("*.wav"))[: args.limit] if p.is_dir() else [p]
            rows.append((f"{item} ({len(files)} files)", *count(predict_files(ckpt, [str(f) for f in files],
                                                                               skipped=[], rule=rule))))
        rows.append((f"held-out test recordings ({len(held_out)}, {shards})",
                     *count(predict_files(ckpt, [str(f) for f in held_out], skipped=[], rule=rule))))
    print(f"| input | verdict | no verdict | reasons |\n|---|---|---|---|")
    for name, verdicts, abstained, kinds in rows:
        print(f"| {name} | {verdicts} | {abstained} | {', '.join(f'{k} {v}' for k, v in kinds.most_common())} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{"input": n, "verdict": v, "no_verdict": a, "reasons": dict(k)}
                                               for n, v, a, k in rows], indent=1))
    return 0


def add_parser(sub) -> None:
    from vascdist.abstain import AbstainRule
    p = sub.add_parser("abstain", help="predict on garbage vs on held-out recordings: verdict / no-verdict counts")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--other", action="append", default=[],
                   help="recordings of another kind: a folder (its *.wav, sorted, up to --limit) or a file; one row "
                        "each; may be repeated")
    p.add_argument("--limit", type=int, default=50, help="files taken from each --other folder")
    p.add_argument("--min-cycles", type=int, default=AbstainRule.min_cycles)
    p.add_argument("--spectral-margin", type=float, default=AbstainRule.spectral_margin)
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.set_defaults(func=run)
