"""`vascdist evaluate` and `vascdist predict`: models from checkpoints, applied to shards or to WAV files."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vascdist.abstain import AbstainRule
from vascdist.config import Config, PreprocessConfig, from_dict
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.integrity import check_shard_set
from vascdist.data.provenance import Provenance
from vascdist.data.transform import InputTransform
from vascdist.dist import DistEnv
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json
from vascdist.models import build_model
from vascdist.train.layout import RunLayout
from vascdist.train.saved import DataInfo, SavedCheckpoint
from vascdist.train.state import open_checkpoint

if TYPE_CHECKING:
    from vascdist.eval.results import SplitReport


def load_model(ckpt: SavedCheckpoint) -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights (in eval mode)."""
    model = build_model(ckpt.config.model, len(ckpt.data.classes), ckpt.data.sample_shape)
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise VascdistError(f"{ckpt.path}: weights do not fit model '{ckpt.config.model.name}' ({first})") from None
    model.eval()
    return model


def check_compatible(info: DataInfo, index: dict, shards: Path, checkpoint: Path) -> None:
    """VascdistError unless the shard set `index` describes is the kind of data the checkpoint's model reads."""
    ours = {"kind": info.kind, "classes": list(info.classes), "sample_shape": list(info.sample_shape)}
    for key, value in ours.items():
        if value != index[key]:
            raise VascdistError(f"{shards}: {key} {index[key]} does not match the checkpoint {checkpoint} ({value})")
    if info.preprocess != index["preprocess"]:
        changed = sorted(k for k in set(info.preprocess) | set(index["preprocess"])
                         if info.preprocess.get(k) != index["preprocess"].get(k))
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
    provenance: Provenance
    json: Path
    png: Path


def refuse_a_live_run(run: str | Path) -> None:
    """VascdistError if `run` is a run directory still training (its best.pt is still changing, and evaluate may
    repair it)."""
    from vascdist.lockfile import holder
    layout = RunLayout(run)
    training = holder(layout.lock) if layout.root.is_dir() else None
    if training is not None:
        files = layout.step_files()
        example = f" (e.g. {files[-1][1]})" if files else ""
        raise VascdistError(f"{run}: still training ({training}); wait for it to end, or evaluate one of its step "
                            f"files explicitly{example}")


def evaluate_checkpoint(run_or_ckpt: str, shards: str | None = None, split: str = "test",
                        out: str | None = None) -> Evaluation:
    """Metrics of a checkpoint on a split, at the thresholds it chose on validation; writes JSON and a PNG."""
    refuse_a_live_run(run_or_ckpt)
    ckpt = open_checkpoint(run_or_ckpt)
    model, cfg = load_model(ckpt), ckpt.config
    shards_dir = Path(shards or cfg.data.shards)
    index = check_shard_set(shards_dir)  # as training checks at start; the reader verifies every chunk it reads
    check_compatible(ckpt.data, index, shards_dir, ckpt.path)
    # A cross-validation fold's run evaluates its own patients (data.split_file) unless other shards are given.
    split_file = "" if shards else cfg.data.split_file
    report = _split_report(ckpt, model, index, shards_dir, split, split_file)
    layout = RunLayout(ckpt.path.parent.parent)  # checkpoints/<file> -> the run directory
    out_path = Path(out) if out else layout.eval_json(split)
    _write_evaluation(ckpt, index, report, out_path)
    return Evaluation(report, ckpt.best_step, layout.root, ckpt.path, ckpt.data.provenance, out_path,
                      out_path.with_suffix(".png"))


