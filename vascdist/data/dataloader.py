"""The shard stream under a stock torch DataLoader (data.loader=dataloader): worker processes read this rank's
batches straight from the shard files, in ShardStream's order, with the threaded loader's exact batches.

    loader = WorkerLoader(ShardStream(...), workers=2)                   # what training builds
    DataLoader(ShardBatches(stream), batch_size=None, num_workers=2)     # also correct on its own

Order. A stock DataLoader asks its workers for items in turn (worker 0, 1, ..., N-1, 0, ...) and returns
them in that order, so worker k makes batches k, k+N, k+2N, ... of the epoch (counted from the resume
point): the DataLoader's own order is then the training order, with its prefetching as it is.
A worker walks the epoch's windows in order and reads, in one pass over each window's chunks, the samples
of its own batches in that window, with the threads' reads (vascdist.data.reader). Had each worker read
whole windows, the DataLoader's turn-taking would interleave batches of different windows, and the main
process would have to hold windows back to restore the order.

State. The epoch and first batch reach the workers through a small shared-memory tensor that the main
process sets before each iteration (persistent workers keep the dataset object they started with, so an
attribute set in the main process would not reach them). The state stays global: WorkerLoader counts the
batches it hands out, and checks the index each batch carries.

Shared memory, only through what torch and Python document. A tensor a worker yields crosses to the main
process in shared memory that torch makes for it, one block and one file descriptor per tensor: the page
faults of that fresh memory and the descriptor's handshake cost several times the read (docs/design/loader.md).
So WorkerLoader's dataset owns a pool of batch buffers ("slots", SharedSlots), made with
Tensor.share_memory_ in the main process before the workers start; the workers get them with the dataset,
as torch.multiprocessing shares (never copies) a shared tensor handed to another process. A worker reads a
whole batch straight into a free slot and yields a small Handoff naming the slot; the main process makes the
batch as views of that slot (torch.from_numpy of a numpy view of it) and returns the slot to its worker when
that batch is garbage (weakref.finalize on the numpy view, which the batch's tensors keep alive), through a
shared table of claimed slots. With pin_memory the batch is copied to pinned memory at once, which frees the
slot. A batch that finds no free slot goes as ordinary tensors: correct, slower. A bare DataLoader over
ShardBatches gets plain dicts of ordinary tensors.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vascdist.data.loader import EpochPlan, EpochPosition, ShardStream
from vascdist.data.reader import INT_FIELDS, WindowReader
from vascdist.data.transform import AUGMENT_COLUMNS
from vascdist.errors import ConfigError, VascdistError

_SLOT_INTS = (*INT_FIELDS, "position")  # a slot holds these int64 (n,) fields, then augment, then x


@dataclass
class Handoff:
    """One batch as a worker yields it to WorkerLoader: its index in the epoch, the fields in `in_slot` lying in
    slot `slot` (worker, buffer) of SharedSlots with `rows` rows, the others in `others` (sent as torch sends
    any tensor); `keys` is the batch's field order."""
    index: int
    keys: list[str]
    others: dict = field(default_factory=dict)
    slot: tuple[int, int] | None = None
    rows: int = 0
    in_slot: tuple[str, ...] = ()


