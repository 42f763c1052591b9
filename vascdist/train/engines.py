"""Engines: how one optimiser step is carried out and checkpointed (plain/DDP here, DeepSpeed beside it).

The loop calls the same methods on each: `micro_step_context`, `backward`, `step`, `skip`, `state_dict`,
`save_checkpoint` (called on every rank; the engine decides which ranks write) and `load_checkpoint`."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vascdist.config import Config
from vascdist.dist import DistEnv
from vascdist.errors import ConfigError
from vascdist.train.checkpoint import CheckpointManager


def grad_norm(module: nn.Module) -> float:
    """Global 2-norm of the module's gradients (already all-reduced, so the same on every rank)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class TorchEngine:
    """Single process or DistributedDataParallel; gradient accumulation uses DDP's no_sync()."""

    name = "ddp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        self.module, self.optimizer, self.cfg, self.env = module, optimizer, cfg, env
        model: nn.Module = module
        if env.distributed:
            model = DistributedDataParallel(
                module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                bucket_cap_mb=cfg.dist.bucket_cap_mb, gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                static_graph=cfg.dist.static_graph)
        self.model = torch.compile(model) if cfg.train.compile else model
        self._wrapped = model

    def micro_step_context(self, is_last: bool):
        """No gradient all-reduce on the micro-batches before the last one of an optimiser step."""
        if self.env.distributed and not is_last:
            return self._wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, want_norm: bool = True) -> float:
        """Clip (if configured), step, zero the grads; returns the global gradient norm before clipping
        (NaN when neither clipping nor the caller needs it: computing it is a pass over every gradient and,
        on a GPU, a host synchronisation)."""
        if self.cfg.train.grad_clip:
            total = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
            norm = float(total) if want_norm else math.nan
        elif want_norm:
            norm = grad_norm(self.module)
        else:
            norm = math.nan
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip(self) -> None:
        """Drop this step's gradients (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "engine": self.name}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, manager: CheckpointManager, step: int, state: dict, is_best: bool = False) -> None:
        """Model and optimiser are replicated on every rank, so global rank 0 alone writes the one file."""
        if self.env.is_main:
            manager.save(step, state, is_best=is_best)

    def load_checkpoint(self, manager: CheckpointManager, path) -> dict:
        """Every rank reads the file and restores model and optimiser; returns the whole saved state."""
        state = manager.load(path)
        written_by = state["engine"].get("engine", self.name)
        if written_by != self.name:
            raise ConfigError(f"checkpoint {path} was written by dist.engine={written_by}; resume it with "
                              f"dist.engine={written_by} (this run has dist.engine={self.cfg.dist.engine})")
        self.load_state_dict(state["engine"])
        return state


def prepare_module(module: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Device, memory format and SyncBatchNorm: everything done to the bare model before the optimiser sees it."""
    if cfg.dist.sync_batchnorm and env.distributed:
        if env.device.type != "cuda":
            raise ConfigError("dist.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                              "use model.norm=group for batch-size-independent normalisation on CPU")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module = module.to(env.device)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
    """The engine named by dist.engine: TorchEngine ('ddp', also a single process) or DeepSpeedEngine."""
    if cfg.dist.engine == "deepspeed":
        from vascdist.train.deepspeed_engine import DeepSpeedEngine  # imports deepspeed only when asked for
        return DeepSpeedEngine(module, optimizer, cfg, env)
    return TorchEngine(module, optimizer, cfg, env)
