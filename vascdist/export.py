"""`vascdist export RUN`: the run's best checkpoint as an ONNX model plus a model card (JSON) beside it, for use
without vascdist or torch (a phone app, a hospital service: anything that runs onnxruntime).

The ONNX graph takes what vascdist's preprocessing makes (log-mel windows before normalisation, float32, any
batch size) and returns calibrated class probabilities: the train split's normalisation, the model and
softmax(logits / T) with the validation temperature T are all inside it. The card says everything else a caller
needs: the classes, the preprocessing parameters that make the input, the thresholds chosen on validation and
their rule, how windows make a recording's and a patient's verdict, the training data's provenance and quality
range, the versions.

Nothing is written unless onnxruntime reproduces torch's probabilities within TOLERANCE on the run's own test
samples and on recordings preprocessed end to end (WAV -> vascdist preprocessing -> both runtimes).
"""

from __future__ import annotations

import datetime
import importlib.util
import io
import warnings
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vascdist.data.shard_format import INDEX
from vascdist.errors import VascdistError

if TYPE_CHECKING:
    from vascdist.train.saved import DataInfo, SavedCheckpoint

OPSET = 18
"""ONNX opset the graph is exported at (the card records the opset the file really declares)."""
TOLERANCE = 1e-4
"""Largest allowed |P_onnxruntime - P_torch| over every class of every parity sample."""
PARITY_SAMPLES = 256
"""Test samples (cycle windows) compared at export; recordings come on top."""
INPUT, OUTPUT = "input", "probabilities"
CARD, EXAMPLE = "model_card.json", "example_input.npy"
EXTRA = ("onnx", "onnxruntime", "onnxscript")


def require_export_extra() -> None:
    """VascdistError (one line, which extra to install) unless the export packages are importable."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise VascdistError(f"vascdist export needs the 'export' extra (missing: {', '.join(missing)}): "
                            "pip install 'vascdist[export]'")


class Deployable(nn.Module):
    """What the ONNX file holds: normalisation -> model -> softmax(logits / T)."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, inv_std: torch.Tensor, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", inv_std)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, *sample_shape) float32, not yet normalised
        return torch.softmax(self.model((x - self.mean) * self.inv_std) / self.temperature, dim=1)


@dataclass
class Parity:
    """One parity check: what was compared, how many windows, the largest probability difference."""
    source: str
    windows: int
    max_abs_diff: float


@dataclass
class Exported:
    model: Path
    card: Path
    opset: int
    parity: list[Parity]


# --------------------------------------------------------------------------------------------- inputs
def test_windows(cfg, info: DataInfo, shards: str | None) -> tuple[np.ndarray, dict]:
    """Up to PARITY_SAMPLES test windows of the run's shard set (float16 as stored) and that set's index."""
    from vascdist.data.integrity import check_shard_set
    from vascdist.data.loader import ShardStream, StreamingLoader
    from vascdist.inference import check_compatible
    shards_dir = Path(shards or cfg.data.shards)
    if not (shards_dir / INDEX).is_file():
        raise VascdistError(f"{shards_dir}: the run's shard set is not there; the parity check needs its test "
                            "samples (give --shards DIR)")
    index = check_shard_set(shards_dir)
    check_compatible(info, index, shards_dir, Path("the checkpoint"))
    stream = ShardStream(shards_dir, "test", cfg.data.batch_size, train=False,
                         split_file="" if shards else cfg.data.split_file)
    parts, count = [], 0
    for batch in StreamingLoader(stream):
        parts.append(batch["x"].numpy())
        count += len(parts[-1])
        if count >= PARITY_SAMPLES:
            break
    if not parts:
        raise VascdistError(f"{shards_dir}: the test split is empty; nothing to check the export on")
    return np.concatenate(parts)[:PARITY_SAMPLES], index


def default_recording(index: dict) -> list[Path]:
    """The first recording of the shard set (a test one if any) whose file is still where it was read from."""
    recordings = sorted(index.get("recordings", []), key=lambda r: r.get("split") != "test")
    for rec in recordings:
        if Path(rec["path"]).is_file():
            return [Path(rec["path"])]
    return []


