"""Engines: how one optimiser step is carried out and checkpointed. `Engine` is the interface the loop and
TrainState use; `TorchEngine` (one process or DDP) implements it here, `DeepSpeedEngine` beside it
(deepspeed_engine.py)."""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from vascdist.config import Config
from vascdist.dist import DistEnv, convert_sync_batchnorm, ensure_process_group, on_main, wrap_ddp
from vascdist.errors import ConfigError, VascdistError
from vascdist.train.saved import EngineState, SavedCheckpoint
from vascdist.train.state import CheckpointManager


def grad_norm(module: nn.Module) -> float:
    """Global 2-norm of the module's gradients (already all-reduced, so the same on every rank)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class Engine(Protocol):
    """What the loop calls on an engine. `module` is the bare model (its weights, evaluation); whatever wraps it
    for training (DDP, torch.compile, DeepSpeed's engine) stays private to the engine."""

    name: str
    """dist.engine's value; saved in the checkpoint, so that a resume with the other engine is refused."""
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward, through whatever wraps the model."""
        ...

    def micro_step_context(self, is_last: bool) -> AbstractContextManager:
        """Entered around each micro-batch's forward and backward; `is_last` on the optimiser step's last one."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by train.grad_accum)."""
        ...

    def step(self, want_norm: bool = True) -> float:
        """Clip, update, zero the gradients; the global gradient norm before clipping (NaN when not computed)."""
        ...

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss on some rank); weights and optimiser state unchanged."""
        ...

    def state_dict(self) -> dict:
        """The engine's part of a checkpoint (the full model weights at least)."""
        ...

    def save_checkpoint(self, manager: CheckpointManager, step: int, state: dict, is_best: bool = False) -> None:
        """Called on every rank; the engine decides which ranks write what."""
        ...

    def load_checkpoint(self, manager: CheckpointManager, path: str | Path) -> SavedCheckpoint:
        """Called on every rank: restore model and optimiser from `path`; returns the whole saved state."""
        ...


class TorchEngine:
    """Single process or DistributedDataParallel; gradient accumulation uses DDP's no_sync().

    DDP wraps the model when several processes run, or in a single one with dist.ddp_one_rank (a one-rank
    process group: the DDP and NCCL path on one GPU)."""

    name = "ddp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        self.module, self.optimizer, self.cfg, self.env = module, optimizer, cfg, env
        self._ddp = None
        if env.distributed or cfg.dist.ddp_one_rank:
            ensure_process_group(env)
            self._ddp = wrap_ddp(module, env, cfg.dist)
        wrapped = self._ddp or module
        self._forward = torch.compile(wrapped) if cfg.train.compile else wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward (through DDP and torch.compile when they are on)."""
        return self._forward(x)

    def micro_step_context(self, is_last: bool) -> AbstractContextManager:
        """No gradient all-reduce on the micro-batches before the last one of an optimiser step."""
        if self._ddp is not None and not is_last:
            return self._ddp.no_sync()
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
        return EngineState(self.name, self.module.state_dict(), self.optimizer.state_dict()).to_dict()

    def save_checkpoint(self, manager: CheckpointManager, step: int, state: dict, is_best: bool = False) -> None:
        """Model and optimiser are replicated on every rank, so global rank 0 alone writes the one file."""
        on_main(self.env, manager.save, step, state, is_best=is_best)

    def load_checkpoint(self, manager: CheckpointManager, path: str | Path) -> SavedCheckpoint:
        """Every rank reads the file and restores model and optimiser; returns the whole saved state."""
        saved = manager.read(path)
        written_by = saved.engine.name
        if written_by != self.name:
            raise ConfigError(f"checkpoint {path} was written by dist.engine={written_by}; resume it with "
                              f"dist.engine={written_by} (this run has dist.engine={self.cfg.dist.engine})")
        if saved.engine.optimizer is None:
            raise VascdistError(f"checkpoint '{path}' holds no optimiser state; it cannot be resumed")
        try:
            self.module.load_state_dict(saved.engine.model)
            self.optimizer.load_state_dict(saved.engine.optimizer)
        except (RuntimeError, KeyError, ValueError) as exc:  # another architecture or optimiser than the checkpoint's
            raise ConfigError(f"checkpoint {path} does not fit this run's model or optimiser "
                              f"({str(exc).strip().splitlines()[0][:200]}); resume it with the config it was "
                              "trained with") from None
        return saved


def prepare_module(module: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Device, memory format and SyncBatchNorm: everything done to the bare model before the optimiser sees it."""
    if cfg.dist.sync_batchnorm:
        module = convert_sync_batchnorm(module, env)
    module = module.to(env.device)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module
