"""What train.precision means on a device: the one rule the loop, evaluation, the DeepSpeed config and the
benchmarks share."""

from __future__ import annotations

import contextlib

import torch


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether train.precision means bf16 here: 'bf16', or 'auto' on a CUDA device that supports it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when `uses_bf16`; fp32 (no autocast) otherwise."""
    if uses_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