def recording_windows(path: Path, info: DataInfo) -> np.ndarray:
    """A recording preprocessed end to end as `vascdist predict` does: float16 log-mel windows."""
    from vascdist.config import PreprocessConfig, from_dict
    from vascdist.data.audio import load_audio_stats
    from vascdist.data.preprocess import analyse_recording
    pcfg = from_dict(PreprocessConfig, info.preprocess, "preprocess")
    signal, stats = load_audio_stats(path, pcfg.audio)
    try:
        spec, _, _ = analyse_recording(signal, pcfg, stats)
    except VascdistError as exc:
        raise VascdistError(f"{path}: {exc}") from None
    return spec.astype(np.float16)


# --------------------------------------------------------------------------------------------- export
def to_onnx(module: Deployable, example: torch.Tensor, opset: int) -> bytes:
    """The module as ONNX bytes (torch's export-based exporter), the batch axis dynamic."""
    import onnx
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), io.StringIO() as chatter:
        warnings.simplefilter("ignore")
        with redirect_stdout(chatter):  # the exporter narrates its steps on stdout
            program = torch.onnx.export(module, (example,), None, input_names=[INPUT], output_names=[OUTPUT],
                                        opset_version=opset, dynamic_shapes={"x": {0: batch}}, dynamo=True,
                                        verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torch_probabilities(model: nn.Module, transform, temperature: float, x16: np.ndarray) -> np.ndarray:
    """Probabilities as `vascdist predict` computes them: normalise, model, softmax, the checkpoint's temperature."""
    from vascdist.inference import calibrated
    with torch.no_grad():
        return calibrated(torch.softmax(model(transform(torch.from_numpy(x16))).float(), dim=1).numpy(), temperature)


def check_parity(session, model, transform, temperature: float, sources: list[tuple[str, np.ndarray]]) -> list[Parity]:
    """Compare onnxruntime with torch on every source (in batches of varied size: the batch axis is dynamic)."""
    out = []
    for name, x16 in sources:
        expected = torch_probabilities(model, transform, temperature, x16)
        got = np.concatenate([session.run([OUTPUT], {INPUT: part.astype(np.float32)})[0]
                              for part in np.array_split(x16, max(1, min(3, len(x16))))])
        diff = float(np.abs(got - expected).max())
        out.append(Parity(name, len(x16), diff))
        if not diff <= TOLERANCE:
            raise VascdistError(f"export: onnxruntime's probabilities differ from torch's by {diff:.2e} on {name} "
                                f"(tolerance {TOLERANCE:g}); nothing written")
    return out


def model_card(ckpt: SavedCheckpoint, opset: int, parity: list[Parity]) -> dict:
    """The JSON written beside the ONNX file (see the module docstring and README's export section)."""
    import onnx
    import onnxruntime

    import vascdist
    info = ckpt.data
    classes = info.classes
    thresholds = dict(ckpt.val_thresholds)
    rule = thresholds.pop("rule", None)
    binary = len(classes) == 2
    decision = (f"a recording is '{classes[1]}' when the mean over its windows of P({classes[1]}) >= "
                f"thresholds.recording; a patient when the mean over their recordings >= thresholds.patient"
                if binary else "the class of the largest mean probability over the windows (or recordings)")
    spec = info.preprocess.get("spectrogram", {})
    return {
        "model": "model.onnx", "opset": opset,
        "input": {"name": INPUT, "dtype": "float32", "shape": ["batch", *info.sample_shape],
                  "what": (f"log-mel windows of one recording, one per cardiac cycle ({spec.get('n_mels')} mel bands "
                           f"x {spec.get('n_frames')} frames, dB), as vascdist preprocess makes them, before "
                           f"normalisation" if info.kind == "spectrogram" else f"{info.kind} samples")},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(classes)],
                   "what": "class probabilities per window, normalisation and temperature applied inside the graph"},
        "classes": classes,
        "preprocessing": {"kind": info.kind, "parameters": info.preprocess,
                          "steps": ["decode to mono, resample to audio.sample_rate, band-pass to "
                                    "audio.bandpass_low_hz..bandpass_high_hz",
                                    "segment cardiac cycles from the energy envelope (cycles.*)",
                                    "scale to a fixed typical level; cut one window of "
                                    "spectrogram.hop_length x (n_frames - 1) samples at each onset",
                                    "log-mel per window: mel power spectrogram (n_fft, hop_length, n_mels, f_min, "
                                    "f_max, centred frames), then dB with top_db clipping per window"]},
        "normalization": {**info.normalization, "applied": "inside the graph: (x - mean) / std per mel band"},
        "temperature": ckpt.temperature,
        "thresholds": thresholds if binary else None, "threshold_rule": rule, "decision": decision,
        "training_data": {"provenance": info.provenance.to_dict(), "quality_range": info.quality_range},
        "checkpoint": {"file": ckpt.path.name, "step": ckpt.step, "best_step": ckpt.best_step},
        "parity": {"tolerance": TOLERANCE, "checks": [asdict(p) for p in parity]},
        "versions": {"vascdist": vascdist.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "exported_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def export_run(run: str | Path, out: str | Path | None = None, shards: str | None = None,
               recordings: list[str] = (), opset: int = OPSET) -> Exported:
    """Export the best checkpoint of `run` (or a checkpoint file) to OUT/model.onnx, OUT/model_card.json and
    OUT/example_input.npy (one recording's input windows; the card holds torch's mean probabilities for them)
    (default OUT: RUN/export/), after the parity checks."""
    require_export_extra()
    import onnxruntime

    from vascdist.fileio import atomic_write, atomic_write_json
    from vascdist.inference import load_model
    from vascdist.train.layout import RunLayout
    from vascdist.train.state import open_checkpoint
    ckpt = open_checkpoint(run)
    model, info = load_model(ckpt), ckpt.data
    windows, index = test_windows(ckpt.config, info, shards)
    files = [Path(r) for r in recordings] or (default_recording(index) if info.kind == "spectrogram" else [])
    sources = [(f"{len(windows)} test samples", windows)] + [(p.name, recording_windows(p, info)) for p in files]

    transform = info.input_transform()
    data, declared = _onnx_bytes(Deployable(model, transform.mean, transform.inv_std, ckpt.temperature).eval(),
                                 windows, opset)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    parity = check_parity(session, model, transform, ckpt.temperature, sources)

    out_dir = Path(out) if out else RunLayout(ckpt.path.parent.parent).export
    card = model_card(ckpt, declared, parity)
    # One recording's windows (or test windows) with torch's answer: a deployment checks its runtime against it.
    name, example = sources[-1]
    expected = torch_probabilities(model, transform, ckpt.temperature, example).mean(axis=0)
    card["example"] = {"input": EXAMPLE, "source": name, "mean_probabilities": dict(zip(info.classes,
                                                                                     expected.tolist()))}
    atomic_write(out_dir / card["model"], lambda fh: fh.write(data))
    atomic_write(out_dir / EXAMPLE, lambda fh: np.save(fh, example.astype(np.float32)))
    atomic_write_json(out_dir / CARD, card)
    return Exported(out_dir / card["model"], out_dir / CARD, declared, parity)


