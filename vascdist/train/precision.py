"""What train.precision means on a device: the one rule the loop, evaluation, the DeepSpeed config and the
benchmarks share; and train.deterministic, the kernels' side of reproducibility."""

from __future__ import annotations

import contextlib
import os

import torch


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether train.precision means bf16 here: 'bf16', or 'auto' on a CUDA device that supports it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when `uses_bf16`; fp32 (no autocast) otherwise."""
    if uses_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_deterministic_kernels(on: bool) -> None:
    """train.deterministic: deterministic cuDNN algorithms (no autotuning) and torch's deterministic mode.

    warn_only: an op with no deterministic CUDA kernel warns instead of stopping the run. cuBLAS needs a fixed
    workspace to repeat its sums; its variable is read when the first cuBLAS handle is made, so it is set here,
    before the model's first matmul (a value already set by the user is kept).
    """
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # That mode also fills every torch.empty with NaN (to expose reads of uninitialised memory): a pass over
    # DeepSpeed's flat buffers each step (7x slower steps on a CPU), and no part of repeatability.
    torch.utils.deterministic.fill_uninitialized_memory = False
