"""What a checkpoint file holds, read through one typed view: `SavedCheckpoint`.

A step file (``step-NNNNNNNN.pt``, ``best.pt``) is a dict of plain values so that ``torch.load(weights_only=True)``
reads it. Its keys are spelled here and nowhere else (`checkpoint_entries`, `reader_entries`, `DataInfo.entry_of`
and `EngineState.to_dict` write them; `SavedCheckpoint` reads them):

- ``engine``: `EngineState` (the model's weights, the optimiser's state or DeepSpeed's ZeRO stage and tag);
- ``scheduler``, ``loader``, ``rng``: state_dicts of the components a resume restores (opaque to readers);
- ``progress``: `Progress`, the loop's counters with the best step and what validation chose (thresholds,
  temperature);
- ``config``: the resolved config tree (`Config`);
- ``data``: `DataInfo`, what the model knows of its data;
- ``world_size``: how many ranks wrote it (DeepSpeed's partitions are per rank).

Resume (both engines), evaluate, predict, export and the benchmarks read a checkpoint as a `SavedCheckpoint`, once.
A file that is not a vascdist checkpoint (a bare state_dict, another program's file, a list) is refused in one
line naming the file and the missing entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vascdist.abstain import InputProfile, profile_from_info
from vascdist.config import Config, config_from_dict
from vascdist.data.provenance import Provenance, provenance_from_info
from vascdist.errors import VascdistError
from vascdist.train.checkpoint import load_file

if TYPE_CHECKING:
    from vascdist.data.transform import InputTransform

REQUIRED = ("engine", "config", "data")
"""What every vascdist checkpoint holds; evaluate and predict need no more (a resume needs RESUMABLE too)."""
RESUMABLE = ("scheduler", "loader", "rng")


@dataclass
class Progress:
    """Loop counters that a checkpoint restores."""
    step: int = 0
    epoch: int = 0
    best_metric: float = -math.inf
    best_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    bad_steps_total: int = 0
    val_thresholds: dict | None = None
    temperature: float = 1.0  # eval.calibrate=temperature: fitted on validation at the best step
    history: list = field(default_factory=list)
    finished: str = ""  # why training ended ('' while it goes on): a resume of a finished run tests, never trains on
    stopped_early: bool = False  # the end was early stopping (no longer step limit brings it back to training)

    @classmethod
    def from_saved(cls, saved: dict) -> Progress:
        """The counters a checkpoint recorded; a key this version does not keep is ignored, a missing one defaults
        (a checkpoint from before calibration has no temperature: 1.0)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def can_train_on(self, planned_steps: int) -> bool:
        """Whether a resumed run trains: not finished, or finished at a step limit that the resumed config raised."""
        return not self.finished or (not self.stopped_early and self.step < planned_steps)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in Progress.from_saved(state).__dict__.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class EngineState:
    """The engine's entry: full model weights (replicated under DDP and ZeRO 0-2), and either the optimiser's
    state_dict (TorchEngine) or the ZeRO stage and the tag directory holding the optimiser partitions
    (DeepSpeedEngine)."""
    name: str
    model: dict
    optimizer: dict | None = None
    zero_stage: int | None = None
    deepspeed_tag: str | None = None

    @classmethod
    def from_saved(cls, saved: Any, path: Path) -> EngineState:
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise VascdistError(f"{path}: not a vascdist checkpoint (no engine.model weights)")
        return cls(saved.get("engine", "ddp"), saved["model"], saved.get("optimizer"), saved.get("zero_stage"),
                   saved.get("deepspeed_tag"))

    def to_dict(self) -> dict:
        """The entry as saved (keys left out when they do not apply to this engine)."""
        out = {"model": self.model, "engine": self.name}
        extra = {"optimizer": self.optimizer, "zero_stage": self.zero_stage, "deepspeed_tag": self.deepspeed_tag}
        return {**out, **{k: v for k, v in extra.items() if v is not None}}


