"""The names inside a run directory, importable without torch (the CLI, `vascdist cv` and `vascdist report` read
run directories before, or without, loading torch).

    RUN/config.yaml              the resolved config the run started with (config/drift.py: CONFIG_FILE)
    RUN/metrics.jsonl            one JSON record per logged train step, validation and test
    RUN/tb/                      TensorBoard events
    RUN/test_metrics.json        the test table with {value, lo, hi} per metric
    RUN/test_confusion.png       RUN/test_reliability.png  RUN/test_predictions.npz
    RUN/report.html              `vascdist report RUN`
    RUN/eval-SPLIT.json          `vascdist evaluate RUN --split SPLIT`
    RUN/export/model.onnx, model_card.json   `vascdist export RUN`
    RUN/checkpoints/step-00000040.pt, best.pt, deepspeed/step-00000040/   (train/state.py keeps them consistent)
    RUN/.lock                    flock'ed by the one training writing RUN (vascdist.lockfile: pid, host, start time)
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

from vascdist.config.drift import CONFIG_FILE

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
BEST_FILE = "best.pt"


def step_stem(step: int) -> str:
    """The name of step `step`'s checkpoint without '.pt' (also its DeepSpeed tag directory)."""
    return f"step-{step:08d}"


def step_files(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step file in `directory`, oldest step first; temp files and best.pt are not listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_FILE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


class RunLayout:
    """Paths inside one run directory (no I/O on construction)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / CONFIG_FILE
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tb"
        self.test_metrics = self.root / "test_metrics.json"
        self.test_confusion = self.root / "test_confusion.png"
        self.test_predictions = self.root / "test_predictions.npz"
        self.report = self.root / "report.html"
        self.checkpoints = self.root / "checkpoints"
        self.lock = self.root / ".lock"
        self.export = self.root / "export"

    def eval_json(self, split: str) -> Path:
        """Where `vascdist evaluate` writes its metrics by default."""
        return self.root / f"eval-{split}.json"

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step file in checkpoints/, oldest step first."""
        return step_files(self.checkpoints)

    def has_checkpoints(self) -> bool:
        return bool(self.step_files())

    @staticmethod
    def create_new(out_dir: str | Path, name: str) -> "RunLayout":
        """A fresh runs/<name>/<time>/, created here: two runs started in the same second get <time> and <time>-1."""
        parent, stamp = Path(out_dir) / name, time.strftime("%Y%m%d-%H%M%S")
        parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            root = parent / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                root.mkdir()
            except FileExistsError:
                continue
            return RunLayout(root)
        raise AssertionError("unreachable")

    @staticmethod
    def newest_with_checkpoints(out_dir: str | Path, name: str) -> "RunLayout | None":
        """The newest runs/<name>/<time>/ that holds a step file (what `--resume auto` continues)."""
        parent = Path(out_dir) / name
        if not parent.is_dir():
            return None
        runs = sorted(RunLayout(d) for d in parent.iterdir() if d.is_dir())
        runs = [r for r in runs if r.has_checkpoints()]
        return runs[-1] if runs else None

    def __lt__(self, other: "RunLayout") -> bool:
        return self.root < other.root


def saved_step_of(checkpoint: str | Path) -> int:
    """The step a step file's name gives (``step-00000040.pt`` -> 40); 0 for any other file name."""
    match = STEP_FILE.match(Path(checkpoint).name)
    return int(match.group(1)) if match else 0
