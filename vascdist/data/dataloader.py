"""The shard stream under a stock torch DataLoader (data.loader=dataloader): worker processes read this rank's
batches straight from the shard files, in ShardStream's order, with the threaded loader's exact batches.

    loader = WorkerLoader(ShardStream(...), workers=2)                   # what training builds
    DataLoader(ShardBatches(stream), batch_size=None, num_workers=2)     # also correct on its own

Order. A stock DataLoader asks its workers for items in turn (worker 0, 1, ..., N-1, 0, ...) and returns
them in that order, so worker k makes batches k, k+N, k+2N, ... of the epoch (counted from the resume
point): the DataLoader's own order is then the training order, with its prefetching and pinning as they are.
A worker walks the epoch's windows in order and reads, in one pass over each window's chunks, the samples
of its own batches in that window, with the threads' reads (vascdist.data.reader). Had each worker read
whole windows, the DataLoader's turn-taking would interleave batches of different windows, and the main
process would have to hold windows back to restore the order.

State. The epoch and first batch reach the workers through a small shared-memory tensor that the main
process sets before each iteration (persistent workers keep the dataset object they started with, so an
attribute set in the main process would not reach them). The state stays global: WorkerLoader counts the
batches it hands out, and checks the index each batch carries.

Shared memory. A batch a worker yields must cross to the main process in shared memory; fresh shared memory
per batch costs page faults worth several times the read (BENCHMARKS.md). So each worker reads whole
batches straight into a pool of shared-memory buffers, one per batch with every field in it (so one file
descriptor crosses per batch), and reuses a buffer once the main process has dropped that batch:
WorkerLoader sees it go (a weak reference to its storage) and clears the buffer's flag in a shared array;
pinning clears it at once, as the batch is then copied. Without WorkerLoader (a bare DataLoader) no flag is
ever cleared and, once its pool is used up, a worker hands over ordinary tensors: correct, slower.
"""

from __future__ import annotations

import math
import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vascdist.data.loader import EpochPlan, EpochPosition, ShardStream
from vascdist.data.reader import INT_FIELDS, WindowReader
from vascdist.data.transform import AUGMENT_COLUMNS
from vascdist.errors import ConfigError, VascdistError

_FLAGS: dict[int, np.ndarray] = {}  # dataset token -> its buffers' in-use flags (workers x buffers), per process
_SENT: set[tuple[int, int, int]] = set()  # in a worker: the buffers (token, worker, buffer) whose storage went out
_MAPPED: dict[tuple[int, int, int], memoryview] = {}  # in the main process: those buffers, mapped


class Batch(dict):
    """One batch as the threaded loader gives it (a dict of tensors), plus its index in the epoch and, when it
    lies in a worker's shared buffer, which one (`slot`: dataset token, worker, buffer) and that storage."""

    def __init__(self, data=(), index: int = -1, slot: tuple[int, int, int] | None = None,
                 storage: torch.UntypedStorage | None = None):
        super().__init__(data)
        self.index, self.slot, self.storage = index, slot, storage

    def __copy__(self) -> Batch:  # DataLoader's default_convert copies the mapping
        return Batch(self, self.index, self.slot, self.storage)

    def __reduce__(self):
        """Pickled (into the DataLoader's result queue) as views into a shared buffer: the buffer's storage goes
        with the first batch that uses it (a file descriptor, passed through a socket with a handshake, ~1 ms),
        later batches name it only (the main process keeps it mapped: _rebuild)."""
        if self.storage is None:
            return Batch, (dict(self), self.index)
        base, views, others = self.storage.data_ptr(), {}, {}
        for k, v in self.items():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == base:
                views[k] = (v.dtype, v.storage_offset(), tuple(v.shape), v.stride())
            else:
                others[k] = v
        whole = None
        if self.slot not in _SENT:
            _SENT.add(self.slot)
            whole = torch.empty(0, dtype=torch.uint8).set_(self.storage)
        return _rebuild, (whole, views, others, list(self), self.index, self.slot)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): a pinned copy, after which the shared buffer is free."""
        pinned = Batch({k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.items()}, self.index)
        release(self.slot)
        return pinned


def _rebuild(whole: torch.Tensor | None, views: dict, others: dict, keys: list, index: int, slot) -> Batch:
    """A batch received from a worker, in the main process: views into the worker's buffer, mapped here once.

    Each batch gets a storage of its own over that memory (torch.frombuffer), so that WorkerLoader can tell,
    from a weak reference to it, when nothing uses the batch any more while the mapping itself stays."""
    if whole is not None:
        _MAPPED[slot] = memoryview(whole.numpy())
    storage = torch.frombuffer(_MAPPED[slot], dtype=torch.uint8).untyped_storage()
    fields = {k: torch.empty(0, dtype=d).set_(storage, offset, shape, stride) for k, (d, offset, shape, stride) in views.items()}
    return Batch({k: fields[k] if k in fields else others[k] for k in keys}, index, slot, storage)


def release(slot: tuple[int, int, int] | None) -> None:
    """Mark a worker's shared buffer free (from the main process, once nothing there uses the batch)."""
    if slot is not None and slot[0] in _FLAGS:
        _FLAGS[slot[0]][slot[1], slot[2]] = 0


