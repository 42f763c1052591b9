"""`vascdist evaluate` and `vascdist predict`: models from checkpoints, applied to shards or to WAV files."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vascdist.abstain import AbstainRule
from vascdist.config import Config, PreprocessConfig, config_from_dict, from_dict
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.integrity import check_shard_set
from vascdist.data.provenance import Provenance, provenance_from_info
from vascdist.data.transform import InputTransform
from vascdist.dist import DistEnv
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json
from vascdist.models import build_model
from vascdist.train.checkpoint import load_file
from vascdist.train.layout import RunLayout
from vascdist.train.state import find_checkpoint, model_weights

if TYPE_CHECKING:
    from vascdist.eval.results import SplitReport


def checkpoint_state(checkpoint: Path) -> dict:
    """A checkpoint's saved state (VascdistError naming the file if it does not load)."""
    return load_file(checkpoint)


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, dict, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    state = checkpoint_state(checkpoint)
    for key in ("engine", "config", "data"):
        if key not in state:
            raise VascdistError(f"{checkpoint}: not a vascdist checkpoint (no '{key}')")
    cfg = config_from_dict(state["config"])
    info = state["data"]
    model = build_model(cfg.model, len(info["classes"]), tuple(info["sample_shape"]))
    try:
        model.load_state_dict(model_weights(state))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise VascdistError(f"{checkpoint}: weights do not fit model '{cfg.model.name}' ({first})") from None
    model.eval()
    return model, state, cfg


def check_compatible(info: dict, index: dict, shards: Path, checkpoint: Path) -> None:
    for key in ("kind", "classes", "sample_shape"):
        if info[key] != index[key]:
            raise VascdistError(f"{shards}: {key} {index[key]} does not match the checkpoint {checkpoint} ({info[key]})")
    if info["preprocess"] != index["preprocess"]:
        changed = sorted(k for k in set(info["preprocess"]) | set(index["preprocess"])
                         if info["preprocess"].get(k) != index["preprocess"].get(k))
        raise VascdistError(f"{shards}: preprocessed with other parameters than the checkpoint {checkpoint} "
                            f"(differs in: {', '.join(changed)})")


@dataclass(frozen=True)
class Evaluation:
    """What `vascdist evaluate` made: the split's report, the run's best step (the table's header), where the run and
    the checkpoint are, what the model was trained on, and the files written."""

    report: SplitReport
    best_step: int
    run_dir: Path
    checkpoint: Path
    provenance: str
    json: Path
    png: Path


def evaluate_checkpoint(run_or_ckpt: str, shards: str | None = None, split: str = "test",
                        out: str | None = None) -> Evaluation:
    """Metrics of a checkpoint on a split, at the thresholds it chose on validation; writes JSON and a PNG."""
    from vascdist import plots
    from vascdist.eval.assess import applied_report, validation_report
    from vascdist.eval.calibration import with_temperature
    from vascdist.eval.evaluate import predict_arrays
    checkpoint = find_checkpoint(run_or_ckpt)
    model, state, cfg = load_model(checkpoint)
    shards_dir = Path(shards or cfg.data.shards)
    index = check_shard_set(shards_dir)  # as training checks at start; the reader verifies every chunk it reads
    check_compatible(state["data"], index, shards_dir, checkpoint)
    # A cross-validation fold's run evaluates its own patients (data.split_file) unless other shards are given.
    stream_split_file = "" if shards else cfg.data.split_file
    stream = ShardStream(shards_dir, split, cfg.data.batch_size, train=False, split_file=stream_split_file)
    arrays = predict_arrays(model, StreamingLoader(stream), DistEnv())
    per_beat = index["kind"] == "beats"
    if split == "val":  # thresholds chosen on this split itself, by the run's rule (after its temperature)
        arrays = with_temperature(arrays, checkpoint_temperature(state))
        arrays, report, _ = validation_report(arrays, index["classes"], per_beat,
                                              replace(cfg.eval, calibrate="none"), calibration_intervals=True)
    else:
        arrays, report = applied_report(split, arrays, index["classes"], per_beat,
                                        state["progress"].get("val_thresholds"), checkpoint_temperature(state), cfg.eval)
    if index["kind"] == "spectrogram":
        report = with_excluded_and_sites(report, arrays, index, shards_dir, stream_split_file, cfg)
    layout = RunLayout(checkpoint.parent.parent)  # checkpoints/<file> -> the run directory
    out_path = Path(out) if out else layout.eval_json(split)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, report.to_record())
    level = "cycle" if index["kind"] == "beats" else "recording"
    plots.save_png(plots.confusion(np.array(report.confusion[level]), index["classes"],
                                   f"{split}, per {level} ({checkpoint.name}, "
                                   f"step {state['progress'].get('step', '?')})"),
                   out_path.with_suffix(".png"))
    return Evaluation(report, state["progress"].get("best_step", -1), layout.root, checkpoint,
                      provenance_from_info(state["data"]).describe(), out_path, out_path.with_suffix(".png"))


