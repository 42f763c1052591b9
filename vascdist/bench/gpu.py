"""`vascdist bench gpu`: the whole GPU check in one command, sized to end within 8 minutes on one H100 started
bare (docs/design/gpu-check.md says how to run it there).

Parts, in this order; each runs its work in subprocesses under its own time budget and the check's total one
(`--budget-s`). A part that fails or runs out of time is recorded with its error and the next part runs:

  env       `vascdist env`: the devices, CUDA, and the collective backends it sees (NCCL on a GPU, gloo on a CPU)
  data      the quickstart's synthetic recordings cut into shards, and random shards for `bench train`
  main_job  the quickstart (`vascdist train`) with train.device=DEVICE, then on the CPU: wall times, the table
            (with --device cpu the one run is both)
  dist      a few steps in one process, then under torchrun with DDP over a one-rank process group
            (dist.ddp_one_rank: NCCL on a GPU) and with DeepSpeed ZeRO-2: each step's loss against the one process
  resume    the same run killed (SIGKILL) after its first checkpoint and continued with --resume auto: every
            step's loss and the final weights against the uninterrupted run, bit for bit (train.deterministic)
  train     `vascdist bench train` per model: samples/s, data-wait fraction, peak CUDA memory, TFLOP/s against
            the matmul ceiling it measures (bf16 on CUDA), FLOPs counted once per model with FlopCounterMode

dist and resume run fp32 with train.deterministic, so equal means bit-equal. `--device cpu --tiny` is the dry run
the test suite runs (gloo instead of NCCL, tiny sizes). The results go to OUT/gpu-check.json (rewritten after
every part, so a check stopped from outside still leaves what it measured) and a short table to
OUT/gpu-check.txt and stdout. Exit code 0 when every part passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vascdist.bench.common import machine, table
from vascdist.bench.makeshards import samples_for_steps
from vascdist.errors import VascdistError

JSON_NAME, TEXT_NAME = "gpu-check.json", "gpu-check.txt"
LOSS_REL_TOLERANCE = 1e-5  # DeepSpeed against one process on a CPU: within 7e-7 relative (tests/test_deepspeed.py)


@dataclass(frozen=True)
class Sizes:
    """How big each part's work is: FULL for a GPU, TINY for the CPU dry run."""
    synth_patients: int
    main_overrides: tuple[str, ...]
    bench_models: tuple[str, ...]
    bench_variants: tuple[str, ...]
    bench_width: float
    bench_batch: int
    bench_steps: int
    bench_bare_steps: int
    bench_workers: int
    dist_steps: int
    dist_checkpoint_every: int
    dist_overrides: tuple[str, ...]
    budgets_s: dict[str, float] = field(default_factory=dict)


FULL = Sizes(synth_patients=60, main_overrides=(), bench_models=("resnet18:small", "resnet50:small"),
             bench_variants=("fp32", "bf16", "bf16+cl", "bf16+cl+compile"), bench_width=1.0, bench_batch=512,
             bench_steps=31, bench_bare_steps=10, bench_workers=6, dist_steps=100, dist_checkpoint_every=10,
             dist_overrides=(),
             budgets_s={"env": 60, "data": 120, "main_job": 200, "dist": 150, "resume": 120, "train": 330})
TINY = Sizes(synth_patients=12,
             main_overrides=("train.epochs=1", "train.min_steps=0", "train.max_steps=3", "model.width=0.125",
                             "data.batch_size=16", "eval.bootstrap_resamples=20"),
             bench_models=("resnet18:small",), bench_variants=("fp32", "bf16+cl"), bench_width=0.125, bench_batch=16,
             bench_steps=20, bench_bare_steps=2, bench_workers=1, dist_steps=20, dist_checkpoint_every=5,
             dist_overrides=("model.width=0.125", "data.batch_size=16", "eval.bootstrap_resamples=20"),
             budgets_s={"env": 120, "data": 300, "main_job": 300, "dist": 400, "resume": 300, "train": 400})


class PartFailed(Exception):
    """A part's work failed; the message is the one line recorded in the JSON."""


@dataclass
class Proc:
    rc: int
    wall_s: float
    stdout: str
    stderr: str