class _SharedBuffers:
    """One worker's pool of batch buffers in shared memory: int64 fields first, then the float16 samples."""

    def __init__(self, stream: ShardStream, token: int, worker: int, flags: np.ndarray):
        self.token, self.worker, self.flags = token, worker, flags
        self.rows, self.sample_shape = stream.local_batch, stream.sample_shape
        self.int_rows = len(INT_FIELDS) + 1 + AUGMENT_COLUMNS  # the int fields, position, and augment's columns
        self.buffers: dict[int, tuple[torch.UntypedStorage, dict[str, torch.Tensor], list[memoryview]]] = {}
        self.by_address: dict[int, int] = {}  # data_ptr of a buffer's x -> buffer

    def claim(self) -> int | None:
        free = np.flatnonzero(self.flags[self.worker] == 0)
        if not len(free):
            return None
        s = int(free[0])
        self.flags[self.worker, s] = 1
        if s not in self.buffers:
            self.buffers[s] = self._new()
            self.by_address[self.buffers[s][1]["x"].data_ptr()] = s
        return s

    def _new(self):
        n, ints = self.rows, self.int_rows
        sample = math.prod(self.sample_shape)
        storage = torch.empty(ints * n * 8 + n * sample * 2, dtype=torch.uint8).share_memory_().untyped_storage()
        fields = {k: torch.empty(0, dtype=torch.int64).set_(storage, i * n, (n,)) for i, k in enumerate((*INT_FIELDS, "position"))}
        fields["augment"] = torch.empty(0, dtype=torch.int64).set_(storage, (ints - AUGMENT_COLUMNS) * n, (n, AUGMENT_COLUMNS))
        fields["x"] = torch.empty(0, dtype=torch.float16).set_(storage, ints * n * 4, (n, *self.sample_shape))
        flat = memoryview(fields["x"].numpy()).cast("B")
        rows = [flat[i * sample * 2:(i + 1) * sample * 2] for i in range(n)]
        return storage, fields, rows

    def allocate(self, n: int) -> tuple[torch.Tensor, list[memoryview]] | None:
        """WindowReader's hook: a whole batch is read straight into a free buffer (pieces of one, elsewhere)."""
        s = self.claim() if n == self.rows else None
        if s is None:
            return None
        _, fields, rows = self.buffers[s]
        return fields["x"], rows

    def fill(self, s: int, batch: dict, index: int) -> Batch:
        """`batch` as a Batch in buffer s: tensors that are not already there are copied in."""
        storage, fields, _ = self.buffers[s]
        out = {}
        for k, v in batch.items():
            view = fields.get(k)
            if view is not None and isinstance(v, torch.Tensor) and v.dtype == view.dtype and v.shape[1:] == view.shape[1:]:
                view = view[:len(v)]
                if v.data_ptr() != view.data_ptr():
                    view.copy_(v)
                out[k] = view
            else:
                out[k] = v  # a field the transform added or changed the shape of: pickled on its own
        return Batch(out, index, (self.token, self.worker, s), storage)