def with_excluded_and_sites(report: SplitReport, arrays: dict[str, np.ndarray], index: dict, shards_dir: Path,
                            split_file: str, cfg: Config) -> SplitReport:
    """The report with what preprocessing excluded from its split and the metrics per site (at the split's
    thresholds: its own, on val)."""
    from vascdist.data.folds import split_index
    from vascdist.data.shards import excluded_counts
    from vascdist.eval.results import Excluded
    from vascdist.eval.sites import split_sites
    excluded = Excluded.from_fields(excluded_counts(split_index(shards_dir, split_file), report.split))
    return report.with_excluded(excluded).with_sites(split_sites(arrays, index, report.thresholds, cfg.eval))


def checkpoint_temperature(state: dict) -> float:
    """The softmax temperature fitted on validation (eval.calibrate=temperature); 1.0 for none or older runs."""
    return float(state["progress"].get("temperature", 1.0))


def calibrated(probs: np.ndarray, state: dict) -> np.ndarray:
    """Probabilities after the checkpoint's temperature scaling (unchanged when it has none)."""
    from vascdist.eval.calibration import apply_temperature
    return apply_temperature(probs, checkpoint_temperature(state)).astype(np.float32)


def predict(checkpoint: str, files: list[str], patients: dict[str, str], skipped: list[dict] | None = None,
            rule: AbstainRule | None = None) -> tuple[list[dict], list[dict], Provenance]:
    """`vascdist predict`: each recording's result (predict_files) and, for the files with a patient id, the
    patients' verdicts (patient_verdicts), and what the model was trained on; the checkpoint is read once."""
    path = find_checkpoint(checkpoint)
    loaded = load_model(path)
    results = predict_files(path, files, skipped, rule, loaded=loaded)
    state = loaded[1]
    thresholds = state.get("progress", {}).get("val_thresholds") or {}
    verdicts = patient_verdicts(results, patients, state["data"]["classes"], thresholds.get("patient")) \
        if patients else []
    return results, verdicts, provenance_from_info(state["data"])


@torch.no_grad()
def predict_files(checkpoint: str | Path, files: list[str], skipped: list[dict] | None = None,
                  rule: AbstainRule | None = None, abstain: bool = True,
                  loaded: tuple[torch.nn.Module, dict, Config] | None = None) -> list[dict]:
    """Per recording: the verdict, or none with the reasons (abstain.py), and per-cycle probabilities, with the
    checkpoint's own preprocessing (`loaded`: load_model's result for it, when the caller has it already).

    A file that cannot be read (missing, unreadable, silent) raises VascdistError naming it; when a `skipped` list
    is given it is appended there as {'file', 'reason'} instead and the other files go on. A recording that is read
    but unlike the training recordings gets `verdict` None, `probabilities` None and its `reasons`; with `abstain`
    False (for studies of the model itself, e.g. of its gain invariance) every analysed recording gets a verdict.
    """
    from vascdist.abstain import abstain_reasons
    from vascdist.data.spectrogram import input_features
    from vascdist.data.audio import NoSignal, load_audio_stats
    from vascdist.data.preprocess import analyse_recording
    rule = rule or AbstainRule()
    path = find_checkpoint(checkpoint)
    model, state, _ = loaded or load_model(path)
    info = state["data"]
    if info["kind"] != "spectrogram":
        raise VascdistError(f"{path}: predict takes recordings, but this model was trained on {info['kind']}")
    pcfg = from_dict(PreprocessConfig, info["preprocess"], "preprocess")
    inputs = InputTransform(info)
    classes = info["classes"]
    thresholds = state["progress"].get("val_thresholds") or {}
    demonstration = provenance_from_info(info).demonstration
    results = []
    for file in files:
        try:
            signal, stats = load_audio_stats(file, pcfg.audio)
        except NoSignal as exc:  # a recording, but silent or empty: nothing to give a verdict on
            results.append(_no_verdict(file, [str(exc).removeprefix(f"{file}: ")], {}, state, demonstration))
            continue
        except VascdistError as exc:
            if skipped is None:
                raise
            skipped.append({"file": str(file), "reason": str(exc)})
            continue
        try:
            spec, cycles, quality = analyse_recording(signal, pcfg, stats)
        except VascdistError as exc:  # no cycle window at all: nothing to give a verdict on
            results.append(_no_verdict(file, [str(exc).removeprefix(f"{file}: ")], {}, state, demonstration))
            continue
        reasons = abstain_reasons(quality, len(spec), input_features(spec), info, pcfg.audio, rule, stats.synthetic)
        if reasons and abstain:
            results.append(_no_verdict(file, reasons, quality, state, demonstration))
            continue
        x = inputs(torch.from_numpy(spec.astype(np.float16)))  # float16 as stored in shards, then as in training
        probs = calibrated(torch.softmax(model(x).float(), dim=1).numpy(), state)
        mean_probs = probs.mean(axis=0)
        source = "validation" if "recording" in thresholds else "default"
        if len(classes) == 2:
            threshold = float(thresholds.get("recording", 0.5))
            verdict = classes[1] if mean_probs[1] >= threshold else classes[0]
        else:
            threshold, verdict = None, classes[int(mean_probs.argmax())]
        results.append({"file": str(file), "verdict": verdict, "reasons": [],
                        "probabilities": dict(zip(classes, mean_probs.tolist())),
                        "threshold": threshold, "threshold_source": source if threshold is not None else None,
                        "threshold_rule": thresholds.get("rule") if threshold is not None else None,
                        "temperature": checkpoint_temperature(state), "demonstration_model": demonstration,
                        **quality_fields(quality), "cycles": [
                            {"cycle": int(c), "probabilities": dict(zip(classes, p.tolist()))} for c, p in zip(cycles, probs)]})
    return results