def _split_report(ckpt: SavedCheckpoint, model: torch.nn.Module, index: dict, shards_dir: Path, split: str,
                  split_file: str) -> SplitReport:
    """The checkpoint's model on `split`: on val at thresholds chosen there by the run's rule (after its
    temperature), otherwise at the run's validation thresholds; with exclusions and per-site metrics."""
    from vascdist.eval.assess import applied_report, validation_report
    from vascdist.eval.calibration import with_temperature
    from vascdist.eval.evaluate import predict_arrays
    cfg = ckpt.config
    stream = ShardStream(shards_dir, split, cfg.data.batch_size, train=False, split_file=split_file)
    arrays = predict_arrays(model, StreamingLoader(stream), DistEnv())
    per_beat = index["kind"] == "beats"
    if split == "val":
        arrays = with_temperature(arrays, ckpt.temperature)
        arrays, report, _ = validation_report(arrays, index["classes"], per_beat,
                                              replace(cfg.eval, calibrate="none"), calibration_intervals=True)
    else:
        arrays, report = applied_report(split, arrays, index["classes"], per_beat, ckpt.progress.val_thresholds,
                                        ckpt.temperature, cfg.eval)
    if index["kind"] == "spectrogram":
        report = with_excluded_and_sites(report, arrays, index, shards_dir, split_file, cfg)
    return report


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


def _write_evaluation(ckpt: SavedCheckpoint, index: dict, report: SplitReport, out_path: Path) -> None:
    """evaluate's files: the report's JSON and the confusion matrix PNG beside it."""
    from vascdist import plots
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, report.to_record())
    level = "cycle" if index["kind"] == "beats" else "recording"
    plots.save_png(plots.confusion(np.array(report.confusion[level]), index["classes"],
                                   f"{report.split}, per {level} ({ckpt.path.name}, step {ckpt.step})"),
                   out_path.with_suffix(".png"))


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after a checkpoint's temperature scaling (SavedCheckpoint.temperature; unchanged at 1.0)."""
    from vascdist.eval.calibration import apply_temperature
    return apply_temperature(probs, temperature).astype(np.float32)


def decide(mean_probs: np.ndarray, classes: list[str], threshold: float | None) -> tuple[float | None, str]:
    """(the threshold applied, the verdict): with two classes the second when its mean probability reaches the
    threshold (0.5 when the checkpoint chose none), otherwise the class of the largest mean probability."""
    if len(classes) == 2:
        cut = 0.5 if threshold is None else float(threshold)
        return cut, classes[1] if mean_probs[1] >= cut else classes[0]
    return None, classes[int(mean_probs.argmax())]


def predict(checkpoint: str, files: list[str], patients: dict[str, str], skipped: list[dict] | None = None,
            rule: AbstainRule | None = None) -> tuple[list[dict], list[dict], Provenance]:
    """`vascdist predict`: each recording's result (predict_files) and, for the files with a patient id, the
    patients' verdicts (patient_verdicts), and what the model was trained on; the checkpoint is read once."""
    ckpt = open_checkpoint(checkpoint)
    results = predict_files(ckpt, files, skipped, rule)
    verdicts = patient_verdicts(results, patients, ckpt.data.classes, ckpt.val_thresholds.get("patient")) \
        if patients else []
    return results, verdicts, ckpt.data.provenance


def predict_files(checkpoint: str | Path | SavedCheckpoint, files: list[str], skipped: list[dict] | None = None,
                  rule: AbstainRule | None = None, abstain: bool = True) -> list[dict]:
    """Per recording: the verdict, or none with the reasons (abstain.py), and per-cycle probabilities, with the
    checkpoint's own preprocessing (`checkpoint`: a file, a run directory, or one already read).

    A file that cannot be read (missing, unreadable, silent) raises VascdistError naming it; when a `skipped` list
    is given it is appended there as {'file', 'reason'} instead and the other files go on. A recording that is read
    but unlike the training recordings gets `verdict` None, `probabilities` None and its `reasons`; with `abstain`
    False (for studies of the model itself, e.g. of its gain invariance) every analysed recording gets a verdict.
    """
    ckpt = checkpoint if isinstance(checkpoint, SavedCheckpoint) else open_checkpoint(checkpoint)
    predictor = Predictor.of(ckpt, rule or AbstainRule(), abstain)
    results = []
    for file in files:
        try:
            results.append(predictor.recording(file))
        except VascdistError as exc:
            if skipped is None:
                raise
            skipped.append({"file": str(file), "reason": str(exc)})
    return results


