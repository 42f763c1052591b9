"""The names inside a run directory and a cross-validation directory: the one module that spells them, importable
without torch (the CLI, `vascdist cv` and `vascdist report` read run directories before, or without, loading torch).

    RUN/config.yaml              the resolved config the run started with (config/drift.py reads and extends it)
    RUN/config_history.jsonl     one line per resume that changed a safe key
    RUN/metrics.jsonl            one JSON record per logged train step, validation and test
    RUN/tb/                      TensorBoard events
    RUN/test_metrics.json        the test table with {value, lo, hi} per metric
    RUN/test_confusion.png       RUN/test_reliability.png  RUN/test_predictions.npz   (SPLIT_* for any split)
    RUN/report.html              `vascdist report RUN`
    RUN/eval-SPLIT.json          `vascdist evaluate RUN --split SPLIT`
    RUN/export/model.onnx, model_card.json   `vascdist export RUN`
    RUN/checkpoints/step-00000040.pt, best.pt, deepspeed/step-00000040/   (train/state.py keeps them consistent)
    RUN/.lock                    flock'ed by the one training writing RUN (vascdist.lockfile: pid, host, start time)

    CV/cv.json                   the plan: config, overrides, folds, their patients and run directories
    CV/splits/r0-f1.json         each fold's split file;  CV/r0-f1/  each fold's run directory (a RUN above)
    CV/failures.json             folds that did not finish, with the reason
    CV/aggregate.json            CV/report.html   CV/submitit/  (`vascdist cv --submit`'s logs and code snapshot)
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

CONFIG_FILE = "config.yaml"  # the resolved config the run started with
HISTORY_FILE = "config_history.jsonl"  # one line per resume that changed a safe key
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
STEP_TAG = re.compile(r"^step-(\d+)$")  # step_stem's names: a DeepSpeed tag directory
BEST_FILE = "best.pt"
DEEPSPEED_DIR = "deepspeed"  # checkpoints/deepspeed/<step_stem>/: DeepSpeed's own files of a step


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
        self.history = self.root / HISTORY_FILE
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tb"
        self.test_metrics = self.root / "test_metrics.json"
        self.test_confusion = self.confusion("test")
        self.test_reliability = self.reliability("test")
        self.test_predictions = self.predictions("test")
        self.report = self.root / "report.html"
        self.checkpoints = self.root / "checkpoints"
        self.lock = self.root / ".lock"
        self.export = self.root / "export"

    def confusion(self, split: str) -> Path:
        return self.root / f"{split}_confusion.png"

    def reliability(self, split: str) -> Path:
        """The split's reliability diagram (eval.assess writes it)."""
        return self.root / f"{split}_reliability.png"

    def predictions(self, split: str) -> Path:
        """The split's predictions (probs, y, recording, patient): what `vascdist cv` pools and the report plots."""
        return self.root / f"{split}_predictions.npz"

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


class CvLayout:
    """Paths inside one cross-validation directory (no I/O on construction)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.plan = self.root / "cv.json"
        self.failures = self.root / "failures.json"
        self.aggregate = self.root / "aggregate.json"
        self.report = self.root / "report.html"
        self.splits = self.root / "splits"
        self.submitit = self.root / "submitit"

    def split_file(self, fold: str) -> Path:
        """Fold `fold`'s split file (JSON of patient ids per split)."""
        return self.splits / f"{fold}.json"

    def fold(self, fold_dir: str) -> RunLayout:
        """The run directory of a fold (its plan entry's 'dir')."""
        return RunLayout(self.root / fold_dir)

    @staticmethod
    def is_cv_dir(path: str | Path) -> bool:
        """Whether `path` is a directory made by `vascdist cv` (it holds the plan)."""
        return CvLayout(path).plan.is_file()