class SharedSlots:
    """Batch buffers in shared memory for every worker (`count` each, `rows` rows of every field), made in the
    main process before the workers start, and who holds each: `claimed` (a worker sets it when it writes a
    slot; the main process clears it when the batch made from the slot is garbage) and `held` (set while the
    main process has that batch out)."""

    def __init__(self, workers: int, count: int, rows: int, sample_shape: tuple[int, ...]):
        self.rows, self.sample_shape = rows, tuple(sample_shape)
        self.sample_bytes = math.prod(self.sample_shape) * 2  # float16
        self.x_offset = (len(_SLOT_INTS) + AUGMENT_COLUMNS) * rows * 8
        size = self.x_offset + rows * self.sample_bytes
        self.data = torch.empty((workers, count, size), dtype=torch.uint8).share_memory_()
        self.claimed = torch.zeros((workers, count), dtype=torch.uint8).share_memory_()
        self.held = torch.zeros_like(self.claimed).share_memory_()

    def fields(self, slot: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """The fields of a batch of `n` rows, as views of `slot` (a 1-D uint8 tensor over one buffer)."""
        rows, out = self.rows, {}
        for i, k in enumerate(_SLOT_INTS):
            out[k] = slot[i * rows * 8:(i * rows + n) * 8].view(torch.int64)
        a = len(_SLOT_INTS) * rows * 8
        out["augment"] = slot[a:a + n * AUGMENT_COLUMNS * 8].view(torch.int64).view(n, AUGMENT_COLUMNS)
        out["x"] = slot[self.x_offset:self.x_offset + n * self.sample_bytes].view(torch.float16).view(n, *self.sample_shape)
        return out


def _release(held: np.ndarray, claimed: np.ndarray, worker: int, slot: int) -> None:
    """The batch in `slot` is garbage: the slot is its worker's again (held first: see ShardBatches.__iter__)."""
    held[worker, slot] = 0
    claimed[worker, slot] = 0


class _WorkerSlots:
    """One worker's side of SharedSlots: it claims free slots and writes batches into them."""

    def __init__(self, slots: SharedSlots, worker: int):
        self.slots, self.worker = slots, worker
        self.claimed = slots.claimed.numpy()[worker]
        self.rows: dict[int, list[memoryview]] = {}  # slot -> a writable view of each row of its x, made once
        self.by_address: dict[int, int] = {}  # data_ptr of a slot's x -> slot

    def claim(self) -> int | None:
        free = np.flatnonzero(self.claimed == 0)
        if not len(free):
            return None
        s = int(free[0])
        self.claimed[s] = 1
        return s

    def allocate(self, n: int) -> tuple[torch.Tensor, list[memoryview]] | None:
        """WindowReader's hook: a whole batch is read straight into a free slot (pieces of one, elsewhere)."""
        s = self.claim() if n == self.slots.rows else None
        if s is None:
            return None
        x = self.slots.fields(self.slots.data[self.worker, s], n)["x"]
        if s not in self.rows:
            flat, size = memoryview(x.numpy()).cast("B"), self.slots.sample_bytes
            self.rows[s] = [flat[i * size:(i + 1) * size] for i in range(n)]
            self.by_address[x.data_ptr()] = s
        return x, self.rows[s]

    def fill(self, s: int, batch: dict, index: int) -> Handoff:
        """`batch` written into slot s (tensors not already there are copied in), as a Handoff."""
        n = len(batch["x"])
        views = self.slots.fields(self.slots.data[self.worker, s], n)
        in_slot, others = [], {}
        for k, v in batch.items():
            view = views.get(k)
            if view is not None and isinstance(v, torch.Tensor) and v.dtype == view.dtype and v.shape == view.shape:
                if v.data_ptr() != view.data_ptr():
                    view.copy_(v)
                in_slot.append(k)
            else:
                others[k] = v  # a field the transform added or changed: sent on its own
        return Handoff(index, list(batch), others, (self.worker, s), n, tuple(in_slot))


class ShardBatches(IterableDataset):
    """This rank's batches of one split, for a stock DataLoader(dataset, batch_size=None, num_workers=N).

    Batches (dicts of tensors, x float16 as stored) come in ShardStream's order for any N; the epoch and
    first batch are set with `start()` before each iteration (WorkerLoader does it). `handoff` (WorkerLoader's
    form): yield Handoff objects, through shared slots for `workers` worker processes, `prefetch_factor` each."""

    def __init__(self, stream: ShardStream, workers: int = 0, handoff: bool = False, prefetch_factor: int = 2):
        self.stream, self.handoff = stream, handoff
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, first batch
        self.slots: SharedSlots | None = None
        if handoff and workers > 0:
            rows_per_window = stream.shuffle_chunks * int(stream.index["preprocess"]["chunk_size"])
            per_window = -(-rows_per_window // (stream.local_batch * workers)) + 1
            # Slots a worker may have claimed at once: its batches of the window being read, those queued by
            # the DataLoader, and a few the consumer holds; a batch beyond them goes as ordinary tensors.
            count = per_window + prefetch_factor + 4
            self.slots = SharedSlots(workers, count, stream.local_batch, stream.sample_shape)
        self._reader: WindowReader | None = None  # per process, made on first use
        self._mine: _WorkerSlots | None = None

    def start(self, epoch: int, first_batch: int) -> None:
        """Set the epoch and the first batch (of this epoch) that the next iteration reads."""
        self.control[0], self.control[1] = epoch, first_batch

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
        if info is not None and self.slots is not None:
            if self._mine is None:
                if worker >= len(self.slots.claimed):
                    raise ConfigError(f"ShardBatches was made for {len(self.slots.claimed)} worker(s) but the DataLoader "
                                      f"runs {workers}; pass its num_workers to ShardBatches(workers=...)")
                self._mine = _WorkerSlots(self.slots, worker)
                self._reader.allocate = self._mine.allocate
            # Slots of a previous iteration's batches that the main process never handed out are free. Only
            # cleared here where not held, and the main process clears held before claimed: no slot is lost.
            self._mine.claimed[self.slots.held.numpy()[worker] == 0] = 0
        yield from self._batches(stream.plan(), worker, workers, first)

    def _batches(self, plan: EpochPlan, worker: int, workers: int, first: int):
        stream, size = self.stream, self.stream.local_batch
        pending, index = [], None
        for w, positions in stream.windows(plan):
            numbers = stream.batch_numbers(positions)
            mine = (numbers - first) % workers == worker
            for piece in stream.read_window(self._reader, plan, w, positions[mine]):
                n = int(stream.batch_numbers(piece["position"][:1].numpy())[0])
                if not pending and len(piece["y"]) == size:  # a whole batch, in a shared slot if one was free
                    yield self._finish(piece, n)
                    continue
                pending.append(piece)
                index = n
                if sum(len(p["y"]) for p in pending) == size:
                    yield self._finish({k: torch.cat([p[k] for p in pending]) for k in pending[0]}, index)
                    pending = []
        if pending and not stream.train:  # evaluation: the short last batch
            yield self._finish({k: torch.cat([p[k] for p in pending]) for k in pending[0]}, index)

    def _finish(self, batch: dict, index: int) -> dict | Handoff:
        mine = self._mine
        s = mine.by_address.get(batch["x"].data_ptr()) if mine is not None else None  # read into slot s
        batch = self.stream.finish(batch, index)
        if not self.handoff:
            return batch
        if mine is not None and s is None:
            s = mine.claim()  # joined from pieces, or read when no slot was free
        return mine.fill(s, batch, index) if s is not None else Handoff(index, list(batch), batch)


class WorkerLoader(EpochPosition):
    """StreamingLoader's interface (len, set_epoch, state_dict, iteration) over a stock torch DataLoader."""

    def __init__(self, stream: ShardStream, workers: int = 2, prefetch_factor: int = 2, persistent_workers: bool = True,
                 pin_memory: bool = False):
        """`workers` DataLoader worker processes (0: read in this process), each `prefetch_factor` batches
        ahead; `persistent_workers` keeps them from epoch to epoch (config keys data.workers,
        data.worker_prefetch_factor, data.persistent_workers); `pin_memory`: batches are copied to pinned memory."""
        self.stream, self.pin_memory = stream, pin_memory
        self.dataset = ShardBatches(stream, workers, handoff=True, prefetch_factor=prefetch_factor)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                 prefetch_factor=prefetch_factor if workers else None,
                                 persistent_workers=persistent_workers and workers > 0,
                                 generator=torch.Generator())  # its own seed draw: the global RNG stays the training's
        slots = self.dataset.slots
        if slots is not None:  # numpy views of the shared slots and tables, for making batches and releasing slots
            self._data, self._held, self._claimed = slots.data.numpy(), slots.held.numpy(), slots.claimed.numpy()
        self.epoch, self.batches = 0, 0  # global batches consumed in `epoch`
        self._running: _Epoch | None = None

    def close(self) -> None:
        """Stop the iteration in progress and its worker processes."""
        if self._running is not None:
            self._running.close()
            self._running = None
        self.loader = None  # a persistent DataLoader iterator shuts its workers down when dropped

    def receive(self, handoff: Handoff) -> dict[str, torch.Tensor]:
        """The batch a Handoff describes: views of its slot, which returns to its worker once they are garbage."""
        fields = handoff.others
        if handoff.slot is not None:
            w, s = handoff.slot
            array = self._data[w, s]  # a numpy view of its own, which the batch's tensors keep alive
            in_slot = self.dataset.slots.fields(torch.from_numpy(array), handoff.rows)
            fields = {**handoff.others, **{k: in_slot[k] for k in handoff.in_slot}}
            self._held[w, s] = 1
            weakref.finalize(array, _release, self._held, self._claimed, w, s).atexit = False
        batch = {k: fields[k] for k in handoff.keys}
        if self.pin_memory:  # a copy: the slot is free as soon as the views above are dropped
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def __iter__(self):
        if self.loader is None:
            raise VascdistError("this loader was closed")
        if self._running is not None:
            self._running.close()
        self.dataset.start(self.epoch, self.batches if self.stream.train else 0)
        self._running = _Epoch(self, iter(self.loader))
        return self._running


class _Epoch:
    """One iteration of a WorkerLoader: counts what it hands out, so the loader's state is exact mid-epoch."""

    def __init__(self, owner: WorkerLoader, batches):
        self.owner, self.batches, self.stopped, self.finished = owner, batches, False, False
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        owner = self.owner
        if self.finished:
            raise StopIteration
        if self.stopped:
            raise VascdistError("this WorkerLoader iteration was stopped by a newer iteration or close() before "
                                "the end of its epoch; iterate a loader one epoch at a time")
        try:
            handoff = next(self.batches)
        except StopIteration:
            self.finished, self.batches = True, None
            if owner._running is self:
                owner._running = None
            if owner.stream.train:
                owner.epoch, owner.batches = owner.epoch + 1, 0
            raise
        expected = owner.batches if owner.stream.train else self.count
        if not isinstance(handoff, Handoff) or handoff.index != expected:
            raise VascdistError(f"the DataLoader handed batch {getattr(handoff, 'index', '?')} where batch {expected} "
                                "was due; ShardBatches needs a DataLoader that keeps its order (in_order=True)")
        owner.batches += 1
        self.count += 1
        return owner.receive(handoff)

    def close(self) -> None:
        self.stopped = not self.finished
        self.batches = None  # a non-persistent DataLoader iterator shuts its workers down when dropped
