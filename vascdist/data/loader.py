"""Streaming loader over HDF5 shards: a global, deterministic sample order that any world size shares.

The order of an epoch is a function of (seed, epoch) alone:
  1. the split's chunks (HDF5 chunks of `chunk_size` samples) are permuted;
  2. consecutive groups of `shuffle_chunks` chunks form a *window*; samples are permuted inside it
     (a shuffle buffer whose contents do not depend on how many processes read);
  3. the concatenated windows are cut into global batches of `batch_size`; rank r of R takes the r-th
     slice of B/R samples of every global batch.
So 1, 2 or 4 ranks see the same samples in every optimiser step, and the loader's state is global
(epoch, global batches consumed): a checkpoint taken on 4 ranks resumes on 2 or 1 at the same sample.

Reader threads each take every N-th window and read this rank's samples of it, in shuffled order and cut
at batch boundaries, straight into float16 batches exactly as stored (vascdist.data.reader). Normalisation
and SpecAugment run on the training device (vascdist.data.transform): that halves the bytes the host
touches and copies to the GPU, and there they cost nothing next to the model.

Threads by default (data.loader=threads): the per-sample work is the kernel's copy from the page cache, with
the GIL released, so threads run in parallel, and no batch has to cross a process boundary. The same stream
also runs under a stock torch DataLoader with worker processes (vascdist.data.dataloader, data.loader=
dataloader), for CPU-heavy Python transforms that threads could not run in parallel under the GIL; both give
the same batches (BENCHMARKS.md, "Loader", measures them side by side).
"""

from __future__ import annotations

import queue
import threading
import zlib
from pathlib import Path

import numpy as np
import torch

from vascdist.data.hooks import load_callable
from vascdist.data.folds import patient_segments, split_index
from vascdist.data.reader import Chunk, ChunkLayout, WindowReader
from vascdist.data.transform import AUGMENT_COLUMNS, NO_FLOOR
from vascdist.config.batch import batch_sizes, eval_batch_per_rank
from vascdist.errors import ConfigError, VascdistError

_TAG = zlib.crc32(b"vascdist-loader")


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