@dataclass(frozen=True)
class DataInfo:
    """What a model knows of the data it was trained on: the input's kind, classes and shape, the preprocessing
    that makes it and the train split's normalisation, and what predict abstains outside of (quality range,
    input profile) and prints (provenance)."""
    kind: str
    classes: list[str]
    sample_shape: tuple[int, ...]
    preprocess: dict
    normalization: dict
    quality_range: dict
    provenance: Provenance
    input_profile: InputProfile | None

    @classmethod
    def from_saved(cls, info: Any, path: Path) -> DataInfo:
        missing = [k for k in ("kind", "classes", "sample_shape", "preprocess", "normalization")
                   if not isinstance(info, dict) or k not in info]
        if missing:
            raise VascdistError(f"{path}: not a vascdist checkpoint (its data entry has no '{missing[0]}')")
        return cls(info["kind"], list(info["classes"]), tuple(info["sample_shape"]), info["preprocess"],
                   info["normalization"], dict(info.get("quality_range") or {}), provenance_from_info(info),
                   profile_from_info(info))

    @staticmethod
    def entry_of(index: dict) -> dict:
        """The data entry a run saves from its shard set's index: the shapes, the preprocessing, and what predict
        abstains outside of (abstain.py: the training recordings' input profile) and prints (provenance.py)."""
        from vascdist.abstain import input_profile
        from vascdist.data.provenance import provenance_of
        info = {k: index[k] for k in ("kind", "classes", "sample_shape", "preprocess", "normalization")}
        profile = input_profile([r for r in index.get("recordings", []) if r.get("split") == "train"])
        return {**info, "quality_range": index.get("quality_range", {}), "provenance": provenance_of(index).to_dict(),
                "input_profile": profile.to_dict() if profile else None}

    def input_transform(self, device: Any = "cpu") -> InputTransform:
        """The normalisation the model was trained behind (float16 spectrograms in, normalised float32 out)."""
        from vascdist.data.transform import InputTransform
        return InputTransform({"normalization": self.normalization, "sample_shape": list(self.sample_shape)}, device)


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint file, read once: the config it trained with, its data, progress and engine state, and the
    restore-only state (scheduler, loader, RNG; None in a file that holds only what inference needs)."""
    path: Path
    config: Config
    data: DataInfo
    progress: Progress
    engine: EngineState
    world_size: int | None = None
    scheduler: dict | None = None
    loader: dict | None = None
    rng: dict | None = None

    @classmethod
    def read(cls, path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> SavedCheckpoint:
        """Load `path`; VascdistError in one line naming the file if it does not load or is not a vascdist
        checkpoint."""
        path = Path(path)
        return cls.from_state(path, load_file(path, map_location, weights_only))

    @classmethod
    def from_state(cls, path: Path, state: dict) -> SavedCheckpoint:
        """The view of a state already loaded from `path`."""
        missing = [key for key in REQUIRED if key not in state]
        if missing:
            raise VascdistError(f"{path}: not a vascdist checkpoint (no '{missing[0]}' entry)")
        try:
            config = config_from_dict(state["config"])
        except VascdistError as exc:
            raise VascdistError(f"{path}: its config does not load in this version of vascdist ({exc})") from None
        progress = state.get("progress")
        return cls(path, config, DataInfo.from_saved(state["data"], path),
                   Progress.from_saved(progress if isinstance(progress, dict) else {}),
                   EngineState.from_saved(state["engine"], path), state.get("world_size"), state.get("scheduler"),
                   state.get("loader"), state.get("rng"))

    def require_resumable(self) -> None:
        """A resume restores scheduler, loader, RNG and progress: refuse a file without them in one line."""
        missing = [key for key in RESUMABLE if getattr(self, key) is None]
        if missing:
            raise VascdistError(f"checkpoint '{self.path}' cannot be resumed: it has no '{missing[0]}' entry (a file "
                                "written for inference, or by an older vascdist); evaluate or predict with it instead")

    @property
    def weights(self) -> dict:
        """The model's state_dict."""
        return self.engine.model

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def best_step(self) -> int:
        """The step of the best evaluation so far (-1 before the first)."""
        return self.progress.best_step

    @property
    def val_thresholds(self) -> dict:
        """{level: threshold, 'rule': how it was chosen} from validation; {} when none was chosen (multi-class)."""
        return self.progress.val_thresholds or {}

    @property
    def temperature(self) -> float:
        """The softmax temperature fitted on validation (eval.calibrate=temperature); 1.0 for none."""
        return float(self.progress.temperature)


def checkpoint_entries(engine: dict, scheduler: dict, loader: dict, rng: dict, progress: Progress,
                       for_readers: dict) -> dict:
    """The dict a step file holds (TrainState.state_dict): what a resume restores, then `for_readers`
    (reader_entries)."""
    return {"engine": engine, "scheduler": scheduler, "loader": loader, "rng": rng, "progress": progress.state_dict(),
            **for_readers}


def reader_entries(config: dict, data: dict, world_size: int) -> dict:
    """What a step file holds for its readers and a resume does not restore: the resolved config tree, the data
    entry (DataInfo.entry_of) and the number of ranks that wrote it."""
    return {"config": config, "data": data, "world_size": world_size}


def with_deepspeed_tag(state: dict, tag: str) -> dict:
    """A state to save (TrainState.state_dict) whose engine entry names the DeepSpeed tag directory `tag`: what the
    step file records once every partition of `tag` is on disk."""
    return {**state, "engine": {**state["engine"], "deepspeed_tag": tag}}


def saved_progress(state: dict | None) -> Progress | None:
    """The Progress of a loaded file that may not be a vascdist checkpoint (None then): for the checkpoint manager,
    which keeps files of any dict."""
    progress = state.get("progress") if isinstance(state, dict) else None
    return Progress.from_saved(progress) if isinstance(progress, dict) else None
