"""Helpers the test modules share (fixtures live in conftest.py): running the CLI and torchrun as real
processes, the tiny training and cross-validation runs several modules repeat, and bad preprocessing input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import soundfile as sf

from vascdist.data.loader import ShardStream
from vascdist.data.shards import load_index

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- processes
def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `vascdist ARGS` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "vascdist.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


STEPS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(shards_dir, run_dir, *extra):
    return ["train", "quickstart", f"data.shards={shards_dir}", "data.batch_size=16", "data.reader_threads=0",
            "model.name=resnet18", "model.width=0.125", "model.stem=imagenet", "model.norm=group",
            "optim.lr=0.01", "sched.name=cosine", "sched.warmup_steps=5", "train.epochs=3", f"train.max_steps={STEPS}",
            "train.device=cpu", "train.eval_every=1000", "data.synth_patients=0", "--run-dir", str(run_dir),
            "--quiet", *extra]


def torchrun(*args, nproc=2, nnodes=1, node_rank=0, port=None, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", f"--node-rank={node_rank}",
            *extra, "-m", "vascdist.cli", *args]


def all_losses(run_dir) -> list[float]:
    """train/loss of every step, from TensorBoard's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


# ------------------------------------------------------------------------------------------- data
def stream_with_a_broken_shard(shards_dir: Path, tmp_path: Path, batch_size: int):
    """A training ShardStream over a copy of `shards_dir` whose last-read shard is no HDF5 file; and its name."""
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    stream = ShardStream(copy, "train", batch_size, seed=3, shuffle_chunks=1)
    victim = stream.chunks[-1].file
    (copy / victim).write_bytes(b"not hdf5")
    return stream, victim


def write_manifest(tmp_path, rows, columns=("path", "label", "patient_id", "recording_id")):
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)
    return path


def good_rows(synth_dir, n=6):
    rows = list(csv.DictReader(open(synth_dir / "manifest.csv")))[:n]
    return [[str(synth_dir / r["path"]), r["label"], r["patient_id"], r["recording_id"]] for r in rows]


def assert_preprocess_fails(tmp_path, manifest, expected, extra=()):
    out = tmp_path / "out"
    result = run_cli("preprocess", "--manifest", str(manifest), "--out", str(out), "--quiet", *extra)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not list(out.glob("shard-*.h5")) and not (out / "index.json").exists()  # nothing half-written
    return lines[0]


def bad_wav(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(b"RIFF" + np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        sf.write(path, np.zeros(0, np.float32), 4000, subtype="PCM_16")
    elif kind == "silent":
        sf.write(path, np.zeros(4000 * 20, np.float32), 4000, subtype="PCM_16")
    elif kind == "short":
        # 0.3 s: even padded, a 1-s window would be 70 % padding (preprocess.cycles.pad_fraction is 0.5)
        sf.write(path, np.random.default_rng(0).normal(0, 0.1, 1200).astype(np.float32), 4000, subtype="PCM_16")
    return path


def flip_byte(root, field, sample=70, split="val"):
    """Flip one byte of `field` at `sample` of the first shard of `split`, found through HDF5's chunk index."""
    entry = next(e for e in json.loads((root / "index.json").read_text())["shards"] if e["split"] == split)
    path = root / entry["file"]
    with h5py.File(path, "r") as f:
        ds = f[field]
        chunk = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((sample // chunk * chunk,) + (0,) * (ds.ndim - 1))
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
        offset = info.byte_offset + (sample % chunk) * row_bytes + row_bytes // 2 * (field == "x")
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))
    return path, sample // chunk * chunk, min(sample // chunk * chunk + chunk, entry["samples"])


# ------------------------------------------------------------------------------------------- cross-validation
FAST = ["data.batch_size=16", "data.reader_threads=0", "model.width=0.125", "model.norm=group", "train.epochs=1",
        "train.max_steps=20", "train.eval_every=10", "eval.bootstrap_resamples=200", "eval.min_patients_per_class=1",
        "train.device=cpu"]


def cv_args(shards_dir, out, *extra):
    return ["cv", "quickstart", "--folds", "3", "--seed", "1", "--out", str(out), f"data.shards={shards_dir}",
            "data.synth_patients=0", *FAST, *extra]


def check_folds(out: Path, shards_dir: Path) -> None:
    patients = set(load_index(shards_dir)["patients"])
    plan = json.loads((out / "cv.json").read_text())
    tested = []
    for entry in plan["entries"]:
        parts = json.loads(Path(entry["split_file"]).read_text())
        train, val, test = (set(parts[s]) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test), entry["name"]  # no patient in two parts
        assert train | val | test == patients
        tested += parts["test"]
    assert sorted(tested) == sorted(patients)  # every patient tested exactly once


# ------------------------------------------------------------------------------------------- run faults
SMALL = ["model.name=resnet18", "model.width=0.125", "model.stem=imagenet", "data.batch_size=16", "train.epochs=1",
         "train.device=cpu", "train.min_steps=0", "sched.name=none"]


def one_error_line(result, command: str = "train") -> str:
    """The single `vascdist COMMAND: error: ...` line of a failed run (no traceback)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"vascdist {command}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------- sites
def synth_rows(synth_dir: Path) -> list[dict]:
    """The rows of a synthetic set's manifest.csv."""
    with open(synth_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def site_cv_args(shards, out, *extra):
    return ["cv", "quickstart", "--group-by", "site", "--out", str(out), f"data.shards={shards}",
            "data.synth_patients=0", *FAST, *extra]


def check_site_folds(out: Path, shards: Path) -> None:
    index = load_index(shards)
    site = {r["patient"]: r["site"] for r in index["recordings"]}
    plan = json.loads((out / "cv.json").read_text())
    assert plan["group_by"] == "site" and [e["name"] for e in plan["entries"]] == ["site-centre-1", "site-centre-2"]
    for entry in plan["entries"]:
        parts = json.loads(Path(entry["split_file"]).read_text())
        assert {site[p] for p in parts["test"]} == {entry["site"]}
        assert sorted(parts["test"]) == sorted(p for p in site if site[p] == entry["site"])  # the whole site
        assert entry["site"] not in {site[p] for p in parts["train"] + parts["val"]}  # validation from the others
        assert parts["val"] and not set(parts["val"]) & set(parts["train"])