def run_proc(cmd: list[str], timeout_s: float, env: dict | None = None, what: str = "") -> Proc:
    """Run `cmd` in its own process group; past `timeout_s` the whole group (torchrun's workers too) is killed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise PartFailed(f"{what or cmd[-1]}: not finished within its {timeout_s:.0f} s budget (killed)") from None
    return Proc(proc.returncode, time.perf_counter() - t0, out, err)


def checked(proc: Proc, what: str) -> Proc:
    """`proc` if it exited 0; else PartFailed with its last stderr line (the one-line error vascdist prints)."""
    if proc.rc != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise PartFailed(f"{what} exited {proc.rc}: {tail[-1][:400] if tail else '(no output)'}")
    return proc


def share(deadline: float, weight: float, weights_left: float) -> float:
    """Seconds for the next piece of a part: its weight's share of the part's time still left."""
    return max(1.0, (deadline - time.perf_counter()) * weight / weights_left)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Every step's train/loss from the run's TensorBoard events (metrics.jsonl has only every log_every-th)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vascdist.train.layout import RunLayout
    acc = EventAccumulator(str(RunLayout(run_dir).tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def compare_losses(ours: dict[int, float], reference: dict[int, float]) -> dict:
    """Step by step: the largest relative difference, and whether every loss is bit-equal."""
    if sorted(ours) != sorted(reference):
        raise PartFailed(f"logged steps differ: {len(ours)} against {len(reference)} in the one-process run")
    rel = max((abs(ours[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in reference), default=0.0)
    return {"steps": len(reference), "max_rel_diff": rel, "bitwise": all(ours[s] == reference[s] for s in reference)}


class GpuCheck:
    """The parts of the check, sharing the device, the sizes and a work directory."""

    def __init__(self, a: argparse.Namespace, sizes: Sizes, work: Path):
        self.a, self.sizes, self.work, self.device = a, sizes, work, a.device
        self.quickstart = work / "quickstart" / "shards"
        self.bench_shards = work / "bench-shards"
        self.reference: Path | None = None  # the uninterrupted one-process run of `dist`, reused by `resume`

    # ------------------------------------------------------------------------------------------ commands
    @staticmethod
    def vascdist(*args: str) -> list[str]:
        return [sys.executable, "-m", "vascdist.cli", *args]

    @staticmethod
    def torchrun(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                "-m", "vascdist.cli", *args]

    def dist_train_args(self, run_dir: Path, *extra: str) -> list[str]:
        s = self.sizes
        return ["train", "quickstart", f"data.shards={self.quickstart}", "data.synth_patients=0",
                f"train.device={self.device}", "train.precision=fp32", "train.deterministic=true",
                f"train.max_steps={s.dist_steps}", f"train.checkpoint_every={s.dist_checkpoint_every}",
                "train.eval_every=100000", *s.dist_overrides, *extra, "--run-dir", str(run_dir), "--quiet"]

    # ------------------------------------------------------------------------------------------ parts
    def part_env(self, deadline: float, out: dict) -> None:
        proc = run_proc(self.vascdist("env"), deadline - time.perf_counter(), what="vascdist env")
        lines = proc.stdout.splitlines()
        backends = next((line for line in lines if line.startswith("backends")), "")
        cuda = next((line.split(None, 1)[1] for line in lines if line.startswith("cuda ")), "")
        devices = [line.strip() for line in lines if line.startswith("cuda:")]
        out.update({"rc": proc.rc, "lines": lines, "problems": proc.stderr.strip().splitlines(), "cuda": cuda,
                    "cuda_devices": devices, "nccl": "nccl yes" in backends, "gloo": "gloo yes" in backends})
        needed = (bool(devices) and out["nccl"]) if self.device == "cuda" else out["gloo"]
        if proc.rc != 0 or not needed:
            raise PartFailed(f"vascdist env exited {proc.rc}" if proc.rc else
                             "no CUDA device or no NCCL seen" if self.device == "cuda" else "gloo not seen")

    def part_data(self, deadline: float, out: dict) -> None:
        s = self.sizes
        recordings = self.quickstart.parent / "recordings"
        steps = [(self.vascdist("synth", "--out", str(recordings), "--patients", str(s.synth_patients), "--seed", "0"),
                  "vascdist synth", 1),
                 (self.vascdist("preprocess", "--manifest", str(recordings / "manifest.csv"), "--out",
                                str(self.quickstart), "--workers", str(min(8, os.cpu_count() or 1)), "--quiet"),
                  "vascdist preprocess", 2),
                 (self.vascdist("bench", "make-shards", "--samples", str(self.bench_samples()), "--out",
                                str(self.bench_shards), "--shard-size", "4096", "--chunk-size", "64"),
                  "vascdist bench make-shards", 1)]
        out.update({"patients": s.synth_patients, "bench_samples": self.bench_samples()})
        for i, (cmd, what, weight) in enumerate(steps):
            proc = checked(run_proc(cmd, share(deadline, weight, sum(w for *_, w in steps[i:])), what=what), what)
            out[what.split()[-1] + "_s"] = round(proc.wall_s, 1)

    def bench_samples(self) -> int:
        """As many random samples as `bench train` makes for itself."""
        return samples_for_steps(self.sizes.bench_batch, self.sizes.bench_steps)

    def part_main_job(self, deadline: float, out: dict) -> None:
        """The quickstart on DEVICE, then on the CPU (the same data, config and seed)."""
        runs = [("device_run", self.device, 1, 3), ("cpu_run", "cpu", 2, 2)]
        for key, device, weight, weights_left in runs[:1] if self.device == "cpu" else runs:
            run_dir = self.work / "main" / key
            what = f"vascdist train on {device}"
            cmd = self.vascdist("train", "quickstart", f"data.shards={self.quickstart}", "data.synth_patients=0",
                                f"train.device={device}", *self.sizes.main_overrides, "--run-dir", str(run_dir), "--quiet")
            proc = checked(run_proc(cmd, share(deadline, weight, weights_left), what=what), what)
            lines = proc.stdout.splitlines()
            first = next((i for i, line in enumerate(lines) if line.startswith("test set")), None)
            last = next((i for i, line in enumerate(lines) if line.startswith("threshold rule")), None)
            if first is None or last is None:
                raise PartFailed(f"{what} printed no test table")
            out[key] = {"device": device, "wall_s": round(proc.wall_s, 1), "table": "\n".join(lines[first:last + 1])}
        out.setdefault("cpu_run", out["device_run"])  # --device cpu: the device run is the CPU run
        out["speedup"] = out["cpu_run"]["wall_s"] / out["device_run"]["wall_s"]

    def part_dist(self, deadline: float, out: dict) -> None:
        """One process, DDP on a one-rank group under torchrun, DeepSpeed ZeRO-2 under torchrun: the same losses."""
        runs = {"single": (self.vascdist, ()), "ddp": (self.torchrun, ("dist.ddp_one_rank=true",)),
                "deepspeed": (self.torchrun, ("dist.engine=deepspeed", "dist.zero_stage=2"))}
        nccl_log = {"NCCL_DEBUG": "INFO"} if self.device == "cuda" else {}
        out.update({"backend": "nccl" if self.device == "cuda" else "gloo", "steps": self.sizes.dist_steps})
        losses = {}
        for i, (name, (launcher, extra)) in enumerate(runs.items()):
            run_dir = self.work / "dist" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            what = f"{name} run"
            proc = checked(run_proc(launcher(*self.dist_train_args(run_dir, *extra)), share(deadline, 1, 3 - i),
                                    env=nccl_log if name == "ddp" else None, what=what), what)
            losses[name] = step_losses(run_dir)
            out[name] = {"wall_s": round(proc.wall_s, 1)}
            if name == "single":
                self.reference = run_dir
            else:
                out[name].update(compare_losses(losses[name], losses["single"]))
            if name == "ddp" and self.device == "cuda":  # NCCL_DEBUG=INFO: NCCL really carried the all-reduce
                out[name]["nccl_log_lines"] = (proc.stdout + proc.stderr).count("NCCL INFO")
        bad = [n for n in ("ddp", "deepspeed") if out[n]["max_rel_diff"] > LOSS_REL_TOLERANCE]
        if self.device == "cuda" and not out["ddp"].get("nccl_log_lines"):
            bad.append("ddp (no NCCL in its log)")
        if bad:
            raise PartFailed(f"loss differs from the one-process run by more than {LOSS_REL_TOLERANCE:g}: {', '.join(bad)}")

    def part_resume(self, deadline: float, out: dict) -> None:
        """Kill a run (SIGKILL, its whole process group) once its first periodic checkpoint exists, resume it."""
        from vascdist.train.layout import RunLayout
        from vascdist.train.saved import SavedCheckpoint

        reference = self.reference
        if reference is None:  # `dist` did not run or failed before its one-process run
            reference = self.work / "resume" / "reference"
            shutil.rmtree(reference, ignore_errors=True)
            checked(run_proc(self.vascdist(*self.dist_train_args(reference)), share(deadline, 1, 3),
                             what="reference run"), "reference run")
        layout = RunLayout(self.work / "resume" / "run")
        shutil.rmtree(layout.root, ignore_errors=True)
        args = self.dist_train_args(layout.root)
        proc = subprocess.Popen(self.vascdist(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            while not layout.step_files():
                if proc.poll() is not None:
                    raise PartFailed(f"the run to be killed exited {proc.returncode} before its first checkpoint: "
                                     f"{proc.stderr.read().strip()[-300:]}")
                if time.perf_counter() > deadline:
                    raise PartFailed("no checkpoint before the part's time budget ran out")
                time.sleep(0.02)
            finished_first = proc.poll() is not None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        saved = [step for step, _ in layout.step_files()]
        if finished_first or saved[-1] >= self.sizes.dist_steps:
            raise PartFailed(f"the run reached its last step ({saved[-1]}) before the kill; raise the steps")
        resumed = checked(run_proc(self.vascdist(*args, "--resume", "auto"), share(deadline, 1, 1),
                                   what="resumed run"), "resumed run")
        match = re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)
        losses = compare_losses(step_losses(layout.root), step_losses(reference))
        final = RunLayout(reference).step_files()[-1]
        ours = SavedCheckpoint.read(layout.checkpoints / final[1].name).weights
        theirs = SavedCheckpoint.read(final[1]).weights
        import torch
        weights_equal = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        out.update({"killed_with_checkpoints": saved, "resumed_at_step": int(match.group(1)) if match else None,
                    "final_step": final[0], "losses": losses, "weights_bitwise": weights_equal})
        if not (losses["bitwise"] and weights_equal and match):
            raise PartFailed("not resumed from a checkpoint" if not match else
                             f"resumed run differs from the uninterrupted one (losses bitwise {losses['bitwise']}, "
                             f"max rel diff {losses['max_rel_diff']:.2e}; final weights bitwise {weights_equal})")

    def part_train(self, deadline: float, out: dict) -> None:
        """`vascdist bench train`, one subprocess per model for the eager variants and one per compiled variant
        (a failed compile loses only its own row); compiled runs skip the bare loop (a second compile). The last
        model first (ResNet-50: the FLOP-utilisation target is about it), so that a budget spent early loses the
        smaller model's rows. Each subprocess gets a share of the part's time left by its weight: one per eager
        variant, three per compiled one (a compile takes about as long as three eager rows)."""
        s = self.sizes
        groups = []
        for model in reversed(s.bench_models):
            eager = [v for v in s.bench_variants if "compile" not in v.split("+")]
            if eager:
                groups.append((model, eager, s.bench_bare_steps, len(eager)))
            groups += [(model, [v], 0, 3) for v in s.bench_variants if v not in eager]
        rows: list[dict] = []
        errors = []
        out.update({"rows": rows, "peak_tflops": None, "peak_dtype": "bf16" if self.device == "cuda" else "fp32",
                    "flops": "models.count_flops: torch.utils.flop_counter.FlopCounterMode over one forward of one "
                             "sample (convolutions and matmuls, 2 FLOPs per multiply-add), once per model; x3 for "
                             "forward + backward; TFLOP/s = samples/s x that",
                    "samples_s": "median 10-step window after step 10 of the real loop (metrics.jsonl)",
                    "memory": "torch.cuda.max_memory_allocated over the real loop (None on a CPU)"})
        for i, (model, variants, bare_steps, weight) in enumerate(groups):
            out_json = self.work / "train" / f"{i}.json"
            cmd = self.vascdist("bench", "train", "--device", self.device, "--models", model, "--variants",
                                ",".join(variants), "--width", str(s.bench_width), "--batch", str(s.bench_batch),
                                "--steps", str(s.bench_steps), "--bare-steps", str(bare_steps), "--no-breakdown",
                                "--workers", str(s.bench_workers), "--shards", str(self.bench_shards),
                                "--json", str(out_json))
            what = f"bench train {model} {','.join(variants)}"
            try:
                checked(run_proc(cmd, share(deadline, weight, sum(g[3] for g in groups[i:])), what=what), what)
            except PartFailed as exc:
                errors.append(str(exc))
                continue
            result = json.loads(out_json.read_text())
            out["peak_tflops"] = out["peak_tflops"] or result["peak_tflops"]
            rows += [{k: r.get(k) for k in ("model", "variant", "batch", "full_s", "data_wait", "cuda_peak_mb",
                                            "gflop_per_sample", "tflops", "utilisation", "bare_s", "ratio")}
                     for r in result["rows"]]
        if errors:
            raise PartFailed("; ".join(errors))


# ------------------------------------------------------------------------------------------ running the parts
def run_check(a: argparse.Namespace) -> dict:
    sizes = TINY if a.tiny else FULL
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="vascdist-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = GpuCheck(a, sizes, work)
    parts: list[tuple[str, Callable[[float, dict], None]]] = [
        ("env", check.part_env), ("data", check.part_data), ("main_job", check.part_main_job),
        ("dist", check.part_dist), ("resume", check.part_resume), ("train", check.part_train)]
    wanted = a.parts.split(",") if a.parts else [name for name, _ in parts]
    unknown = sorted(set(wanted) - {name for name, _ in parts})
    if unknown:
        raise VascdistError(f"--parts: unknown part(s) {', '.join(unknown)}; the parts are "
                            f"{','.join(name for name, _ in parts)}")
    result = {"machine": machine(), "commit": git_commit(), "device": a.device, "tiny": a.tiny,
              "budget_s": a.budget_s, "sizes": asdict(sizes), "workdir": str(work), "parts": {}}
    start = time.perf_counter()
    try:
        for name, fn in parts:
            if name not in wanted:
                continue
            left = a.budget_s - (time.perf_counter() - start)
            if left < 5:
                result["parts"][name] = {"ok": False, "seconds": 0.0, "error": "skipped: the check's budget was spent"}
            else:
                result["parts"][name] = run_part(fn, min(sizes.budgets_s[name], left))
            record = result["parts"][name]
            print(f"{name}: {'ok' if record['ok'] else 'FAILED: ' + record['error']} ({record['seconds']:.0f} s)",
                  flush=True)
            result["wall_s"] = round(time.perf_counter() - start, 1)
            write_results(Path(a.out), result)
    finally:
        if not a.workdir and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def run_part(fn: Callable[[float, dict], None], budget_s: float) -> dict:
    """{'ok', 'error', 'seconds', 'budget_s', ...the part's fields}. The part fills its fields as it goes, so what
    it measured before an exception is kept; the exception is the part's one-line error."""
    t0 = time.perf_counter()
    fields: dict = {}
    error = None
    try:
        fn(t0 + budget_s, fields)
    except Exception as exc:  # fail soft: record it, go on with the next part
        message = str(exc).strip().splitlines()
        error = (f"{'' if isinstance(exc, PartFailed) else type(exc).__name__ + ': '}"
                 f"{message[-1] if message else ''}")[:600]
    return {"ok": error is None, "error": error, "seconds": round(time.perf_counter() - t0, 1),
            "budget_s": round(budget_s), **fields}


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
        return proc.stdout.strip() or None if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(result, indent=1, default=str))
    (out / TEXT_NAME).write_text(format_check(result) + "\n")