def _no_verdict(file, reasons: list[str], quality: dict, state: dict, demonstration: bool) -> dict:
    """A prediction without a verdict: no probabilities either, so that no script averages them by mistake."""
    return {"file": str(file), "verdict": None, "reasons": reasons, "probabilities": None, "threshold": None,
            "threshold_source": None, "threshold_rule": None, "temperature": checkpoint_temperature(state),
            "demonstration_model": demonstration, **quality_fields(quality), "cycles": []}


def quality_fields(quality: dict) -> dict:
    """A prediction's `quality` record and its `warnings` (reasons to look twice that withhold no verdict)."""
    from vascdist.data.quality import quality_warnings
    return {"quality": quality, "warnings": quality_warnings(quality)}


def patient_verdicts(results: list[dict], patients: dict[str, str], classes: list[str],
                     threshold: float | None) -> list[dict]:
    """Patient-level verdicts: a patient's probabilities are the mean over their recordings that got a verdict
    (as in evaluation), compared with the checkpoint's patient-level threshold (two classes) or arg-maxed. The
    recordings without a verdict are named in `left_out`; a patient with none left gets no verdict either.

    `patients` maps a result's file to its patient id; files without one are left out.
    """
    by_patient: dict[str, list[dict]] = {}
    for r in results:
        if r["file"] in patients:
            by_patient.setdefault(patients[r["file"]], []).append(r)
    verdicts = []
    for patient, recs in sorted(by_patient.items()):
        used = [r for r in recs if r["verdict"] is not None]
        left_out = [r["file"] for r in recs if r["verdict"] is None]
        entry = {"patient": patient, "recordings": [r["file"] for r in used], "left_out": left_out,
                 "warnings": sum(len(r.get("warnings", [])) for r in used)}
        if not used:
            verdicts.append({**entry, "verdict": None, "probabilities": None, "threshold": None,
                             "reasons": ["no recording of this patient got a verdict"]})
            continue
        mean = np.mean([[r["probabilities"][c] for c in classes] for r in used], axis=0)
        if len(classes) == 2:
            cut = 0.5 if threshold is None else threshold
            verdict = classes[1] if mean[1] >= cut else classes[0]
        else:
            cut, verdict = None, classes[int(mean.argmax())]
        verdicts.append({**entry, "verdict": verdict, "probabilities": dict(zip(classes, mean.tolist())),
                         "threshold": cut, "reasons": []})
    return verdicts


def manifest_patients(manifest: str) -> dict[str, str]:
    """{recording path as given in the manifest, resolved against its folder: patient id} of a manifest CSV."""
    import csv
    root = Path(manifest).parent
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames or "patient_id" not in reader.fieldnames:
            raise VascdistError(f"{manifest}: needs the columns path and patient_id")
        return {str(root / row["path"]): row["patient_id"].strip() for row in reader}


def resolve_patients(files: list[str], manifest: str | None, patient: str | None) -> tuple[list[str], dict[str, str]]:
    """predict's files and {file: patient id}: from a manifest (whose recordings are the files when none are
    given), or one patient id for all files."""
    files = list(files)
    if manifest:
        listed = manifest_patients(manifest)
        if not files:
            files = list(listed)
        resolved = {f: str(Path(f).resolve()) for f in files}
        by_resolved = {str(Path(k).resolve()): v for k, v in listed.items()}
        patients = {f: by_resolved[resolved[f]] for f in files if resolved[f] in by_resolved}
    elif patient:
        patients = {f: patient for f in files}
    else:
        patients = {}
    if not files:
        raise VascdistError("predict: no recordings given (pass FILES or --manifest)")
    return files, patients


def decision_rule(result: dict) -> str:
    """The line that says how predict turned probabilities into verdicts: the threshold, where it came from and
    by which rule (eval.threshold), and the temperature the probabilities were scaled by (eval.calibrate)."""
    classes = list(result["probabilities"])
    temperature = float(result.get("temperature", 1.0))
    scaled = f"; probabilities after temperature scaling, T = {temperature:.3f}" if temperature != 1.0 else ""
    if result["threshold"] is None:
        return f"verdict: the class of highest mean probability ({', '.join(classes)}){scaled}"
    where = "chosen on the validation set" if result.get("threshold_source") == "validation" else \
        "the default: this checkpoint holds no validation threshold"
    rule = f", rule {result['threshold_rule'].removesuffix(' on validation')}" if result.get("threshold_rule") else ""
    return (f"verdict: {classes[1]} when the mean P({classes[1]}) over cycles >= {result['threshold']:.3f} "
            f"(threshold {where}{rule}{scaled})")
