"""The loaders a run reads from, as its config asks (data.loader): the one place training builds them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vascdist.data.dataloader import WorkerLoader
from vascdist.data.loader import ShardStream, StreamingLoader

if TYPE_CHECKING:
    from vascdist.config import Config, DataConfig
    from vascdist.dist import DistEnv


def build_loader(data: DataConfig, stream: ShardStream, pin_memory: bool = False) -> StreamingLoader | WorkerLoader:
    """The loader `data` (the config's data section) asks for over `stream`: reader threads or a DataLoader.

    Evaluation splits, read once per evaluation, get at most one thread or worker."""
    if data.loader == "dataloader":
        workers = data.workers if stream.train else min(data.workers, 1)
        return WorkerLoader(stream, workers, data.worker_prefetch_factor, data.persistent_workers, pin_memory)
    threads = data.reader_threads if stream.train else min(data.reader_threads, 1)
    return StreamingLoader(stream, threads, data.windows_ahead, pin_memory)


def build_loaders(cfg: Config, env: DistEnv) -> tuple[StreamingLoader | WorkerLoader, ...]:
    """Train / val / test loaders for this rank (pinned memory on a CUDA device)."""
    aug = (cfg.data.freq_mask, cfg.data.time_mask) if cfg.data.spec_augment else None
    pin = env.device.type == "cuda"

    def make(split: str, train: bool) -> StreamingLoader | WorkerLoader:
        stream = ShardStream(cfg.data.shards, split, cfg.data.batch_size, env.rank, env.world_size, cfg.train.seed,
                             train=train, shuffle_chunks=cfg.data.shuffle_chunks, spec_augment=aug,
                             transform=cfg.data.transform, split_file=cfg.data.split_file,
                             noise_floor_db=tuple(cfg.data.noise_floor_db) or None, time_shift=cfg.data.time_shift)
        return build_loader(cfg.data, stream, pin)
    return make("train", True), make("val", False), make("test", False)