class ShardBatches(IterableDataset):
    """This rank's batches of one split, for a stock DataLoader(dataset, batch_size=None, num_workers=N).

    Batches (dicts of tensors, x float16 as stored) come in ShardStream's order for any N; the epoch and
    first batch are set with `start()` before each iteration (WorkerLoader does it)."""

    def __init__(self, stream: ShardStream, workers: int = 0, windows_ahead: int = 1):
        self.stream = stream
        self.token = int(np.random.default_rng().integers(2**62))
        rows_per_window = stream.shuffle_chunks * int(stream.index["preprocess"]["chunk_size"])
        per_window = -(-rows_per_window // (stream.local_batch * max(workers, 1))) + 1
        # Buffers a worker may have in use: its batches of the window being read, those queued by the
        # DataLoader (prefetch_factor), those the main process holds; beyond them, fresh tensors.
        buffers = (windows_ahead + 1) * per_window + 8
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, first batch
        self.flags = torch.zeros((max(workers, 1), buffers), dtype=torch.uint8).share_memory_()
        self.held = torch.zeros_like(self.flags).share_memory_()  # buffers the main process held at start()
        _FLAGS[self.token] = self.flags.numpy()
        self._reader: WindowReader | None = None  # per process, made on first use
        self._buffers: _SharedBuffers | None = None

    def start(self, epoch: int, first_batch: int, held: np.ndarray | None = None) -> None:
        """Set the epoch and the first batch (of this epoch) that the next iteration reads."""
        self.control[0], self.control[1] = epoch, first_batch
        self.held.zero_()
        if held is not None:
            self.held.copy_(torch.from_numpy(held))

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.stream
        stream.epoch, stream.start_batch = (int(v) for v in self.control)
        first = stream.start_batch if stream.train else 0
        if self._reader is None:
            self._reader = stream.new_reader(prefetch_windows=0)
        if info is not None and self._buffers is None:
            flags = self.flags.numpy()
            if worker >= len(flags):
                raise ConfigError(f"ShardBatches was made for {len(flags)} worker(s) but the DataLoader runs {workers}; "
                                  "pass its num_workers to ShardBatches(workers=...)")
            self._buffers = _SharedBuffers(stream, self.token, worker, flags)
            self._reader.allocate = self._buffers.allocate
        if self._buffers is not None:  # buffers of a previous iteration that the main process never received
            flags, held = self._buffers.flags, self.held.numpy()
            flags[worker][held[worker] == 0] = 0
        plan = stream.plan()
        yield from self._batches(plan, worker, workers, first)

    def _batches(self, plan: EpochPlan, worker: int, workers: int, first: int):
        stream, size, buffers = self.stream, self.stream.local_batch, self._buffers
        pending, index = [], None
        for w, positions in stream.windows(plan):
            numbers = stream.batch_numbers(positions)
            mine = (numbers - first) % workers == worker
            for piece in stream.read_window(self._reader, plan, w, positions[mine]):
                n = int(stream.batch_numbers(piece["position"][:1].numpy())[0])
                if not pending and len(piece["y"]) == size:  # a whole batch, in a shared buffer if one was free
                    yield self._finish(piece, n)
                    continue
                pending.append(piece)
                index = n
                if sum(len(p["y"]) for p in pending) == size:
                    yield self._finish({k: torch.cat([p[k] for p in pending]) for k in pending[0]}, index)
                    pending = []
        if pending and not stream.train:  # evaluation: the short last batch
            yield self._finish({k: torch.cat([p[k] for p in pending]) for k in pending[0]}, index)

    def _finish(self, batch: dict, index: int) -> Batch:
        buffers = self._buffers
        s = buffers.by_address.get(batch["x"].data_ptr()) if buffers is not None else None
        batch = self.stream.finish(batch, index)
        if buffers is not None and s is None:
            s = buffers.claim()  # joined from pieces, or read when no buffer was free
        return buffers.fill(s, batch, index) if s is not None else Batch(batch, index)


class WorkerLoader(EpochPosition):
    """StreamingLoader's interface (len, set_epoch, state_dict, iteration) over a stock torch DataLoader."""

    def __init__(self, stream: ShardStream, workers: int = 2, prefetch_factor: int = 2, persistent_workers: bool = True,
                 pin_memory: bool = False):
        """`workers` DataLoader worker processes (0: read in this process), each `prefetch_factor` batches
        ahead; `persistent_workers` keeps them from epoch to epoch (config keys data.workers,
        data.worker_prefetch_factor, data.persistent_workers)."""
        self.stream = stream
        self.dataset = ShardBatches(stream, workers, windows_ahead=1)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=prefetch_factor if workers else None,
                                 persistent_workers=persistent_workers and workers > 0,
                                 generator=torch.Generator())  # its own seed draw: the global RNG stays the training's
        self.epoch, self.batches = 0, 0  # global batches consumed in `epoch`
        self._out: list[tuple[StorageWeakRef, tuple[int, int, int]]] = []  # batches handed out in shared buffers
        self._running: _Epoch | None = None

    def close(self) -> None:
        """Stop the iteration in progress and its worker processes."""
        if self._running is not None:
            self._running.close()
            self._running = None
        self.loader = None  # a persistent DataLoader iterator shuts its workers down when dropped
        _FLAGS.pop(self.dataset.token, None)
        for slot in [s for s in _MAPPED if s[0] == self.dataset.token]:
            del _MAPPED[slot]

    def _release_dropped(self) -> None:
        """Free the shared buffers of batches nothing in this process uses any more."""
        keep = []
        for ref, slot in self._out:
            if ref.expired():
                release(slot)
            else:
                keep.append((ref, slot))
        self._out = keep

    def __iter__(self):
        if self.loader is None:
            raise VascdistError("this loader was closed")
        if self._running is not None:
            self._running.close()
        self._release_dropped()
        held = np.zeros(self.dataset.flags.shape, np.uint8)
        for _, (_, worker, s) in self._out:
            held[worker, s] = 1
        self.dataset.start(self.epoch, self.batches if self.stream.train else 0, held)
        self._running = _Epoch(self, iter(self.loader))
        return self._running


