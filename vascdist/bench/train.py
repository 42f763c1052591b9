"""`vascdist bench train`: the full vascdist loop against a bare PyTorch loop on the same model and batch.

Per model and variant (precision / channels_last / compile):
  1. the real loop (`runner.run_training` with train.max_steps) reading shards; samples/s and data-wait fraction
     are the medians of the 10-step windows it logs to metrics.jsonl after step 10 (earlier ones warm up);
  2. a bare loop on one in-memory batch (zero_grad, forward, loss, backward, step): the compute bound;
  3. the step-time breakdown: loop.py's own train_step and log_step timed from outside (loop.py carries no
     timers), so the benchmark times what training runs.
TFLOP/s = samples/s x 3 x forward FLOPs against a measured matmul rate (bf16 on CUDA, fp32 on CPU): the forward
FLOPs of one sample are counted once per model, by `models.count_flops` (torch.utils.flop_counter.FlopCounterMode
over one forward: convolutions and matmuls, 2 FLOPs per multiply-add), and the backward is taken as 2x forward.
`--bare-steps 0` and `--no-breakdown` leave out parts 2 and 3 (each builds, and with compile compiles, the model
again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vascdist.bench.common import TreeMemory, machine_line, table, write_json
from vascdist.bench.makeshards import make_shards, samples_for_steps
from vascdist.config import load_config
from vascdist.dist import DistEnv
from vascdist.models import build_model, count_flops
from vascdist.train.layout import RunLayout
from vascdist.train.losses import build_loss
from vascdist.train.optim import build_optimizer
from vascdist.train.precision import autocast_context
from vascdist.train.runlog import RunLogger

SHAPE = (1, 40, 100)
BARE_KEYS = ("samples_s", "fwd_bwd_ms", "opt_ms")


def parse_variant(text: str) -> dict:
    """'fp32', 'bf16', 'bf16+cl', 'bf16+cl+compile' -> train.* settings."""
    parts = set(text.split("+"))
    unknown = parts - {"fp32", "bf16", "cl", "compile"}
    if unknown:
        raise SystemExit(f"vascdist bench train: unknown variant part(s) {sorted(unknown)}; use fp32|bf16[+cl][+compile]")
    return {"precision": "bf16" if "bf16" in parts else "fp32", "channels_last": "cl" in parts, "compile": "compile" in parts}


def overrides(a: argparse.Namespace, shards: Path, name: str, stem: str, variant: dict, out_dir: Path) -> list[str]:
    return [f"data.shards={shards}", "data.synth_patients=0", f"data.batch_size={a.batch}",
            f"data.loader={a.loader}", f"data.reader_threads={a.workers}", f"data.workers={a.workers}",
            f"model.name={name}", f"model.stem={stem}", f"model.width={a.width}",
            f"train.max_steps={a.steps}", "train.epochs=1", f"train.device={a.device}",
            f"train.precision={variant['precision']}", f"train.channels_last={str(variant['channels_last']).lower()}",
            f"train.compile={str(variant['compile']).lower()}", f"run.out_dir={out_dir}", "run.name=bench",
            "eval.bootstrap_resamples=0"]  # the end-of-run test table is not timed: no intervals, less waiting


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- 1. the real loop
def full_loop(ovr: list[str], run_dir: Path, device: torch.device) -> dict:
    """Run the real training entry point; its own metrics.jsonl gives samples/s and the data-wait fraction."""
    from vascdist.runner import run_training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with TreeMemory() as mem, contextlib.redirect_stdout(io.StringIO()):
        run_training(None, ovr, run_dir=str(run_dir), quiet=True)
    records = [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]
    # windows end at steps 1, 10, 20, ...; those up to step 10 still warm up (allocator, oneDNN kernels)
    windows = [r for r in records if r.get("split") == "train" and "train/samples_per_s" in r and r["step"] > 10]
    if not windows:
        raise SystemExit("vascdist bench train: too few steps for a timed window; use --steps >= 20")
    return {"samples_s": statistics.median(r["train/samples_per_s"] for r in windows),
            "data_wait": statistics.median(r["train/data_wait_fraction"] for r in windows),
            "peak_rss_mb": mem.peak_rss / 2**20, "peak_pss_mb": mem.peak_pss / 2**20,
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


# ------------------------------------------------------------------------------------------- 2. bare PyTorch
def bare_loop(cfg, device: torch.device, steps: int) -> dict:
    """The compute bound: the same model, optimiser and loss on one batch already on the device."""
    model = build_model(cfg.model, 2, SHAPE).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    run = torch.compile(model) if cfg.train.compile else model
    loss_fn = build_loss(cfg.loss, 2).to(device)
    x = torch.randn(cfg.data.batch_size, *SHAPE, device=device)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (cfg.data.batch_size,), device=device)
    fwd_bwd, opt = [], []
    for i in range(steps + 3):  # 3 warm-up steps (allocator, compile, cudnn autotune)
        sync(device)
        t0 = time.perf_counter()
        with autocast_context(cfg.train.precision, device):
            loss = loss_fn(run(x), y)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:
            fwd_bwd.append(t1 - t0)
            opt.append(time.perf_counter() - t1)
    step = statistics.median(a + b for a, b in zip(fwd_bwd, opt))
    return {"samples_s": cfg.data.batch_size / step, "fwd_bwd_ms": 1e3 * statistics.median(fwd_bwd),
            "opt_ms": 1e3 * statistics.median(opt)}


# ------------------------------------------------------------------------------------------- 3. breakdown
def breakdown(cfg, device: torch.device, steps: int, log_dir: Path) -> dict:
    """Median ms per step of each phase of the real loop's own functions (loop.train_step, loop.log_step), timed
    from outside, so the benchmark cannot drift from the loop."""
    from vascdist.data.shards import load_index
    from vascdist.progress import ProgressReporter
    from vascdist.train import loop
    env = DistEnv(device=device)
    run = loop.build(cfg, env, load_index(cfg.data.shards), RunLayout(log_dir))
    run.log = RunLogger(log_dir, enabled=True)
    meter, bar = loop.Throughput(cfg.data.batch_size), ProgressReporter("bench", steps + 3, enabled=False)
    phases: dict[str, list[float]] = {"data_wait": [], "step": [], "logging": []}
    batches = iter(run.state.loader)
    for i in range(steps + 3):  # 3 warm-up steps excluded
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        t1 = time.perf_counter()
        loss, grad_norm = loop.train_step(run, batch, want_norm=loop.should_log(cfg, run.state.progress.step))
        sync(device)
        t2 = time.perf_counter()
        loop.log_step(run, loss, grad_norm, meter, bar)
        t3 = time.perf_counter()
        if i >= 3:
            for name, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3))):
                phases[name].append(b - a)
    run.log.close()
    return {f"{k}_ms": 1e3 * statistics.median(v) for k, v in phases.items() if v}


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a square matmul (median of `repeats`, 8192 on CUDA, 1024 on CPU): the reference for TFLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:])


# ------------------------------------------------------------------------------------------- the benchmark
def bench_train(a: argparse.Namespace) -> dict:
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_rate(device, peak_dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vascdist-bench-train-") as tmp:
        tmp = Path(tmp)
        shards = Path(a.shards) if a.shards else tmp / "shards"
        if not a.shards:  # just enough samples for one epoch of --steps
            make_shards(shards, samples_for_steps(a.batch, a.steps), chunk_size=64, shard_size=4096)
        for spec in a.models.split(","):
            name, _, stem = spec.partition(":")
            model_cfg = load_config("quickstart", [f"model.name={name}", f"model.stem={stem or 'small'}",
                                                   f"model.width={a.width}"]).model
            flops = 3 * count_flops(build_model(model_cfg, 2, SHAPE), SHAPE)  # per sample: forward + 2x backward
            for vtext in a.variants.split(","):
                variant = parse_variant(vtext)
                ovr = overrides(a, shards, name, stem or "small", variant, tmp / "runs")
                cfg = load_config("quickstart", ovr)
                runs = []
                for r in range(a.repeats):  # real loop, bare loop and breakdown back to back in each repeat
                    tag = f"{name}-{stem}-{vtext}-{r}"
                    full = full_loop(ovr, tmp / "runs" / tag, device)
                    bare = bare_loop(cfg, device, a.bare_steps) if a.bare_steps else dict.fromkeys(BARE_KEYS)
                    parts = breakdown(cfg, device, a.steps, tmp / "breakdown" / tag) if a.breakdown else {}
                    runs.append({"full_s": full["samples_s"], "bare_s": bare["samples_s"],
                                 "ratio": full["samples_s"] / bare["samples_s"] if bare["samples_s"] else None,
                                 "data_wait": full["data_wait"], **parts, "bare_fwd_bwd_ms": bare["fwd_bwd_ms"],
                                 "bare_opt_ms": bare["opt_ms"], **{k: v for k, v in full.items() if k.endswith("_mb")}})
                row = {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]}
                tflops = row["full_s"] * flops / 1e12
                rows.append({"model": f"{name} {stem} w{a.width:g}", "variant": vtext, "batch": a.batch, **row,
                             "gflop_per_sample": flops / 1e9, "tflops": tflops, "utilisation": tflops / (peak / 1e12),
                             "bare_tflops": row["bare_s"] * flops / 1e12 if row["bare_s"] else None})
                print(f"  done {name}:{stem} {vtext}", flush=True)
    return {"rows": rows, "peak_tflops": peak / 1e12, "peak_dtype": str(peak_dtype), "device": str(device),
            "loader": a.loader, "workers": a.workers, "steps": a.steps, "repeats": a.repeats}


def format_train(result: dict) -> str:
    rows = result["rows"]
    cols = [("model", "model"), ("variant", "variant"), ("batch", "batch"), ("full_s", "1. vascdist samples/s"),
            ("bare_s", "2. bare samples/s"), ("ratio", "1/2"), ("data_wait", "data-wait frac"),
            ("data_wait_ms", "wait ms"), ("step_ms", "train_step ms"),
            ("logging_ms", "log ms"), ("bare_fwd_bwd_ms", "bare fwd+bwd ms"), ("bare_opt_ms", "bare optim ms"),
            ("peak_pss_mb", "peak PSS MB"), ("peak_rss_mb", "peak RSS MB")]
    if any(r["cuda_peak_mb"] is not None for r in rows):
        cols.append(("cuda_peak_mb", "CUDA peak MB"))
    cols += [("gflop_per_sample", "GFLOP/sample (3x fwd)"), ("tflops", "TFLOP/s"), ("utilisation", "of matmul"),
             ("bare_tflops", "bare TFLOP/s")]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]  # parts left out leave no empty column
    lines = [table(rows, cols), "",
             f"device {result['device']}; matmul reference {result['peak_tflops']:.3g} TFLOP/s ({result['peak_dtype']}); "
             f"loader {result.get('loader', 'threads')} x {result['workers']}; "
             f"real loop: median 10-step window after step 10 of {result['steps']} steps; "
             "breakdown columns: medians per step of loop.train_step / log_step; memory: process tree, sampled; "
             f"medians of {result['repeats']} repeats (1/2: median of same-repeat ratios)"]
    for r in rows:
        if r["ratio"] is not None:
            lines.append(f"{r['model']} {r['variant']}: harness overhead target 1/2 >= 0.95 -> {r['ratio']:.2f} "
                         f"({'MET' if r['ratio'] >= 0.95 else 'NOT MET'})")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="full vascdist loop vs bare PyTorch loop: samples/s, breakdown, memory, TFLOP/s")
    p.add_argument("--shards", default=None, help="shards to train on (default: random shards made for the run)")
    p.add_argument("--models", default="resnet18:small,resnet18:imagenet,resnet50:small", help="name:stem,...")
    p.add_argument("--width", type=float, default=0.25, help="model.width (1.0 is the full model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=41, help="steps of the real loop (its 10-step windows after step 10 count)")
    p.add_argument("--repeats", type=int, default=1, help="repeat real loop, bare loop and breakdown; medians")
    p.add_argument("--bare-steps", type=int, default=10, help="steps of the bare loop (0: leave it out)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time loop.train_step / log_step from outside (--no-breakdown: leave it out)")
    p.add_argument("--loader", default="threads", choices=["threads", "dataloader"], help="data.loader")
    p.add_argument("--workers", type=int, default=1,
                   help="data.reader_threads (--loader threads) or data.workers (--loader dataloader)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", default="fp32", help="comma list of fp32|bf16[+cl][+compile], e.g. on a GPU "
                                                       "fp32,bf16,bf16+cl,bf16+cl+compile")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.device == "cuda" and not torch.cuda.is_available():
        print("vascdist bench train: --device cuda but no CUDA device is visible (this benchmark then needs a GPU host)")
        return 2
    print(machine_line(), flush=True)
    result = bench_train(a)
    print(format_train(result))
    write_json(a.json, result)
    return 0