class ShardStream:
    """One split of a shard set as this rank reads it: the epoch's windows, cut into this rank's batch pieces."""

    def __init__(self, shards_dir: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, shuffle_chunks: int = 16, spec_augment: tuple[int, int] | None = None,
                 transform: str = "", split_file: str = "", noise_floor_db: tuple[float, float] | None = None,
                 time_shift: bool = False):
        """`spec_augment` (widest frequency and time mask), `noise_floor_db` (lowest and highest floor, dB relative to
        the recording's band mean) and `time_shift` (a random circular shift in time): per-sample augmentation of
        training spectrograms (data.spec_augment, data.noise_floor_db, data.time_shift), drawn here and applied by
        vascdist.data.transform; ignored when `train` is false. `transform`: dotted path of a callable (batch dict, torch.Generator) -> batch dict applied to every
        training batch (config key data.transform); ignored when `train` is false. `split_file` (data.split_file):
        the split's rows are its patients' in any shard (vascdist.data.folds), and the index carries that file's
        normalisation."""
        self.root = Path(shards_dir)
        self.index = split_index(self.root, split_file)
        if split not in self.index["splits"]:
            raise VascdistError(f"{self.root}: no split '{split}'")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of {world_size} process(es)")
        self.split, self.rank, self.world_size, self.seed, self.train = split, rank, world_size, seed, train
        self.chunks = (patient_segments(self.root, self.index, self.index["split_patients"][split]) if split_file
                       else split_chunks(self.index, split))
        self.num_samples = sum(c.stop - c.start for c in self.chunks)
        self.shuffle_chunks = shuffle_chunks
        self.sample_shape = tuple(self.index["sample_shape"])
        self.spec_augment = spec_augment if train else None
        self.noise_floor_db = noise_floor_db if train else None
        self.time_shift = time_shift and train
        self.augments = self.spec_augment is not None or self.noise_floor_db is not None or self.time_shift
        if self.augments and len(self.sample_shape) != 3:
            raise ConfigError(f"data.spec_augment, data.noise_floor_db and data.time_shift need spectrogram shards; "
                              f"{self.root} holds {self.index['kind']} samples of shape {list(self.sample_shape)}")
        if train:
            self.global_batch = batch_size
            self.local_batch = batch_sizes(batch_size, world_size).per_rank
            self.batches_per_epoch = self.num_samples // batch_size
            if self.batches_per_epoch == 0:
                raise ConfigError(f"data.batch_size ({batch_size}) is larger than the {split} split ({self.num_samples} samples)")
        else:
            # Evaluation: every sample once; rank r takes a contiguous 1/R of the positions.
            self.global_batch = batch_size
            self.local_batch = eval_batch_per_rank(batch_size, world_size)
            lo, hi = self._eval_range()
            self.batches_per_epoch = -(-(hi - lo) // self.local_batch)
        self.transform = transform if train else ""
        self._transform_fn = load_callable(transform, "data.transform") if self.transform else None
        self.epoch, self.start_batch = 0, 0
        self.layout = ChunkLayout(self.root, int(self.index["preprocess"]["chunk_size"]), self.sample_shape,
                                  {e["file"]: e["samples"] for e in self.index["shards"]}, len(self.index["classes"]))

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

    def _local_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of each owned position in this rank's sequence of samples (batch k holds [kL, (k+1)L))."""
        if self.train:
            return (positions // self.global_batch) * self.local_batch + positions % self.global_batch - self.rank * self.local_batch
        return positions - self._eval_range()[0]

    def batch_numbers(self, positions: np.ndarray) -> np.ndarray:
        """The batch of this rank's epoch that each owned position falls in (the global batch index when training)."""
        return self._local_index(positions) // self.local_batch

    def finish(self, batch: dict, index: int) -> dict:
        """Batch number `index` of the epoch after the user's data.transform (training only; else unchanged).

        The transform draws from a generator seeded by (train.seed, epoch, global batch, rank): the same
        batch gets the same draw whichever loader, thread or worker made it, and after a resume.
        """
        if self._transform_fn is None:
            return batch
        seed = np.random.default_rng([self.seed, self.epoch, index, self.rank, _TAG + 2]).integers(2**63)
        out = self._transform_fn(batch, torch.Generator().manual_seed(int(seed)))
        if not isinstance(out, dict) or not isinstance(out.get("x"), torch.Tensor) or len(out["x"]) != len(batch["x"]):
            raise VascdistError(f"data.transform '{self.transform}' must return the batch dict with an 'x' of "
                                f"{len(batch['x'])} samples, got {type(out).__name__}")
        return out

    def _first_position(self) -> int:
        return self.start_batch * self.global_batch if self.train else 0

    def plan(self) -> EpochPlan:
        return EpochPlan(self.chunks, self.shuffle_chunks, self.seed, self.epoch, shuffle=self.train)

    def windows(self, plan: EpochPlan) -> list[tuple[int, np.ndarray]]:
        """(window, the global positions this rank reads in it) for the rest of the epoch, in order."""
        first = self._first_position()
        return [(w, self._owned(int(plan.starts[w]), int(plan.starts[w + 1]), first))
                for w in range(len(plan.windows)) if plan.starts[w + 1] > first]

    # ---------------------------------------------------------------- reading
    def new_reader(self, pin_memory: bool = False, prefetch_windows: int = 2) -> WindowReader:
        """A reader for one thread: its own staging buffer and pool of batch buffers."""
        rows_per_window = self.shuffle_chunks * int(self.index["preprocess"]["chunk_size"])
        keep = (prefetch_windows + 2) * (-(-rows_per_window // self.local_batch) + 1)
        return WindowReader(self.layout, self.sample_shape, self.local_batch, pin_memory, keep)

    def read_window(self, reader: WindowReader, plan: EpochPlan, w: int, positions: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """This rank's samples of window w, in order, as pieces that never cross a batch boundary."""
        if not len(positions):
            return []
        rows = plan.window_order(w)[positions - plan.starts[w]]  # row within the window's chunks
        local = self._local_index(positions)
        cuts = [0, *np.flatnonzero(local[1:] % self.local_batch == 0) + 1, len(rows)]
        xs, ints = reader.read(plan.windows[w], rows, cuts)
        augment = self._augment_params(plan, w, positions) if self.augments else None
        pieces = []
        for x, a, b in zip(xs, cuts[:-1], cuts[1:]):
            piece = {"x": x, **{k: torch.from_numpy(v[a:b]) for k, v in ints.items()},
                     "position": torch.from_numpy(positions[a:b])}
            if augment is not None:
                piece["augment"] = torch.from_numpy(augment[a:b])
            pieces.append(piece)
        return pieces

    def _augment_params(self, plan: EpochPlan, w: int, positions: np.ndarray) -> np.ndarray:
        """Augmentation per sample, int64 (N, AUGMENT_COLUMNS): SpecAugment's (freq start, freq width, time start,
        time width), the time shift (frames) and the noise floor (hundredths of a dB; NO_FLOOR for none).

        Drawn here rather than with torchaudio's maskers because those draw from the global RNG per call,
        so a sample's mask would depend on which other samples share the call (world size, resume point);
        drawing from a generator seeded by the window and indexed by the sample's position keeps augmentation
        exact. vascdist.data.transform applies them on the device. The shift and the floor come from a generator
        of their own, so that SpecAugment's masks are the same with or without them.
        """
        n_f, n_t = self.sample_shape[-2], self.sample_shape[-1]
        n_window = int(plan.starts[w + 1] - plan.starts[w])
        out = np.zeros((len(positions), AUGMENT_COLUMNS), dtype=np.int64)
        if self.spec_augment is not None:
            max_f, max_t = self.spec_augment
            rng = np.random.default_rng([self.seed, plan.epoch, w, _TAG + 1])
            draws = rng.random((n_window, 4))[positions - plan.starts[w]]
            out[:, 1] = (draws[:, 0] * (max_f + 1)).astype(np.int64)
            out[:, 0] = (draws[:, 1] * np.maximum(n_f - out[:, 1], 1)).astype(np.int64)
            out[:, 3] = (draws[:, 2] * (max_t + 1)).astype(np.int64)
            out[:, 2] = (draws[:, 3] * np.maximum(n_t - out[:, 3], 1)).astype(np.int64)
        draws = np.random.default_rng([self.seed, plan.epoch, w, _TAG + 2]).random((n_window, 2))[positions - plan.starts[w]]
        if self.time_shift:
            out[:, 4] = (draws[:, 0] * n_t).astype(np.int64)
        if self.noise_floor_db is not None:
            lo, hi = self.noise_floor_db
            out[:, 5] = np.round(100 * (lo + draws[:, 1] * (hi - lo))).astype(np.int64)
        else:
            out[:, 5] = NO_FLOOR
        return out


class _Stop(Exception):
    pass


class EpochPosition:
    """Where a loader is in the epoch (epoch, batches consumed), saved and checked on resume: what both loaders
    (StreamingLoader here, WorkerLoader over a torch DataLoader) keep the same way. Needs `self.stream`."""

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


class StreamingLoader(EpochPosition):
    """Batches for one rank (dicts of tensors; x is float16 as stored), resumable mid-epoch through state_dict()."""

    def __init__(self, stream: ShardStream, threads: int = 0, windows_ahead: int = 2, pin_memory: bool = False):
        """`threads` reader threads (0: read in the consuming thread), each `windows_ahead` windows ahead
        (config keys data.reader_threads and data.windows_ahead)."""
        self.stream = stream
        self.threads = threads
        self.windows_ahead = windows_ahead
        self.pin_memory = pin_memory
        self.epoch, self.batches = 0, 0  # global batches consumed in `epoch`
        # Kept from epoch to epoch (staging and batch buffers): reader k serves thread k of every epoch.
        self._readers: list[WindowReader] = []
        self._running = None  # the epoch being read; a new iteration stops it first, so readers are never shared

    def _reader(self, k: int) -> WindowReader:
        while len(self._readers) <= k:
            self._readers.append(self.stream.new_reader(self.pin_memory, self.windows_ahead if self.threads else 0))
        return self._readers[k]

    def close(self) -> None:
        """Stop the reader threads and free their buffers (also done when the loader is garbage-collected)."""
        if self._running is not None:
            self._running.close()
            self._running = None
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _pieces(self):
        """Every piece of the rest of the epoch, in order: read here, or by `threads` reader threads ahead of use."""
        stream = self.stream
        stream.epoch, stream.start_batch = self.epoch, self.batches
        plan = stream.plan()
        work = stream.windows(plan)
        if self.threads == 0:
            reader = self._reader(0)
            for w, positions in work:
                yield from stream.read_window(reader, plan, w, positions)
            return
        n = min(self.threads, max(1, len(work)))
        queues = [queue.Queue(maxsize=self.windows_ahead) for _ in range(n)]
        stop = threading.Event()

        def put(q: queue.Queue, item) -> None:
            while True:  # a bounded wait, so a consumer that stopped early never leaves the thread blocked
                if stop.is_set():
                    raise _Stop
                try:
                    return q.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def read_every_nth(k: int, reader: WindowReader) -> None:
            try:
                for w, positions in work[k::n]:
                    put(queues[k], stream.read_window(reader, plan, w, positions))
            except _Stop:
                pass
            except BaseException as exc:  # handed to the consumer, which raises it
                try:
                    put(queues[k], exc)
                except _Stop:
                    pass

        threads = [threading.Thread(target=read_every_nth, args=(k, self._reader(k)), daemon=True, name=f"vascdist-reader-{k}")
                   for k in range(n)]
        try:
            for t in threads:
                t.start()
            for i in range(len(work)):
                item = queues[i % n].get()
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            stop.set()
            for t in threads:
                if t.ident is not None:  # started
                    t.join()

    def __iter__(self):
        if self._running is not None:
            self._running.close()
        pieces = self._running = self._pieces()
        try:
            yield from self._batches(pieces)
        finally:
            pieces.close()  # stops the reader threads when the consumer leaves the epoch early
            if self._running is pieces:
                self._running = None
        if self.stream.train:
            self.epoch, self.batches = self.epoch + 1, 0

    def _batches(self, pieces):
        size, pending, count = self.stream.local_batch, [], 0
        for piece in pieces:
            if not pending and len(piece["y"]) == size:  # most batches: a piece is a whole batch, no copy
                batch = self.stream.finish(piece, self.batches)
                self.batches += 1
                yield batch
                continue
            pending.append(piece)
            count += len(piece["y"])
            if count == size:  # pieces never cross a batch boundary, so they add up to exactly one batch
                batch = self.stream.finish({k: torch.cat([p[k] for p in pending]) for k in pending[0]}, self.batches)
                pending, count = [], 0
                self.batches += 1
                yield batch
        if self._running is not pieces:  # pieces was closed under us: the epoch did not end
            raise VascdistError("this StreamingLoader iteration was stopped by a newer iteration or close() before "
                                "the end of its epoch; iterate a loader one epoch at a time")
        if pending and not self.stream.train:  # evaluation: the short last batch
            self.batches += 1
            yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
