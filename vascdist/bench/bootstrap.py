"""`vascdist bench bootstrap`: what the patient bootstrap of vascdist.eval.bootstrap adds to an evaluation.

A synthetic test split (an informative, imperfect classifier; patients with 2-4 recordings of cycles) is
scored twice: the point metrics at the three levels (eval.evaluate.split_metrics) alone, and the intervals
of every metric (eval.assess.split_intervals). Both run on one core (BLAS and OpenMP limited to 1 thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vascdist.bench.common import machine_line, table, write_json
from vascdist.config import EvalConfig


def synthetic_split(cycles: int, patients: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays as predict_arrays returns them: probs, y, recording, patient (about `cycles` cycles)."""
    rng = np.random.default_rng(seed)
    recs_per_patient = rng.integers(2, 5, patients)
    patient = np.arange(cycles) * patients // cycles  # consecutive cycles per patient, as evenly as it divides
    recording = patient * 4 + np.arange(cycles) % recs_per_patient[patient]
    y = (patient % classes).astype(np.int64)
    probs = rng.dirichlet(np.ones(classes), patient.size)
    probs[np.arange(patient.size), y] += rng.uniform(0, 0.4, patient.size)
    probs /= probs.sum(axis=1, keepdims=True)
    return {"probs": probs.astype(np.float32), "y": y, "recording": recording, "patient": patient}


def bench_bootstrap(cycles: int, patients: int, classes: int, resamples: int, repeats: int) -> dict:
    from threadpoolctl import threadpool_limits

    from vascdist.eval.assess import split_intervals
    from vascdist.eval.evaluate import split_metrics
    arrays = synthetic_split(cycles, patients, classes)
    names = [f"class{k}" for k in range(classes)]
    cfg = EvalConfig(bootstrap_resamples=resamples)
    points, boots = [], []
    with threadpool_limits(1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            metrics = split_metrics(arrays, names, per_beat=False)
            t1 = time.perf_counter()
            intervals = split_intervals(arrays, names, False, metrics, cfg)
            t2 = time.perf_counter()
            points.append(t1 - t0)
            boots.append(t2 - t1)
    point_s, boot_s = statistics.median(points), statistics.median(boots)
    return {"rows": [{"cycles": len(arrays["y"]), "recordings": len(np.unique(arrays["recording"])),
                      "patients": patients, "classes": classes, "resamples": resamples, "intervals": len(intervals),
                      "point_s": point_s, "bootstrap_s": boot_s, "per_resample_ms": 1e3 * boot_s / resamples}],
            "repeats": repeats}


def add_parser(sub) -> None:
    p = sub.add_parser("bootstrap", help="time the patient bootstrap of every metric's interval")
    p.add_argument("--cycles", type=int, default=10000)
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    result = bench_bootstrap(a.cycles, a.patients, a.classes, a.resamples, a.repeats)
    print(table(result["rows"], [
        ("cycles", "cycles"), ("recordings", "recordings"), ("patients", "patients"), ("classes", "classes"),
        ("resamples", "resamples"), ("intervals", "intervals"), ("point_s", "point metrics s"),
        ("bootstrap_s", "bootstrap s"), ("per_resample_ms", "ms / resample")]))
    print(f"\nmedians of {result['repeats']}, one core (threadpoolctl limits BLAS/OpenMP to 1 thread)")
    write_json(a.json, result)
    return 0
