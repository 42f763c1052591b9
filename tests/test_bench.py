"""Smoke tests of `vascdist bench`: every benchmark runs at tiny sizes and prints its table (no timing asserted)."""

import json

import pytest

from vascdist.bench import main
from vascdist.bench.paper import efficiency
from vascdist.data import shards

from helpers import run_cli


@pytest.fixture(scope="module")
def bench_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "shards"
    assert main(["make-shards", "--samples", "1500", "--out", str(out), "--shard-size", "512", "--chunk-size", "64"]) == 0
    return out


def test_make_shards_writes_a_verifiable_set_of_the_real_schema(bench_shards):
    index = shards.verify(bench_shards)  # checksums, counts, no patient in two splits
    assert index["sample_shape"] == [1, 40, 100] and index["kind"] == "spectrogram"
    assert {s: c["samples"] for s, c in index["splits"].items()} == {"train": 1200, "val": 150, "test": 150}
    assert len(index["normalization"]["mean"]) == 40  # per mel band, as preprocess writes it


@pytest.mark.slow
def test_make_shards_through_the_cli(tmp_path):
    proc = run_cli("bench", "make-shards", "--samples", "40", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert "train=32, val=4, test=4" in proc.stdout


@pytest.mark.slow
def test_loader_bench_prints_all_four_loaders(bench_shards, capsys, tmp_path):
    argv = ["loader", "--shards", str(bench_shards), "--batch-sizes", "64", "--workers", "0,1", "--repeats", "1",
            "--naive-samples", "128", "--memory-samples", "256", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("1. vascdist streaming", "2. naive map-style", "3. contiguous read, page cache",
                 "3. contiguous read, cold", "4. in-memory tensor"):
        assert name in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["loader"][:2], r["workers"]) for r in rows} >= {("1.", 0), ("1.", 1), ("2.", 0), ("2.", 1)}
    assert all(r["samples_s"] > 0 for r in rows)


@pytest.mark.slow
def test_train_bench_runs_the_real_loop_and_the_bare_loop(capsys):
    argv = ["--threads", "1", "train", "--models", "resnet18:imagenet", "--width", "0.125", "--batch", "16", "--steps", "20",
            "--bare-steps", "2", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1. vascdist samples/s" in out and "resnet18 imagenet w0.125" in out and "harness overhead" in out


def test_train_bench_refuses_cuda_without_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_scaling_bench_measures_each_size(tmp_path, capsys):
    assert main(["scaling", "--root", str(tmp_path), "--sizes", "300,600", "--batch", "32", "--workers", "1",
                 "--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["train"] for r in rows] == [224, 480]  # whole batches of the 80 % train split
    assert all(r["procs"] == 1 and r["peak_pss_mb"] > 0 for r in rows)  # reader threads: one process holds it all
    assert "us/sample from smallest to largest N" in capsys.readouterr().out


@pytest.mark.slow
def test_preprocess_and_checkpoint_benches(tmp_path, capsys):
    assert main(["preprocess", "--patients", "2", "--workers", "1", "--root", str(tmp_path)]) == 0
    assert main(["checkpoint", "--models", "resnet18", "--widths", "0.125", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "cycles/s" in out and "audio s per s" in out and "resnet18 w0.125" in out


@pytest.mark.dist
@pytest.mark.slow
def test_dist_bench_runs_one_and_two_processes(capsys):
    argv = ["dist", "--width", "0.125", "--batch", "4", "--steps", "2", "--repeats", "1",
            "--paper-models", "resnet18:imagenet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 processes, DDP (gloo)" in out and "all_reduce of the gradient buffer alone" in out
    assert "IB NDR 400G" in out


def test_ring_all_reduce_arithmetic():
    # 1 GB of gradients over 8 GPUs at 400 GB/s: 2 * 7/8 * 1e9 / 400e9 s = 4.375 ms
    e = efficiency(fwd_flops=0, grad_bytes=10**9, batch=1, n=8, bucket_mb=25, mfu=1.0)
    assert e["t_ar_ms"] == pytest.approx(4.375)
    e = efficiency(fwd_flops=10**9, grad_bytes=10**9, batch=256, n=64, bucket_mb=1e6, mfu=1.0)
    assert e["e_overlap"] == pytest.approx(e["e_serial"])  # one bucket: nothing overlaps the backward


@pytest.mark.slow
def test_bootstrap_bench_times_every_interval(tmp_path, capsys):
    assert main(["bootstrap", "--cycles", "600", "--patients", "30", "--resamples", "50", "--repeats", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["cycles"] == 600 and row["patients"] == 30 and row["intervals"] == 3 * 11  # 11 metrics x 3 levels
    assert row["bootstrap_s"] > 0 and "ms / resample" in capsys.readouterr().out


def test_chunkverify_times_the_reader_with_and_without_its_checks(bench_shards, capsys):
    from vascdist.bench import chunkverify
    assert chunkverify.main([str(bench_shards), "--batch", "64", "--repeats", "1", "--threads", "0", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 64 reader threads 0", "batch 64 reader threads 1"]
    assert all("verified" in line and "ratio" in line for line in lines)


def test_highrate_runs_nothing_on_import_and_reads_a_real_wav(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from vascdist.bench import highrate  # a module, no longer a script that runs when imported
    assert capsys.readouterr().out == ""
    path = tmp_path / "short192.wav"
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(192000 * 3), 192000, subtype="PCM_24")
    assert highrate.main([str(path), "read"]) == 0
    assert capsys.readouterr().out.startswith("samples out 12000 (3 s at 4 kHz)")
