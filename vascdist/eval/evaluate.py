"""Running a model over a split and turning its outputs into metrics (used by the loop and `vascdist evaluate`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vascdist.data.loader import StreamingLoader
from vascdist.data.transform import InputTransform
from vascdist.dist import DistEnv, gather_arrays
from vascdist.eval.metrics import evaluate_levels, split_counts
from vascdist.eval.thresholds import ThresholdRule, resolve
from vascdist.train.precision import autocast_context


@torch.no_grad()
def predict_arrays(model: nn.Module, loader: StreamingLoader, env: DistEnv, precision: str = "fp32",
                   channels_last: bool = False) -> dict[str, np.ndarray]:
    """Class probabilities and ids for every sample of the loader's split, gathered from all ranks."""
    was_training = model.training
    model.eval()
    inputs = InputTransform(loader.stream.index, env.device, channels_last)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("probs", "y", "recording", "patient", "position")}
    for batch in loader:
        with autocast_context(precision, env.device):
            logits = model(inputs(batch["x"]))
        parts["probs"].append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        for k in ("y", "recording", "patient", "position"):
            parts[k].append(batch[k].numpy())
    model.train(was_training)
    arrays = {k: (np.concatenate(v) if v else np.zeros((0,), np.int64)) for k, v in parts.items()}
    if not parts["probs"]:
        arrays["probs"] = np.zeros((0, len(loader.stream.index["classes"])), np.float32)
    arrays = gather_arrays(arrays, env)
    order = np.argsort(arrays["position"], kind="stable")  # the same order whatever the world size
    return {k: v[order] for k, v in arrays.items()}


def validation_loss(arrays: dict[str, np.ndarray]) -> float:
    """Mean negative log-probability of the true class over all samples (cycles): the tie-breaker of model
    selection when the selection metric saturates (NaN for an empty split)."""
    if not len(arrays["y"]):
        return math.nan
    p = arrays["probs"][np.arange(len(arrays["y"])), arrays["y"].astype(np.int64)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def improves(value: float, loss: float, best_value: float, best_loss: float) -> bool:
    """Whether a validation result beats the best so far: a higher metric, or the same metric (a saturated
    one: balanced accuracy 1.000 at every evaluation) at a lower validation loss."""
    if value > best_value:
        return True
    return value == best_value and not math.isnan(loss) and loss < best_loss


def split_metrics(arrays: dict[str, np.ndarray], classes: list[str], per_beat: bool,
                  thresholds: dict[str, float] | None = None, rule: ThresholdRule | None = None,
                  min_patients: int = 0) -> dict:
    """Metrics per cycle, recording and patient (per beat only for beat shards).

    Binary without `thresholds` (validation): each level's threshold by `rule` (default Youden), or 0.5 when the
    split has fewer than `min_patients` patients of a class; 'threshold_rule' says which. With `thresholds`
    (chosen on validation, see metrics.thresholds_from) they are applied unchanged and their rule carried along.
    """
    rule = rule or ThresholdRule()
    if per_beat:
        ids = np.arange(len(arrays["y"]))
        recording, patient = ids, ids
    else:
        recording, patient = arrays["recording"], arrays["patient"]
    note = None
    if len(classes) == 2 and thresholds is None:
        counts = split_counts(arrays, classes, per_beat)
        rule, note = resolve(rule, counts["cycles" if per_beat else "patients"], min_patients)
    elif thresholds is not None:
        note = thresholds.get("rule")
    results = evaluate_levels(arrays["probs"], arrays["y"], recording, patient, classes, thresholds, rule.choose)
    if per_beat:
        results = {k: v for k, v in results.items() if k.startswith("cycle/")}
    if note is not None:
        results["threshold_rule"] = note
    return results
