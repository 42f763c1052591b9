"""Streaming loader over HDF5 shards: a global, deterministic sample order that any world size shares.

The order of an epoch is a function of (seed, epoch) alone:
  1. the split's chunks (HDF5 chunks of `chunk_size` samples) are permuted;
  2. consecutive groups of `shuffle_chunks` chunks form a *window*; samples are permuted inside it
     (a shuffle buffer whose contents do not depend on how many processes read);
  3. the concatenated windows are cut into global batches of `batch_size`; rank r of R takes the r-th
     slice of B/R samples of every global batch.
So 1, 2 or 4 ranks see the same samples in every optimiser step, and the loader's state is global
(epoch, global batches consumed): a checkpoint taken on 4 ranks resumes on 2 or 1 at the same sample.

Workers each take every N-th window, read its chunks with one contiguous HDF5 call per chunk, gather this
rank's rows, normalise (train-split per-band mean/std from index.json), optionally augment, and hand whole
windows to the main process, which cuts them into batches. HDF5 files are opened lazily in each worker.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vascdist.data.shards import load_index
from vascdist.errors import ConfigError, VascdistError

_TAG = zlib.crc32(b"vascdist-loader")


@dataclass(frozen=True)
class Chunk:
    file: str
    start: int
    stop: int


def split_chunks(index: dict, split: str) -> list[Chunk]:
    """The split's HDF5 chunks in storage order."""
    size = int(index["preprocess"]["chunk_size"])
    chunks = []
    for entry in index["shards"]:
        if entry["split"] == split:
            chunks += [Chunk(entry["file"], s, min(s + size, entry["samples"])) for s in range(0, entry["samples"], size)]
    return chunks


class EpochPlan:
    """Which sample sits at which global position in one epoch (cheap to compute in every process)."""

    def __init__(self, chunks: list[Chunk], shuffle_chunks: int, seed: int, epoch: int, shuffle: bool):
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        order = np.random.default_rng([seed, epoch, _TAG]).permutation(len(chunks)) if shuffle else np.arange(len(chunks))
        ordered = [chunks[i] for i in order]
        self.windows = [ordered[i:i + shuffle_chunks] for i in range(0, len(ordered), shuffle_chunks)]
        sizes = [sum(c.stop - c.start for c in w) for w in self.windows]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global position of each window
        self.total = int(self.starts[-1])

    def window_order(self, w: int) -> np.ndarray:
        """Permutation of window w's rows (row i = i-th sample of its chunks concatenated)."""
        n = int(self.starts[w + 1] - self.starts[w])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, w, _TAG]).permutation(n)