class _Epoch:
    """One iteration of a WorkerLoader: counts what it hands out, so the loader's state is exact mid-epoch."""

    def __init__(self, owner: WorkerLoader, batches):
        self.owner, self.batches, self.stopped, self.finished = owner, batches, False, False
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        owner = self.owner
        if self.finished:
            raise StopIteration
        if self.stopped:
            raise VascdistError("this WorkerLoader iteration was stopped by a newer iteration or close() before "
                                "the end of its epoch; iterate a loader one epoch at a time")
        try:
            batch = next(self.batches)
        except StopIteration:
            self.finished, self.batches = True, None
            if owner._running is self:
                owner._running = None
            if owner.stream.train:
                owner.epoch, owner.batches = owner.epoch + 1, 0
            raise
        owner._release_dropped()
        expected = owner.batches if owner.stream.train else self.count
        if not isinstance(batch, dict) or getattr(batch, "index", expected) != expected:
            raise VascdistError(f"the DataLoader handed batch {getattr(batch, 'index', '?')} where batch {expected} was "
                                "due; ShardBatches needs a DataLoader that keeps its order (in_order=True)")
        if getattr(batch, "slot", None) is not None:
            owner._out.append((StorageWeakRef(batch.storage), batch.slot))
        owner.batches += 1
        self.count += 1
        return batch

    def close(self) -> None:
        self.stopped = not self.finished
        self.batches = None  # a non-persistent DataLoader iterator shuts its workers down when dropped