def summary_line(name: str, r: dict) -> str:
    """The one result a part's row of the table shows; its error where the part ended before that result."""
    if not r["ok"]:
        return r["error"] or ""  # what it measured before is in the JSON
    try:
        return _summary(name, r)
    except (KeyError, TypeError, IndexError):
        return r["error"] or ""


def _summary(name: str, r: dict) -> str:
    if name == "env":
        return f"{'; '.join(r['cuda_devices']) or 'no CUDA device'}; CUDA {r['cuda'] or '-'}; " \
               f"nccl {'yes' if r['nccl'] else 'no'}, gloo {'yes' if r['gloo'] else 'no'}"
    if name == "data":
        return f"{r['patients']} patients synthesised and preprocessed; {r['bench_samples']} random samples"
    if name == "main_job":
        return (f"{r['device_run']['device']} {r['device_run']['wall_s']:.0f} s, cpu {r['cpu_run']['wall_s']:.0f} s "
                f"(CPU / device {r['speedup']:.2f})")
    if name == "dist":
        return "; ".join(f"{n} ({r['backend'] if n == 'ddp' else 'ZeRO-2'}) max rel loss diff "
                         f"{r[n]['max_rel_diff']:.1e}{' (bitwise)' if r[n]['bitwise'] else ''}"
                         for n in ("ddp", "deepspeed") if n in r)
    if name == "resume":
        return (f"killed with checkpoints {r['killed_with_checkpoints']}, resumed at step {r['resumed_at_step']}; "
                f"losses bitwise {r['losses']['bitwise']}, final weights bitwise {r['weights_bitwise']}")
    if name == "train":
        return f"{len(r['rows'])} rows; matmul ceiling {r['peak_tflops'] or float('nan'):.3g} TFLOP/s ({r['peak_dtype']})"
    return ""


