"""The run logger: TensorBoard event files in ``run_dir/tb`` and an append-only ``run_dir/metrics.jsonl``.

Nothing here imports ``torch.distributed``: the training loop builds the logger with ``enabled=is_main``, and
on every other rank each method is a no-op that touches neither the disk nor tensorboard.

``metrics.jsonl`` holds one JSON object per line, flushed as it is written, so a crash loses at most the line
being written; non-finite floats are written as null (the file stays valid JSON). A resumed run appends to
the same file, so a reader that wants one value per step keeps the last record of each (step, split).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vascdist.errors import VascdistError
from vascdist.eval.results import SplitReport
from vascdist.fileio import disk_full, disk_full_message, drop_partial_last_line
from vascdist.train.layout import RunLayout


def _quiet_disk_full_in_tensorboard(args) -> None:
    """threading.excepthook: TensorBoard's writer thread re-raises a write error, which would print a traceback;
    the error reaches RunLogger on its next call anyway (as one line), so that traceback is dropped."""
    if disk_full(args.exc_value) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _previous_excepthook(args)


_previous_excepthook = threading.excepthook


# --------------------------------------------------------------------------------------------- conversions
def jsonable(value: Any) -> Any:
    """`value` as plain JSON data: tensors and numpy values unpacked, NaN and +-inf as None, paths as str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(value.tolist())  # a 0-d tensor / numpy scalar gives a python number
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # a Path, an enum ...: readable rather than a crash in the middle of training


def flatten_hparams(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{'optim': {'lr': 0.1, 'betas': [0.9, 0.99]}} -> {'optim.lr': 0.1, 'optim.betas': '[0.9, 0.99]'}.

    TensorBoard's HParams plugin accepts only bool, number and string values: lists become JSON strings and
    None becomes 'None'.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_hparams(value, name))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(jsonable(value))
        else:
            flat[name] = str(value)
    return flat


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy() if values.is_floating_point() else values.detach().cpu().numpy()
    return np.asarray(values)