@dataclass(frozen=True)
class Predictor:
    """A checkpoint's model with the preprocessing, normalisation, thresholds and abstention rule it is applied by."""
    ckpt: SavedCheckpoint
    model: torch.nn.Module
    preprocess: PreprocessConfig
    inputs: InputTransform
    rule: AbstainRule
    abstain: bool

    @classmethod
    def of(cls, ckpt: SavedCheckpoint, rule: AbstainRule, abstain: bool = True) -> Predictor:
        if ckpt.data.kind != "spectrogram":
            raise VascdistError(f"{ckpt.path}: predict takes recordings, but this model was trained on "
                                f"{ckpt.data.kind}")
        return cls(ckpt, load_model(ckpt), from_dict(PreprocessConfig, ckpt.data.preprocess, "preprocess"),
                   ckpt.data.input_transform(), rule, abstain)

    def recording(self, file) -> dict:
        """One recording's prediction; VascdistError naming the file if it cannot be read at all."""
        from vascdist.abstain import abstain_reasons
        from vascdist.data.audio import NoSignal, load_audio_stats
        from vascdist.data.preprocess import analyse_recording
        from vascdist.data.spectrogram import input_features
        try:
            signal, stats = load_audio_stats(file, self.preprocess.audio)
        except NoSignal as exc:  # a recording, but silent or empty: nothing to give a verdict on
            return self.no_verdict(file, [str(exc).removeprefix(f"{file}: ")], {})
        try:
            spec, cycles, quality = analyse_recording(signal, self.preprocess, stats)
        except VascdistError as exc:  # no cycle window at all: nothing to give a verdict on
            return self.no_verdict(file, [str(exc).removeprefix(f"{file}: ")], {})
        reasons = abstain_reasons(quality, len(spec), input_features(spec), self.ckpt.data, self.preprocess.audio,
                                  self.rule, stats.synthetic)
        if reasons and self.abstain:
            return self.no_verdict(file, reasons, quality)
        return self.verdict(file, spec, cycles, quality)

    @torch.no_grad()
    def verdict(self, file, spec: np.ndarray, cycles: np.ndarray, quality: dict) -> dict:
        """The model's verdict on a recording's cycle windows: the mean calibrated probability over them,
        against the checkpoint's recording-level threshold."""
        classes, thresholds = self.ckpt.data.classes, self.ckpt.val_thresholds
        x = self.inputs(torch.from_numpy(spec.astype(np.float16)))  # float16 as stored in shards, then as trained
        probs = calibrated(torch.softmax(self.model(x).float(), dim=1).numpy(), self.ckpt.temperature)
        mean_probs = probs.mean(axis=0)
        threshold, verdict = decide(mean_probs, classes, thresholds.get("recording"))
        source = "validation" if "recording" in thresholds else "default"
        return {"file": str(file), "verdict": verdict, "reasons": [],
                "probabilities": dict(zip(classes, mean_probs.tolist())),
                "threshold": threshold, "threshold_source": source if threshold is not None else None,
                "threshold_rule": thresholds.get("rule") if threshold is not None else None,
                "temperature": self.ckpt.temperature, "demonstration_model": self.ckpt.data.provenance.demonstration,
                **quality_fields(quality), "cycles": [
                    {"cycle": int(c), "probabilities": dict(zip(classes, p.tolist()))} for c, p in zip(cycles, probs)]}

    def no_verdict(self, file, reasons: list[str], quality: dict) -> dict:
        """A prediction without a verdict: no probabilities either, so that no script averages them by mistake."""
        return {"file": str(file), "verdict": None, "reasons": reasons, "probabilities": None, "threshold": None,
                "threshold_source": None, "threshold_rule": None, "temperature": self.ckpt.temperature,
                "demonstration_model": self.ckpt.data.provenance.demonstration, **quality_fields(quality),
                "cycles": []}


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
        cut, verdict = decide(mean, classes, threshold)
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
