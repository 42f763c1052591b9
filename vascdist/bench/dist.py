"""`vascdist bench dist`: DDP overhead on CPU/gloo (1 vs 2 processes under torchrun, same per-rank batch),
the all-reduce time of a gradient-sized buffer, and the expected DDP efficiency at 8/64/512 GPUs on paper.

Each rank trains on one in-memory batch through the vascdist engine (DDP when world > 1), so the loader is not
part of the comparison. Every rank runs `--threads` intra-op threads (default 1), so 1 and 2 processes use
1 and 2 cores: the difference is communication and synchronisation, not a change in per-rank compute.
Run as a rank: `python -m vascdist.bench.dist --rank-body ...` (what the launcher below starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vascdist.bench.common import machine_line, table, write_json
from vascdist.bench.paper import format_paper, paper_efficiency

SHAPE = (1, 40, 100)


# ------------------------------------------------------------------------------------------- one rank
def rank_body(a: argparse.Namespace) -> None:
    """One rank: measure, then tear the process group down; rank 0 writes the JSON."""
    from vascdist.dist import init_distributed, shutdown

    torch.set_num_threads(a.threads)
    env = init_distributed("cpu", 300)
    try:
        # The DDP model must be gone before the process group: a gloo group destroyed first can deadlock in
        # the Reducer's destructor (its worker thread waits for the GIL that the destructor holds).
        result = measure(a, env)
    finally:
        shutdown(env)
    if env.is_main:
        Path(a.out).write_text(json.dumps(result))


def measure(a: argparse.Namespace, env) -> dict:
    """Time DDP steps, no_sync steps (compute only) and a bare all_reduce of a gradient-sized buffer."""
    import torch.distributed as torch_dist

    from vascdist.config import load_config
    from vascdist.models import build_model
    from vascdist.train.engines import prepare_module
    from vascdist.train.loop import build_engine
    from vascdist.train.optim import build_optimizer

    cfg = load_config("quickstart", [f"model.name={a.model}", f"model.stem={a.stem}", f"model.width={a.width}",
                                     f"data.batch_size={a.batch * env.world_size}", f"dist.bucket_cap_mb={a.bucket_mb}",
                                     "train.device=cpu"])
    torch.manual_seed(env.rank)
    module = prepare_module(build_model(cfg.model, 2, SHAPE), cfg, env)
    engine = build_engine(module, build_optimizer(cfg.optim, module), cfg, env)
    x, y = torch.randn(a.batch, *SHAPE), torch.randint(0, 2, (a.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def steps(n: int, sync: bool) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            with engine.micro_step_context(is_last=sync):  # no_sync(): the same step without the all-reduce
                engine.backward(loss_fn(engine.forward(x), y))
            engine.step()
            times.append(time.perf_counter() - t0)
        return times

    steps(3, True)
    if env.distributed:
        torch_dist.barrier()
    ddp = steps(a.steps, True)
    local = steps(a.steps, False)
    grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    reduce_ms = None
    if env.distributed:
        buf = torch.zeros(grad_bytes // 4, dtype=torch.float32)
        times = []
        for i in range(a.steps + 3):
            torch_dist.barrier()
            t0 = time.perf_counter()
            torch_dist.all_reduce(buf)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        reduce_ms = 1e3 * statistics.median(times)
        torch_dist.barrier()
    return {"world": env.world_size, "step_ms": 1e3 * statistics.median(ddp),
            "no_sync_ms": 1e3 * statistics.median(local), "allreduce_ms": reduce_ms, "grad_bytes": grad_bytes}


# ------------------------------------------------------------------------------------------- the launcher
def launch(a: argparse.Namespace, nproc: int, out: Path) -> dict:
    """torchrun --standalone --nproc-per-node `nproc` of this module's rank body; returns rank 0's JSON."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vascdist.bench.dist", "--rank-body", "--out", str(out), "--model", a.model, "--stem", a.stem,
           "--width", str(a.width), "--batch", str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads),
           "--bucket-mb", str(a.bucket_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"vascdist bench dist: torchrun with {nproc} processes did not finish in {a.timeout} s") from None
    if proc.returncode != 0:
        raise SystemExit(f"vascdist bench dist: torchrun with {nproc} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def bench_dist(a: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="vascdist-bench-dist-") as tmp:
        for _ in range(a.repeats):  # 1 and 2 processes back to back in each repeat
            one = launch(a, 1, Path(tmp) / "one.json")
            two = launch(a, 2, Path(tmp) / "two.json")
            rows.append({"one": one, "two": two})
    med = lambda f: statistics.median(f(r) for r in rows)
    one_ms, two_ms = med(lambda r: r["one"]["step_ms"]), med(lambda r: r["two"]["step_ms"])
    result = {
        "model": f"{a.model} {a.stem} w{a.width:g}", "batch_per_rank": a.batch, "threads_per_rank": a.threads,
        "bucket_mb": a.bucket_mb, "grad_bytes": rows[0]["one"]["grad_bytes"], "repeats": a.repeats,
        "one_step_ms": one_ms, "two_step_ms": two_ms, "two_no_sync_ms": med(lambda r: r["two"]["no_sync_ms"]),
        "allreduce_ms": med(lambda r: r["two"]["allreduce_ms"]),
        "efficiency": med(lambda r: r["one"]["step_ms"] / r["two"]["step_ms"]),  # same-repeat ratio
        "raw": rows}
    result["paper"] = paper_efficiency(a.paper_models.split(","), a.paper_batch, a.bucket_mb)
    return result


def format_dist(r: dict) -> str:
    rows = [{"setup": "1 process", "step_ms": r["one_step_ms"], "samples_s": r["batch_per_rank"] / r["one_step_ms"] * 1e3},
            {"setup": "2 processes, DDP (gloo)", "step_ms": r["two_step_ms"],
             "samples_s": 2 * r["batch_per_rank"] / r["two_step_ms"] * 1e3},
            {"setup": "2 processes, no_sync (no all-reduce)", "step_ms": r["two_no_sync_ms"],
             "samples_s": 2 * r["batch_per_rank"] / r["two_no_sync_ms"] * 1e3},
            {"setup": "all_reduce of the gradient buffer alone", "step_ms": r["allreduce_ms"], "samples_s": None}]
    lines = [table(rows, [("setup", "setup"), ("step_ms", "ms/step"), ("samples_s", "samples/s (all ranks)")]), "",
             f"{r['model']}, batch {r['batch_per_rank']} per rank, {r['threads_per_rank']} thread(s) per rank, "
             f"bucket_cap_mb {r['bucket_mb']:g}, gradient {r['grad_bytes'] / 1e6:.2f} MB (fp32) per step; medians of "
             f"{r['repeats']} repeats; weak-scaling efficiency 1-process step / 2-process step (same repeat): "
             f"{r['efficiency']:.2f}", "", format_paper(r["paper"])]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("dist", help="DDP overhead: 1 vs 2 gloo processes, all-reduce time, efficiency on paper")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18")
    p.add_argument("--stem", default="small")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=32, help="batch per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="dist.bucket_cap_mb")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paper-models", default="resnet18:small,resnet18:imagenet,resnet50:small",
                   help="full-width models for the on-paper efficiency")
    p.add_argument("--paper-batch", type=int, default=256, help="per-GPU batch of the on-paper efficiency")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per torchrun launch")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--rank-body", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    result = bench_dist(a)
    print(format_dist(result))
    write_json(a.json, result)
    return 0


if __name__ == "__main__":  # a rank started by torchrun
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rank_body(parser.parse_args())