def normalise_per_image(batch: np.ndarray) -> np.ndarray:
    """Min-max scale each image of an (N, ...) float batch to [0, 1]; a constant image becomes all zeros."""
    batch = np.nan_to_num(batch.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    flat = batch.reshape(len(batch), -1)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    return ((flat - low) / np.where(span > 0, span, 1.0)).reshape(batch.shape)


# --------------------------------------------------------------------------------------------- logger
class RunLogger:
    """TensorBoard + metrics.jsonl for one run; every method is a no-op when `enabled` is False or after close.

    `purge_step`: when resuming at step T, TensorBoard hides the events of the earlier attempt at steps >= T.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: ranks that do not log never import tensorboard

        if threading.excepthook is not _quiet_disk_full_in_tensorboard:
            threading.excepthook = _quiet_disk_full_in_tensorboard
        layout = RunLayout(self.run_dir)
        self._tb, self._jsonl_path = layout.tensorboard, layout.metrics
        with self._writing(self._tb):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self._tb), purge_step=purge_step)
        with self._writing(self._jsonl_path):
            dropped = drop_partial_last_line(self._jsonl_path)  # a kill or a full disk cut the last line short
            if dropped:
                print(f"{self._jsonl_path}: removed a half-written last line ({dropped} bytes)", file=sys.stderr,
                      flush=True)
            self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """An OSError while writing `path` (a full disk above all) -> one-line VascdistError naming it. The
        logger then closes what it can and goes inactive: a later close() in a `finally` stays quiet."""
        try:
            yield
        except OSError as exc:
            writer, jsonl = self._writer, self._jsonl
            self._writer, self._jsonl = None, None
            for f in (writer, jsonl):
                try:
                    if f is not None:
                        f.close()
                except Exception:  # the same full disk again; the first error is the one reported
                    pass
            if disk_full(exc):
                raise VascdistError(disk_full_message(path)) from None
            raise VascdistError(f"{path}: cannot write ({exc.strerror or exc})") from None

    @property
    def active(self) -> bool:
        """True while this logger writes (enabled and not closed)."""
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """One TensorBoard scalar per tag; values may be python, numpy or 0-d tensor numbers (NaN allowed)."""
        if not self.active:
            return
        for tag, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise VascdistError(f"RunLogger.scalars: value of '{tag}' is a {type(value).__name__}, "
                                    "not a number") from None
            with self._writing(self._tb):
                self._writer.add_scalar(tag, number, step)

    def jsonl(self, record: dict[str, Any]) -> None:
        """Append `record` (with a 'time' in unix seconds unless it has one) as one line of metrics.jsonl."""
        if not self.active:
            return
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        with self._writing(self._jsonl_path):
            self._jsonl.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
            self._jsonl.flush()

    def image(self, tag: str, step: int, hwc_uint8: Any) -> None:
        """One (H, W, C) uint8 image, C in 1, 3, 4 (an (H, W) array is taken as grey)."""
        if not self.active:
            return
        img = _to_numpy(hwc_uint8)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise VascdistError(f"RunLogger.image '{tag}': expected (H, W, C) uint8 with C in 1, 3, 4, got "
                                f"{img.dtype} {img.shape}")
        with self._writing(self._tb):
            self._writer.add_image(tag, img, step, dataformats="HWC")

    def images(self, tag: str, step: int, batch: Any) -> None:
        """A grid (8 per row) of an (N, C, H, W) float batch, each image min-max scaled to its own range.

        C = 1 is grey and C = 3 is RGB; any other channel count shows every channel as its own grey tile.
        Slice the batch first: every image given is drawn.
        """
        if not self.active:
            return
        x = _to_numpy(batch)
        if x.ndim != 4 or len(x) == 0:
            raise VascdistError(f"RunLogger.images '{tag}': expected a non-empty (N, C, H, W) batch, got {x.shape}")
        x = normalise_per_image(x)  # (N, C, H, W) in [0, 1]
        if x.shape[1] not in (1, 3):
            x = x.reshape(-1, 1, *x.shape[2:])  # (N * C, 1, H, W)
        with self._writing(self._tb):
            self._writer.add_images(tag, x, step, dataformats="NCHW")

    def pr_curve(self, tag: str, step: int, labels: Any, pos_scores: Any, num_thresholds: int = 127) -> None:
        """Precision-recall curve of binary `labels` (0/1) against positive-class probabilities in [0, 1]."""
        if not self.active:
            return
        y = _to_numpy(labels).reshape(-1)
        p = _to_numpy(pos_scores).astype(np.float64).reshape(-1)
        if y.shape != p.shape:
            raise VascdistError(f"RunLogger.pr_curve '{tag}': {y.size} labels but {p.size} scores")
        if not np.isin(y, (0, 1)).all():
            raise VascdistError(f"RunLogger.pr_curve '{tag}': labels must be 0/1, got {np.unique(y)[:5].tolist()}")
        if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise VascdistError(f"RunLogger.pr_curve '{tag}': scores must be probabilities in [0, 1] "
                                "(apply softmax/sigmoid first)")
        with self._writing(self._tb):
            self._writer.add_pr_curve(tag, y.astype(np.int64), p, step, num_thresholds=num_thresholds)

    def hparams(self, hparam_dict: dict, metric_dict: dict[str, float], step: int = 0) -> None:
        """Record the (nested) config and final metrics for TensorBoard's HParams tab, in this run's event file.

        The metrics are also written as scalars at `step`, under their own tags (e.g. 'final/...').
        """
        if not self.active:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metrics = {k: float(v) for k, v in metric_dict.items()}
        # SummaryWriter.add_hparams would write into a new sub-run named by the time; keep it in this run.
        file_writer = self._writer._get_file_writer()
        with self._writing(self._tb):
            for summary in hparams_summaries(flatten_hparams(hparam_dict), metrics):
                file_writer.add_summary(summary, step)
        self.scalars(step, metrics)

    def close(self) -> None:
        """Flush and close both files; later calls on this logger do nothing. Safe to call twice, and quiet
        after a write error was raised (one line) by an earlier call."""
        if not self.active:
            return
        with self._writing(self._tb):
            self._writer.close()
        with self._writing(self._jsonl_path):
            self._jsonl.close()
        self._writer, self._jsonl = None, None


def log_report(log: RunLogger, step: int, report: SplitReport, arrays: dict[str, np.ndarray], per_beat: bool,
               save_dir: str | Path | None = None, **fields: Any) -> None:
    """A split's report at `step`: TensorBoard scalars '<split>/<key>' (value), '<split>/<key>/lo|hi' and the
    calibration, the image '<split>/reliability', and one metrics.jsonl record (the report's JSON form, `fields`
    beside it). With `save_dir` (the main rank's run directory) also <split>_reliability.png and the predictions,
    <split>_predictions.npz (probs, y, recording, patient; what `vascdist cv` pools and the report plots). The
    figure's title names the report's own step (the best checkpoint's, for the test) when it has one."""
    from vascdist import plots
    from vascdist.eval.assess import level_arrays, reliability_image, save_predictions
    split = report.split
    log.scalars(step, {f"{split}/{k}": v for k, v in report.scalars().items()})
    if log.active or save_dir is not None:
        what = "best checkpoint, " if report.step is not None else ""
        figure = reliability_image(level_arrays(arrays, per_beat), report,
                                   f"{split}: reliability ({what}step {step if report.step is None else report.step})")
        log.image(f"{split}/reliability", step, plots.rgb_array(figure))
        if save_dir is not None:
            layout = RunLayout(save_dir)
            plots.save_png(figure, layout.reliability(split))
            save_predictions(layout.predictions(split), arrays)
    log.jsonl({"step": step, **fields, "split": split, **report.to_record()})