class ShardStream(IterableDataset):
    """Yields, per window, this rank's samples of that window as a dict of tensors (see module docstring)."""

    def __init__(self, shards_dir: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, shuffle_chunks: int = 16, spec_augment: tuple[int, int] | None = None):
        self.root = Path(shards_dir)
        self.index = load_index(self.root)
        if split not in self.index["splits"]:
            raise VascdistError(f"{self.root}: no split '{split}'")
        self.split, self.rank, self.world_size, self.seed, self.train = split, rank, world_size, seed, train
        self.chunks = split_chunks(self.index, split)
        self.num_samples = sum(c.stop - c.start for c in self.chunks)
        self.shuffle_chunks = shuffle_chunks
        self.spec_augment = spec_augment if train else None
        norm = self.index["normalization"]
        shape = [1] * len(self.index["sample_shape"])
        if norm["axis"] >= 0:
            shape[norm["axis"]] = -1
        self.mean = np.asarray(norm["mean"], np.float32).reshape(shape)
        self.inv_std = (1.0 / np.asarray(norm["std"], np.float32)).reshape(shape)
        if train:
            if batch_size % world_size:
                raise ConfigError(f"data.batch_size ({batch_size}) must be divisible by the number of ranks ({world_size})")
            self.global_batch = batch_size
            self.local_batch = batch_size // world_size
            self.batches_per_epoch = self.num_samples // batch_size
            if self.batches_per_epoch == 0:
                raise ConfigError(f"data.batch_size ({batch_size}) is larger than the {split} split ({self.num_samples} samples)")
        else:
            # Evaluation: every sample once; rank r takes a contiguous 1/R of the positions.
            self.global_batch = batch_size
            self.local_batch = max(1, batch_size // world_size)
            lo, hi = self._eval_range()
            self.batches_per_epoch = -(-(hi - lo) // self.local_batch)
        self.epoch, self.start_batch = 0, 0
        self._files: dict[str, h5py.File] = {}

    # ---------------------------------------------------------------- positions this rank owns
    def _eval_range(self) -> tuple[int, int]:
        return self.rank * self.num_samples // self.world_size, (self.rank + 1) * self.num_samples // self.world_size

    def _owned(self, lo: int, hi: int, first: int) -> np.ndarray:
        """Global positions in [lo, hi) that this rank reads, from position `first` on."""
        pos = np.arange(max(lo, first), hi, dtype=np.int64)
        if self.train:
            end = self.batches_per_epoch * self.global_batch  # the incomplete last global batch is dropped
            in_slice = (pos % self.global_batch) // self.local_batch == self.rank
            return pos[in_slice & (pos < end)]
        a, b = self._eval_range()
        return pos[(pos >= a) & (pos < b)]

    def _first_position(self) -> int:
        return self.start_batch * self.global_batch if self.train else 0

    # ---------------------------------------------------------------- reading
    def _dataset(self, file: str, name: str):
        if file not in self._files:  # opened lazily, so every worker process has its own handle after fork
            self._files[file] = h5py.File(self.root / file, "r", rdcc_nbytes=0)
        return self._files[file][name]

    def _read_window(self, plan: EpochPlan, w: int, positions: np.ndarray) -> dict[str, torch.Tensor]:
        rows = plan.window_order(w)[positions - plan.starts[w]]  # row within the window's chunks
        chunks = plan.windows[w]
        bounds = np.cumsum([0] + [c.stop - c.start for c in chunks])
        out_x = np.empty((len(rows), *self.index["sample_shape"]), np.float32)
        out = {k: np.empty(len(rows), np.int64) for k in ("y", "patient", "recording", "cycle")}
        for i, chunk in enumerate(chunks):
            sel = np.flatnonzero((rows >= bounds[i]) & (rows < bounds[i + 1]))
            if not len(sel):
                continue
            local = rows[sel] - bounds[i]
            lo, hi = chunk.start + int(local.min()), chunk.start + int(local.max()) + 1
            block = self._dataset(chunk.file, "x")[lo:hi]  # one contiguous, chunk-aligned read
            out_x[sel] = block[local - (lo - chunk.start)]
            for k in out:
                out[k][sel] = self._dataset(chunk.file, k)[lo:hi][local - (lo - chunk.start)]
        out_x -= self.mean
        out_x *= self.inv_std
        if self.spec_augment is not None:
            self._augment(out_x, plan, w, positions)
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch["x"] = torch.from_numpy(out_x)
        batch["position"] = torch.from_numpy(positions)
        return batch

    def _augment(self, x: np.ndarray, plan: EpochPlan, w: int, positions: np.ndarray) -> None:
        """SpecAugment: one frequency and one time mask per sample, set to 0 (the normalised mean).

        Written here rather than with torchaudio's maskers because those draw from the global RNG per call,
        so a sample's mask would depend on which other samples share the call (world size, resume point);
        drawing from a generator seeded by the sample's global position keeps augmentation exact.
        """
        max_f, max_t = self.spec_augment
        n_f, n_t = x.shape[-2], x.shape[-1]
        rng = np.random.default_rng([self.seed, plan.epoch, w, _TAG + 1])
        draws = rng.random((int(plan.starts[w + 1] - plan.starts[w]), 4))[positions - plan.starts[w]]
        f_width = (draws[:, 0] * (max_f + 1)).astype(int)
        f_start = (draws[:, 1] * np.maximum(n_f - f_width, 1)).astype(int)
        t_width = (draws[:, 2] * (max_t + 1)).astype(int)
        t_start = (draws[:, 3] * np.maximum(n_t - t_width, 1)).astype(int)
        f_idx, t_idx = np.arange(n_f), np.arange(n_t)
        f_mask = (f_idx >= f_start[:, None]) & (f_idx < (f_start + f_width)[:, None])  # (N, F)
        t_mask = (t_idx >= t_start[:, None]) & (t_idx < (t_start + t_width)[:, None])  # (N, T)
        keep = ~(f_mask[:, :, None] | t_mask[:, None, :])  # (N, F, T)
        x *= keep[:, None]

    def __iter__(self):
        plan = EpochPlan(self.chunks, self.shuffle_chunks, self.seed, self.epoch, shuffle=self.train)
        first = self._first_position()
        windows = [w for w in range(len(plan.windows)) if plan.starts[w + 1] > first]
        info = get_worker_info()
        if info is not None:
            windows = windows[info.id::info.num_workers]
        for w in windows:
            positions = self._owned(int(plan.starts[w]), int(plan.starts[w + 1]), first)
            if len(positions):
                yield self._read_window(plan, w, positions)
            else:
                yield None  # keeps the round-robin order of windows across workers intact

    def __del__(self):
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass


class StreamingLoader:
    """Batches for one rank, from ShardStream windows; resumable mid-epoch through state_dict()."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False):
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.epoch, self.batches = 0, 0  # global batches consumed in `epoch`

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "global_batch": self.stream.global_batch,
                "num_samples": self.stream.num_samples, "seed": self.stream.seed, "split": self.stream.split}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.stream.global_batch:
            raise ConfigError(f"data.batch_size (global) is {self.stream.global_batch} but the checkpoint was taken with "
                              f"{state['global_batch']}; resume with data.batch_size={state['global_batch']} "
                              "(any number of ranks that divides it works)")
        if state["num_samples"] != self.stream.num_samples or state["seed"] != self.stream.seed:
            raise ConfigError(f"the {state['split']} split has {self.stream.num_samples} samples (seed {self.stream.seed}) but "
                              f"the checkpoint saw {state['num_samples']} (seed {state['seed']}); resume on the same shards and train.seed")
        self.epoch, self.batches = state["epoch"], state["batches"]

    def __iter__(self):
        stream = self.stream
        stream.epoch, stream.start_batch = self.epoch, self.batches
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False,
                            # Its own generator: creating an iterator must not draw from the global torch RNG,
                            # or a resumed run would diverge from an uninterrupted one.
                            generator=torch.Generator().manual_seed(stream.seed * 100003 + self.epoch))
        size = stream.local_batch
        carry: list[dict[str, torch.Tensor]] = []
        carried = 0
        for window in loader:
            if window is None:
                continue
            carry.append(window)
            carried += len(window["y"])
            while carried >= size:
                merged = carry[0] if len(carry) == 1 else {k: torch.cat([c[k] for c in carry]) for k in carry[0]}
                batch = {k: v[:size] for k, v in merged.items()}
                rest = {k: v[size:] for k, v in merged.items()}
                carry, carried = ([rest] if len(rest["y"]) else []), carried - size
                self.batches += 1
                yield batch
        if carried and not stream.train:
            merged = {k: torch.cat([c[k] for c in carry]) for k in carry[0]}
            self.batches += 1
            yield merged
        if stream.train:
            self.epoch, self.batches = self.epoch + 1, 0