def _onnx_bytes(module: Deployable, windows: np.ndarray, opset: int) -> tuple[bytes, int]:
    """(the ONNX file's bytes, the opset it declares); VascdistError if its batch axis came out fixed."""
    import onnx
    data = to_onnx(module, torch.from_numpy(windows[:2].astype(np.float32)), opset)
    proto = onnx.load_from_string(data)
    declared = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if not proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise VascdistError("export: the ONNX input's batch axis came out fixed, not dynamic; nothing written")
    return data, declared


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="vascdist export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory (its best checkpoint) or a checkpoint file")
    p.add_argument("--out", default=None, help="folder for model.onnx, model_card.json and example_input.npy "
                                               "(default RUN/export)")
    p.add_argument("--shards", default=None, help="shard set whose test samples check parity (default: the run's)")
    p.add_argument("--recording", action="append", default=[],
                   help="WAV preprocessed end to end for the parity check (repeatable; default: the first recording "
                        "of the run's shard set that is still on disk)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    a = p.parse_args(argv)
    result = export_run(a.run, a.out, a.shards, a.recording, a.opset)
    print(f"wrote {result.model} (ONNX opset {result.opset}, dynamic batch axis) and {result.card}")
    for check in result.parity:
        print(f"parity {check.source} ({check.windows} windows): max |onnxruntime - torch| = "
              f"{check.max_abs_diff:.1e} <= {TOLERANCE:g}")
    return 0
