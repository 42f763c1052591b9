"""Will a training step fit in memory? An estimate made before training, so that a config too big for the machine
is refused with one line instead of being killed by the kernel's OOM killer minutes later (exit 137, no message).

The activation part is measured, not guessed: one forward pass of a batch of 2 in training mode records the bytes
of every tensor autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`), which scales
with the micro-batch (measured under bf16 autocast when the run uses bf16). Weights, gradients and optimiser
state come from the parameter count. Workspace and allocator slack are not counted, so a step that fits by a
hair may still fail; `train.check_memory=false` skips the check.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vascdist.config import Config, batch_sizes
from vascdist.dist import DistEnv
from vascdist.errors import ConfigError
from vascdist.train.precision import uses_bf16

GB = 1e9
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2, "adabound": 2}  # fp32 tensors per parameter (SGD: momentum)


def saved_bytes_per_sample(model: nn.Module, input_shape: tuple[int, ...], bf16: bool = False) -> int:
    """Bytes autograd keeps for the backward pass per sample (parameters excluded), from a batch of 2 on the CPU
    (under bf16 autocast when `bf16`: the dtypes a bf16 run saves)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(torch.zeros((2, *input_shape)))
    finally:
        model.train(was_training)
    return total // 2


def step_bytes(cfg: Config, model: nn.Module, input_shape: tuple[int, ...], micro_batch: int,
               bf16: bool = False) -> tuple[int, int]:
    """(activation bytes of one micro-batch, bytes of fp32 weights + gradients + optimiser state)."""
    n_params = sum(p.numel() for p in model.parameters())
    states = OPTIMIZER_STATES.get(cfg.optim.name, 2) if not (cfg.optim.name == "sgd" and cfg.optim.momentum == 0) else 0
    return saved_bytes_per_sample(model, input_shape, bf16) * micro_batch, 4 * n_params * (2 + states)


def available_bytes(device: torch.device, ranks_here: int = 1) -> tuple[int, str]:
    """(free bytes this rank may use, where): free GPU memory, or the host's available memory shared by its
    `ranks_here` ranks (DistEnv.local_world_size)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{torch.cuda.get_device_name(device)} ({device})"
    import psutil
    available = psutil.virtual_memory().available
    return available // max(1, ranks_here), "this host" + (f" / {ranks_here} ranks" if ranks_here > 1 else "")


def check_memory(cfg: Config, index: dict, env: DistEnv) -> int:
    """Raise ConfigError when the estimated peak of a training step exceeds the free memory; returns the estimate."""
    from vascdist.models import build_model
    shape = tuple(index["sample_shape"])
    micro = batch_sizes(cfg.data.batch_size, env.world_size, cfg.train.grad_accum).micro
    model = build_model(cfg.model, len(index["classes"]), shape)  # on the CPU: the estimate needs no device
    activations, states = step_bytes(cfg, model, shape, micro, uses_bf16(cfg.train.precision, env.device))
    need = activations + states
    free, where = available_bytes(env.device, env.local_world_size)
    if need > free:
        raise ConfigError(f"a training step of model.name={cfg.model.name} (width {cfg.model.width:g}) at micro-batch "
                          f"{micro} needs about {need / GB:.1f} GB ({activations / GB:.1f} GB activations, "
                          f"{states / GB:.2f} GB weights/gradients/optimiser) but {where} has {free / GB:.1f} GB free; "
                          "lower data.batch_size, raise train.grad_accum, use a GPU, or set train.check_memory=false")
    return need
