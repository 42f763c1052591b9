"""Expected DDP efficiency at 8 / 64 / 512 H100s, on paper, from measured gradient bytes and FLOPs.

  compute per step   T_c    = batch x 3 x forward FLOPs / (H100 bf16 dense peak x MFU)    (backward = 2 x forward)
  all-reduce         T_ar   = 2 (n - 1) / n x gradient bytes / bus bandwidth              (ring, bandwidth term)
  no overlap         E      = T_c / (T_c + T_ar)
  DDP overlap        E      = T_c / (T_c + max(T_ar - T_bwd, T_tail))   T_bwd = 2/3 T_c; T_tail = the last bucket's
                                                                        all-reduce, which starts only when backward ends
Assumptions (stated, not measured here): H100 SXM bf16 dense peak 989 TFLOP/s; 8 GPUs in one node over NVLink 4 /
NVSwitch at an achieved all-reduce bus bandwidth of 400 GB/s; 64 and 512 GPUs across nodes over InfiniBand NDR,
one 400 Gb/s NIC per GPU (50 GB/s line rate), 45 GB/s achieved. The ring latency term 2 (n - 1) x alpha (alpha =
5 us across nodes) is shown beside it: NCCL's tree / hierarchical algorithms cut it to ~log n steps at scale.
"""

from __future__ import annotations

from vascdist.bench.common import table

H100_BF16_TFLOPS = 989.0
LINKS = {8: ("NVLink 4", 400e9, 1e-6), 64: ("IB NDR 400G", 45e9, 5e-6), 512: ("IB NDR 400G", 45e9, 5e-6)}
SHAPE = (1, 40, 100)


def model_cost(spec: str) -> tuple[str, int, int]:
    """('name stem', forward FLOPs per sample, fp32 gradient bytes) of a full-width model 'name:stem'."""
    from vascdist.config import ModelConfig
    from vascdist.models import build_model, count_flops
    name, _, stem = spec.partition(":")
    model = build_model(ModelConfig(name=name, stem=stem or "small", width=1.0), 2, SHAPE)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # DDP reduces fp32 grads
    return f"{name} {stem or 'small'}", count_flops(model, SHAPE), grad_bytes


def efficiency(fwd_flops: int, grad_bytes: int, batch: int, n: int, bucket_mb: float, mfu: float) -> dict:
    link, bw, alpha = LINKS[n]
    t_c = batch * 3 * fwd_flops / (H100_BF16_TFLOPS * 1e12 * mfu)
    factor = 2 * (n - 1) / n
    t_ar = factor * grad_bytes / bw
    t_tail = factor * min(bucket_mb * 2**20, grad_bytes) / bw
    exposed = max(t_ar - 2 / 3 * t_c, t_tail)
    return {"n": n, "link": link, "bw": bw / 1e9, "t_c_ms": 1e3 * t_c, "t_ar_ms": 1e3 * t_ar,
            "latency_ms": 1e3 * 2 * (n - 1) * alpha, "tail_ms": 1e3 * t_tail,
            "e_serial": t_c / (t_c + t_ar), "e_overlap": t_c / (t_c + exposed)}


def paper_efficiency(specs: list[str], batch: int, bucket_mb: float, mfus: tuple[float, ...] = (1.0, 0.4)) -> dict:
    rows = []
    for spec in specs:
        label, flops, grad_bytes = model_cost(spec)
        for mfu in mfus:
            for n in LINKS:
                rows.append({"model": label, "gflop": flops / 1e9, "grad_mb": grad_bytes / 1e6, "mfu": mfu,
                             **efficiency(flops, grad_bytes, batch, n, bucket_mb, mfu)})
    return {"rows": rows, "batch": batch, "bucket_mb": bucket_mb}


def format_paper(p: dict) -> str:
    return (f"on paper: per-GPU batch {p['batch']}, bf16 compute, fp32 gradients, bucket_cap_mb {p['bucket_mb']:g}\n" +
            table(p["rows"], [("model", "model (width 1)"), ("gflop", "fwd GFLOP/sample"), ("grad_mb", "grad MB"),
                              ("mfu", "MFU"), ("n", "GPUs"), ("link", "link"), ("bw", "bus GB/s"),
                              ("t_c_ms", "compute ms"), ("t_ar_ms", "all-reduce ms"), ("tail_ms", "last bucket ms"),
                              ("latency_ms", "ring latency ms"), ("e_serial", "eff. no overlap"),
                              ("e_overlap", "eff. DDP overlap")]))
