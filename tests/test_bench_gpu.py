"""`vascdist bench gpu` on a CPU: the dry run of the GPU check (tiny sizes, gloo instead of NCCL), its JSON and table,
and its failing soft: a part that fails or finds the budget spent is recorded and the next part runs."""

import json

import pytest

from helpers import run_cli
from vascdist.bench import main
from vascdist.bench.gpu import JSON_NAME, TEXT_NAME, TINY

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # the dry run trains, under torchrun too

PARTS = ["env", "data", "main_job", "dist", "resume", "train"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # one intra-op thread per process: torchrun, DeepSpeed and the loop share this machine's cores
    proc = run_cli("bench", "gpu", "--device", "cpu", "--tiny", "--out", str(out), "--budget-s", "1500",
                   env={"OMP_NUM_THREADS": "1"}, timeout=1800)
    return proc, json.loads((out / JSON_NAME).read_text()), (out / TEXT_NAME).read_text()


def test_dry_run_passes_every_part(dry_run):
    proc, result, text = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["ok"] and part["error"] is None, (name, part["error"])
        assert 0 < part["seconds"] <= part["budget_s"] + 5, name
    assert result["device"] == "cpu" and result["tiny"] and result["machine"]["gpu"] == "none"
    for name in PARTS:  # the table has a row per part, and the file is what was printed
        assert f"| {name} | yes |" in " ".join(text.split())
    assert text.strip() in proc.stdout


def test_env_and_main_job(dry_run):
    _, result, _ = dry_run
    env, main_job = result["parts"]["env"], result["parts"]["main_job"]
    assert env["rc"] == 0 and env["gloo"] and env["cuda_devices"] == []
    assert any(line.startswith("torch ") for line in env["lines"])
    assert result["parts"]["data"]["patients"] == TINY.synth_patients
    table = main_job["device_run"]["table"].splitlines()
    assert table[0].startswith("test set (normal, stenosis)") and table[-1].startswith("threshold rule")
    assert any(line.startswith("balanced_accuracy") for line in table)
    assert main_job["device_run"]["device"] == "cpu" and main_job["speedup"] == 1.0  # --device cpu: one run is both


def test_ddp_on_one_rank_and_deepspeed_follow_the_one_process_losses(dry_run):
    dist = dry_run[1]["parts"]["dist"]
    assert dist["backend"] == "gloo" and dist["steps"] == TINY.dist_steps
    # one rank, fp32, deterministic: DDP's all-reduce of one rank changes no bit
    assert dist["ddp"] == {**dist["ddp"], "steps": TINY.dist_steps, "bitwise": True, "max_rel_diff": 0.0}
    assert dist["deepspeed"]["steps"] == TINY.dist_steps and dist["deepspeed"]["max_rel_diff"] <= 1e-5


def test_killed_run_resumes_bitwise(dry_run):
    resume = dry_run[1]["parts"]["resume"]
    saved = resume["killed_with_checkpoints"]
    assert saved and saved[-1] < TINY.dist_steps  # killed before the end, after a checkpoint
    assert resume["resumed_at_step"] == saved[-1] and resume["final_step"] == TINY.dist_steps
    assert resume["losses"] == {"steps": TINY.dist_steps, "max_rel_diff": 0.0, "bitwise": True}
    assert resume["weights_bitwise"] is True


def test_bench_train_rows(dry_run):
    train = dry_run[1]["parts"]["train"]
    rows = {(r["model"], r["variant"]): r for r in train["rows"]}
    assert set(rows) == {("resnet18 small w0.125", v) for v in TINY.bench_variants}
    for r in rows.values():
        assert r["full_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["bare_s"] > 0
        assert r["cuda_peak_mb"] is None  # torch.cuda.max_memory_allocated: only on a GPU
        assert r["tflops"] == pytest.approx(r["full_s"] * r["gflop_per_sample"] / 1e3)
        assert r["utilisation"] == pytest.approx(r["tflops"] / train["peak_tflops"])
    assert train["peak_dtype"] == "fp32" and "FlopCounterMode" in train["flops"]


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path, capsys, monkeypatch):
    # No data part: dist and resume find no shards; each records vascdist's one-line error, and the check goes on.
    argv = ["gpu", "--device", "cpu", "--tiny", "--parts", "dist,resume", "--out", str(tmp_path / "a"),
            "--workdir", str(tmp_path / "work")]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(argv) == 1
    parts = json.loads((tmp_path / "a" / JSON_NAME).read_text())["parts"]
    assert list(parts) == ["dist", "resume"]
    for part in parts.values():
        assert not part["ok"] and "holds no shard set" in part["error"], part["error"]
    assert "dist: FAILED" in capsys.readouterr().out
    # A spent budget: the parts are recorded as skipped, none runs.
    assert main(["gpu", "--device", "cpu", "--parts", "env,train", "--budget-s", "1", "--out", str(tmp_path / "b")]) == 1
    parts = json.loads((tmp_path / "b" / JSON_NAME).read_text())["parts"]
    assert [p["error"] for p in parts.values()] == ["skipped: the check's budget was spent"] * 2


def test_unknown_part_and_cuda_without_a_gpu_are_one_line(tmp_path):
    proc = run_cli("bench", "gpu", "--device", "cpu", "--parts", "env,nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "unknown part(s) nope" in proc.stderr and "env,data,main_job,dist,resume,train" in proc.stderr
    import torch
    if not torch.cuda.is_available():
        proc = run_cli("bench", "gpu", "--out", str(tmp_path))
        assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr
