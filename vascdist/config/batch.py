"""Batch arithmetic: the one place where data.batch_size becomes per-rank and micro-batch sizes.

The loader, the loop, the DeepSpeed config and the config check all take their sizes from `batch_sizes`, so
they cannot disagree (they once did: 48 samples on 4 ranks with 8 accumulation steps loaded 12 per rank and
trained on 8 of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from vascdist.errors import ConfigError


@dataclass(frozen=True)
class BatchSizes:
    """How one optimiser step's global batch is spread over ranks and accumulation steps."""
    global_batch: int
    """data.batch_size: samples per optimiser step, all ranks together."""
    world_size: int
    grad_accum: int
    """train.grad_accum: micro-batches per optimiser step on each rank."""

    @property
    def per_rank(self) -> int:
        """Samples each rank loads per optimiser step."""
        return self.global_batch // self.world_size

    @property
    def micro(self) -> int:
        """Samples in one forward/backward on one rank."""
        return self.per_rank // self.grad_accum


def batch_sizes(batch_size: int, world_size: int, grad_accum: int = 1) -> BatchSizes:
    """The sizes for `world_size` ranks; ConfigError naming the keys unless every sample of the batch is used."""
    if batch_size < 1 or world_size < 1 or grad_accum < 1:
        raise ConfigError(f"config keys 'data.batch_size' ({batch_size}) and 'train.grad_accum' ({grad_accum}) must be "
                          f">= 1 on >= 1 ranks (got {world_size})")
    if batch_size % (world_size * grad_accum):
        raise ConfigError(f"config key 'data.batch_size' ({batch_size}) must be divisible by the number of ranks x "
                          f"'train.grad_accum' ({world_size} x {grad_accum} = {world_size * grad_accum}), else "
                          f"samples of every batch would be dropped; try data.batch_size="
                          f"{max(1, batch_size // (world_size * grad_accum)) * world_size * grad_accum}")
    return BatchSizes(batch_size, world_size, grad_accum)


def eval_batch_per_rank(batch_size: int, world_size: int) -> int:
    """Samples per evaluation batch on each rank: evaluation takes every sample once, so nothing must divide."""
    return max(1, batch_size // world_size)