def format_check(result: dict) -> str:
    m = result["machine"]
    lines = [f"vascdist bench gpu --device {result['device']}{' --tiny' if result['tiny'] else ''}: "
             f"{m['gpu']}, {m['cpu']} x {m['cores']}, torch {m['torch']}; commit {result['commit']}; {m['date']}; "
             f"{result.get('wall_s', 0):.0f} s of a {result['budget_s']:.0f} s budget", ""]
    rows = [{"part": name, "ok": "yes" if r["ok"] else "NO", "seconds": r["seconds"], "result": summary_line(name, r)}
            for name, r in result["parts"].items()]
    lines.append(table(rows, [("part", "part"), ("ok", "ok"), ("seconds", "s"), ("result", "result")]))
    train = result["parts"].get("train", {})
    if train.get("rows"):
        lines += ["", table(train["rows"], [
            ("model", "model"), ("variant", "variant"), ("batch", "batch"), ("full_s", "samples/s"),
            ("data_wait", "data wait"), ("cuda_peak_mb", "peak MB"), ("tflops", "TFLOP/s"),
            ("utilisation", "of matmul"), ("bare_s", "bare samples/s")])]
    failed = [(name, r["error"]) for name, r in result["parts"].items() if r["error"]]
    lines += [""] + [f"{name}: {error}" for name, error in failed]
    return "\n".join(lines).rstrip()


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="the whole GPU check (env, main job, bench train, DDP/NCCL, DeepSpeed, "
                                   "kill-and-resume) in one command: one JSON and a table")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda on a GPU node; cpu for the dry run (gloo instead of NCCL)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite's dry run)")
    p.add_argument("--out", default="gpu-check", help=f"folder for {JSON_NAME} and {TEXT_NAME}")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="the whole check's time budget; parts left when it is spent are recorded as skipped")
    p.add_argument("--parts", default="", help="comma list of parts to run (default all): "
                                               "env,data,main_job,dist,resume,train")
    p.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("vascdist bench gpu: --device cuda but no CUDA device is visible (use --device cpu --tiny for the "
                  "dry run)", file=sys.stderr)
            return 2
    result = run_check(a)
    print(format_check(result))
    print(f"wrote {Path(a.out) / JSON_NAME} and {Path(a.out) / TEXT_NAME}")
    return 0 if all(r["ok"] for r in result["parts"].values()) else 1
