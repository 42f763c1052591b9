"""Tampered or corrupted shard sets: refused by `shards verify`, by training and by evaluate alike, and a
corrupted chunk caught by the loader as it reads it, naming the shard and the samples (issue 16, points 7-9)."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import flip_byte, run_cli
from vascdist.data import shards as shardlib
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.shard_format import seal_index
from vascdist.errors import DataError, VascdistError
from vascdist.runner import run_training


def _copy(shards_dir, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    return dst


def _index(root):
    return json.loads((root / "index.json").read_text())


def _write_index(root, index, seal=False):
    (root / "index.json").write_text(json.dumps(seal_index(index) if seal else index, indent=1))


def _train_overrides(shards, tmp_path, *extra):
    return [f"data.shards={shards}", f"run.out_dir={tmp_path / 'runs'}", "run.name=t", "model.name=resnet18",
            "model.width=0.125", "data.batch_size=16", "data.reader_threads=1", "train.epochs=1", "train.device=cpu",
            *extra]


# --------------------------------------------------------------------------------------------- index.json
def _swap_classes(root, index):
    index["classes"] = index["classes"][::-1]
    _write_index(root, index)


def _swap_classes_resealed(root, index):  # a consistent edit of index.json alone: the shards' headers disagree
    index["classes"] = index["classes"][::-1]
    index["splits"] = {s: {**c, "labels": dict(zip(index["classes"], c["labels"].values()))}
                       for s, c in index["splits"].items()}
    _write_index(root, index, seal=True)


def _change_normalisation(root, index):
    index["normalization"]["mean"] = [m + 1.0 for m in index["normalization"]["mean"]]
    _write_index(root, index)


def _relabel_val_as_train(root, index):
    entry = next(e for e in index["shards"] if e["split"] == "val")
    entry["split"] = "train"
    index["splits"]["train"]["samples"] += entry["samples"]
    index["splits"]["val"]["samples"] -= entry["samples"]
    _write_index(root, index, seal=True)


def _drop_entry(root, index):
    index["shards"] = index["shards"][1:]
    _write_index(root, index)


@pytest.mark.parametrize("tamper, message", [
    (_swap_classes, "attribute 'classes' is ['normal', 'stenosis'] in the shard but ['stenosis', 'normal']"),
    (_swap_classes_resealed, "attribute 'classes' is ['normal', 'stenosis'] in the shard"),
    (_change_normalisation, "index.json: content does not match its checksum (index_sha256)"),
    (_relabel_val_as_train, "attribute 'split' is 'val' in the shard but 'train' in index.json"),
    (_drop_entry, "shard-00000.h5: shard not listed in index.json"),
])
@pytest.mark.slow
def test_training_refuses_what_verify_refuses(shards_dir, tmp_path, tamper, message):
    root = _copy(shards_dir, tmp_path)
    tamper(root, _index(root))
    with pytest.raises(DataError) as verified:
        shardlib.verify(root)
    assert message in str(verified.value)
    with pytest.raises(VascdistError) as trained:  # refused at start, before any step
        run_training(None, _train_overrides(root, tmp_path), run_dir=str(tmp_path / "run"), quiet=True)
    assert str(trained.value) == str(verified.value)
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_index_checksum_survives_a_round_trip(shards_dir):
    index = _index(shards_dir)
    assert seal_index(json.loads(json.dumps(index)))["index_sha256"] == index["index_sha256"]


@pytest.mark.parametrize("version, lacks", [
    (1, "level-normalised spectrograms, per-recording quality, excluded recordings; per-chunk checksums"),
    (2, "lacks: per-chunk checksums (x_sum, chunk_crc32), file sizes and a sealed index.json)"),
])
def test_an_older_set_is_refused_with_one_line_saying_what_it_lacks(shards_dir, tmp_path, version, lacks):
    root = _copy(shards_dir, tmp_path)
    index = _index(root)
    index["schema_version"] = version
    _write_index(root, index)
    for check in (shardlib.verify, shardlib.load_index):
        with pytest.raises(DataError) as refused:
            check(root)
        text = str(refused.value)
        assert text.startswith(f"{root / 'index.json'}: shards of schema {version}, older than the schema "
                               f"{shardlib.SCHEMA_VERSION}") and lacks in text and "preprocess --out NEW_DIR" in text
    result = run_cli("train", *_train_overrides(root, tmp_path), "--quiet")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"vascdist train: error: {text}"]


# --------------------------------------------------------------------------------------------- chunks
def _read_all(root, split="val"):
    for _ in StreamingLoader(ShardStream(root, split, 16, train=False)):
        pass


@pytest.mark.parametrize("field", ["x", "y", "patient", "recording", "cycle"])
def test_a_flipped_byte_is_caught_while_reading(shards_dir, tmp_path, field):
    root = _copy(shards_dir, tmp_path)
    path, lo, hi = flip_byte(root, field)
    shardlib.verify_files(root)  # the start-up check reads headers only: it cannot see this
    with pytest.raises(DataError) as caught:
        _read_all(root)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and "does not match its checksum" in text
    assert (f"sample 70 of x (chunk of samples {lo}-{hi})" if field == "x"
            else f"field '{field}' of samples {lo}-{hi}") in text
    with pytest.raises(DataError, match="does not match|checksum"):
        shardlib.verify(root)


def test_a_label_outside_the_classes_is_one_line(shards_dir, tmp_path):
    root = _copy(shards_dir, tmp_path)
    entry = next(e for e in _index(root)["shards"] if e["split"] == "val")
    path = root / entry["file"]
    arrays, attrs = shardlib.read_shard(path)
    arrays["y"][5] = 7  # rewritten consistently: every checksum of the shard matches the bad label
    shardlib.write_shard(path, arrays, {k: v for k, v in attrs.items() if k != "checksum"}, 64)
    with pytest.raises(DataError, match=f"{path}: sample 5 has label 7, outside the 2 classes of index.json"):
        _read_all(root)


@pytest.mark.slow
def test_training_catches_a_corrupted_chunk_with_the_start_up_check_off(shards_dir, tmp_path):
    root = _copy(shards_dir, tmp_path)
    path, lo, hi = flip_byte(root, "x")  # a val sample: evaluation reads every one
    result = run_cli("train", *_train_overrides(root, tmp_path, "data.verify_checksums=false", "train.max_steps=2"), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vascdist train: error: {path}: sample 70 of x"), result.stderr


# --------------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def tiny_run(shards_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    run_training(None, _train_overrides(shards_dir, tmp, "train.max_steps=4"), run_dir=str(tmp / "run"), quiet=True)
    return tmp / "run"


@pytest.mark.slow
def test_evaluate_refuses_a_tampered_or_corrupted_set(tiny_run, shards_dir, tmp_path):
    root = _copy(shards_dir, tmp_path)
    ok = run_cli("evaluate", str(tiny_run), "--shards", str(root), "--out", str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stderr
    index = _index(root)
    _change_normalisation(root, index)
    result = run_cli("evaluate", str(tiny_run), "--shards", str(root), "--out", str(tmp_path / "e.json"))
    assert result.returncode == 2 and not (tmp_path / "e.json").exists()
    assert result.stderr.strip().splitlines() == [
        f"vascdist evaluate: error: {root / 'index.json'}: content does not match its checksum (index_sha256): it was "
        "edited or corrupted after preprocessing; re-run `vascdist preprocess`"]

    shutil.rmtree(root)
    root = _copy(shards_dir, tmp_path)
    path, _, _ = flip_byte(root, "recording", sample=3, split="test")
    result = run_cli("evaluate", str(tiny_run), "--shards", str(root), "--out", str(tmp_path / "e.json"))
    assert result.returncode == 2 and not (tmp_path / "e.json").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}: field 'recording' of samples 0-64 does not match its checksum" in lines[0]
