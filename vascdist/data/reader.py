"""Reading one shuffle window of HDF5 shards straight into batch buffers: the loader's I/O (vascdist.data.loader).

Each sample's bytes go from the page cache to their shuffled place in a batch with one `preadv` per HDF5
chunk, one iovec per sample: the read and the shuffle are the same copy, done by the kernel, with the GIL
released, so reader threads run in parallel. h5py is used for the layout only (where each chunk lies in the
file); reading through it costs more than the copy for chunks this small and holds the GIL while it reads.
That needs the layout vascdist's shard writer produces: uncompressed chunks of `chunk_size` samples.

Everything read is verified against the shard's checksums (vascdist.data.shard_format): each chunk of the
integer fields and of x_sum against chunk_crc32, each sample of x this rank reads against its x_sum, each
label against the class count. A mismatch is a DataError naming the shard and the samples.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from vascdist.data.integrity import check_labels
from vascdist.data.shard_format import CRC_FIELDS, HDF5_ERRORS, sample_sums
from vascdist.errors import DataError

INT_FIELDS = ("y", "patient", "recording", "cycle")
_STAGED = (*INT_FIELDS, "x_sum")  # read whole per chunk; x_sum holds x's per-sample checksums
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_MAX_GAP = 2  # rows: copying 2 x 8 KB (~1.2 us) costs about what one more preadv call does


@dataclass(frozen=True)
class Chunk:
    file: str
    start: int
    stop: int


class ChunkLayout:
    """Where each chunk of each field lies in the shard files: read from HDF5 once per file, then shared by
    every reader thread (a lookup through h5py costs ~50 us, a sixth of reading the chunk)."""

    def __init__(self, root: Path, chunk_size: int, sample_shape: tuple[int, ...], samples: dict[str, int],
                 num_classes: int | None = None):
        """`sample_shape` and `samples` (file -> sample count) are what index.json promises; each file is checked
        against them when it is first read. Labels are checked against `num_classes` when given."""
        self.root, self.chunk_size = root, chunk_size
        self.sample_shape, self.samples, self.num_classes = tuple(sample_shape), samples, num_classes
        self._files: dict[str, dict[str, dict[int, int]]] = {}  # file -> field -> chunk start -> byte offset
        self._crcs: dict[str, np.ndarray] = {}  # file -> its chunk_crc32 table (chunks, len(CRC_FIELDS))
        self._lock = threading.Lock()

    def offset(self, file: str, name: str, start: int) -> int:
        """Byte offset of sample `start` of field `name`: inside its HDF5 chunk the rows lie contiguously, so a
        segment that starts mid-chunk (vascdist.data.folds) is read like a chunk."""
        layout = self._files.get(file)
        if layout is None:
            with self._lock:
                if file not in self._files:
                    self._files[file] = self._read(file)
                layout = self._files[file]
        first = start - start % self.chunk_size
        if first not in layout[name]:
            raise DataError(f"{self.root / file}: field '{name}' has no stored chunk at sample {first}")
        row_bytes = math.prod(self.sample_shape) * 2 if name == "x" else 8  # float16 samples, int64 fields
        return layout[name][first] + (start - first) * row_bytes

    def check(self, file: str, name: str, start: int, data: memoryview) -> None:
        """Refuse chunk `start` of field `name` (one of _STAGED) unless its bytes match the stored crc32."""
        want = self._crcs[file][start // self.chunk_size, CRC_FIELDS.index(name)]
        if zlib.crc32(data) != want:
            stop = min(start + self.chunk_size, self.samples[file])
            raise DataError(f"{self.root / file}: field '{name}' of samples {start}-{stop} does not match its "
                            f"checksum (corrupted); check the shard set with `vascdist shards verify {self.root}`")
        if name == "y" and self.num_classes is not None:
            check_labels(np.frombuffer(data, np.int64), self.num_classes, self.root / file, start)

    def _read(self, file: str) -> dict[str, dict[int, int]]:
        path = self.root / file
        try:
            with h5py.File(path, "r") as f:
                layout = {}
                if "chunk_crc32" not in f:
                    raise DataError(f"{path}: no chunk checksums; write the shards with `vascdist preprocess`")
                self._crcs[file] = f["chunk_crc32"][...]
                for name in ("x", *_STAGED):
                    if name not in f:
                        raise DataError(f"{path}: no field '{name}'; write the shards with `vascdist preprocess`")
                    ds = f[name]
                    want = (self.samples[file], *(self.sample_shape if name == "x" else ()))
                    if ds.shape != want:
                        raise DataError(f"{path}: field '{name}' has shape {ds.shape}, but index.json says {want}; "
                                        f"check the shard set with `vascdist shards verify {self.root}`")
                    if ds.shape[0] == 0:
                        layout[name] = {}
                        continue
                    dtype = np.dtype(np.float16 if name == "x" else np.int64)
                    rows = min(self.chunk_size, ds.shape[0])  # the writer makes a shard smaller than a chunk one chunk
                    if (ds.chunks != (rows, *ds.shape[1:]) or ds.id.get_create_plist().get_nfilters()
                            or ds.dtype != dtype):
                        raise DataError(f"{path}: field '{name}' is not stored as uncompressed {dtype} chunks of "
                                        f"{self.chunk_size} samples (chunks {ds.chunks}, dtype {ds.dtype}); "
                                        "write the shards with `vascdist preprocess`")
                    chunks = (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks()))
                    layout[name] = {c.chunk_offset[0]: c.byte_offset for c in chunks}
                return layout
        except HDF5_ERRORS as exc:
            raise DataError(f"{path}: cannot read the shard ({exc}); check the shard set with "
                            f"`vascdist shards verify {self.root}`") from None


class WindowReader:
    """What one reader thread reuses from window to window: a staging buffer for the integer fields and a pool
    of batch buffers (batch_buffer)."""

    def __init__(self, layout: ChunkLayout, sample_shape: tuple[int, ...], batch_rows: int,
                 pin_memory: bool = False, keep: int = 64):
        self.layout, self.root, self.sample_shape = layout, layout.root, tuple(sample_shape)
        self.batch_rows, self.pin_memory, self.keep = batch_rows, pin_memory, keep
        self.sample_bytes = math.prod(self.sample_shape) * 2  # float16
        self.scratch = bytearray(self.sample_bytes)  # where the rows another rank reads land
        self.ints: dict[str, np.ndarray] = {}
        # Batch buffers (array, row views) free for reuse; deque's append and pop are thread-safe, and a buffer is
        # appended back from whichever thread drops the last batch made from it.
        self.free: deque[tuple[np.ndarray, list[memoryview]]] = deque()
        self.made = 0  # buffers of the pool made so far (at most `keep`)
        # Optional: n -> (tensor, row views) or None, tried before the pool (a DataLoader worker reads whole
        # batches straight into shared memory this way: vascdist.data.dataloader).
        self.allocate: Callable[[int], tuple[torch.Tensor, list[memoryview]] | None] | None = None

    # ---------------------------------------------------------------- reading
    def read(self, chunks: list[Chunk], rows: np.ndarray, cuts: list[int]) -> tuple[list[torch.Tensor], dict[str, np.ndarray]]:
        """Samples `rows` (indices into the window's chunks laid end to end) in that order, as float16 batch
        tensors cut at `cuts`, and the integer fields of those samples in the same order."""
        bounds = np.cumsum([0] + [c.stop - c.start for c in chunks])
        dest = np.full(int(bounds[-1]), -1, np.int64)  # window row -> its place among `rows`, -1: not read here
        dest[rows] = np.arange(len(rows))
        xs, places = [], []  # the batches, and one writable view per sample in the order of `rows`
        for a, b in zip(cuts[:-1], cuts[1:]):
            x, views = self.batch_buffer(b - a)
            xs.append(x)
            places += views
        n = self.sample_bytes
        if not self.ints or len(self.ints["y"]) < bounds[-1]:
            self.ints = {k: np.empty(int(bounds[-1]), np.int64) for k in _STAGED}  # reused across windows
        # Files are opened per window (microseconds): one kept open per shard and thread would run into the
        # open-files limit on large shard sets.
        fds: dict[str, int] = {}
        try:
            for i, chunk in enumerate(chunks):
                here = dest[bounds[i]:bounds[i + 1]]
                mine = np.flatnonzero(here >= 0)
                if not len(mine):
                    continue
                offset = self.layout.offset(chunk.file, "x", chunk.start)
                if chunk.file not in fds:
                    fds[chunk.file] = os.open(self.root / chunk.file, os.O_RDONLY)
                fd = fds[chunk.file]
                # Runs of this rank's rows; gaps longer than _MAX_GAP rows (other ranks' samples) are skipped
                # rather than read into the scratch row, where a syscall costs less than copying them.
                breaks = np.flatnonzero(np.diff(mine) > _MAX_GAP + 1)
                for a, b in zip(mine[np.r_[0, breaks + 1]], mine[np.r_[breaks, len(mine) - 1]] + 1):
                    run = [places[j] if j >= 0 else self.scratch for j in here[a:b].tolist()]
                    _preadv_all(fd, run, offset + int(a) * n, int(b - a) * n)
                for k in _STAGED:
                    self._read_checked(fd, chunk, k, self.ints[k][bounds[i]:bounds[i + 1]])
        except OSError as exc:
            raise DataError(f"{self.root / chunk.file}: cannot read samples {chunk.start}-{chunk.stop} ({exc}); "
                            f"check the shard set with `vascdist shards verify {self.root}`") from None
        finally:
            for fd in fds.values():
                os.close(fd)
        for x, a, b in zip(xs, cuts[:-1], cuts[1:]):  # one vectorised pass per batch (shard_format.sample_sums)
            bad = np.flatnonzero(sample_sums(x.numpy()) != self.ints["x_sum"][rows[a:b]])
            if len(bad):
                row = int(rows[a + bad[0]])
                i = int(np.searchsorted(bounds, row, side="right")) - 1
                raise DataError(f"{self.root / chunks[i].file}: sample {chunks[i].start + row - int(bounds[i])} of x "
                                f"(chunk of samples {chunks[i].start}-{chunks[i].stop}) does not match its checksum "
                                f"(corrupted); check the shard set with `vascdist shards verify {self.root}`")
        if self.pin_memory:
            # A copy into torch's caching host allocator, as DataLoader's pin_memory does: that allocator keeps a
            # block until the asynchronous copy to the GPU has finished; the pool below cannot know when it has.
            xs = [x.pin_memory() for x in xs]
        return xs, {k: self.ints[k][rows] for k in INT_FIELDS}

    def _read_checked(self, fd: int, chunk: Chunk, name: str, out: np.ndarray) -> None:
        """Read the integer field `name` of `chunk` into `out`, checked against its chunk's crc32.

        A segment that starts or ends inside its HDF5 chunk (a cross-validation fold's patients, vascdist.data.folds)
        reads the whole chunk, because the checksum covers the whole chunk, and keeps its part."""
        size = self.layout.chunk_size
        first = chunk.start - chunk.start % size
        last = min(first + size, self.layout.samples[chunk.file])
        if chunk.stop > last:
            raise DataError(f"{self.root / chunk.file}: a read of samples {chunk.start}-{chunk.stop} crosses the chunk "
                            f"of samples {first}-{last}")
        whole = out if (first, last) == (chunk.start, chunk.stop) else np.empty(last - first, np.int64)
        data = memoryview(whole).cast("B")
        _preadv_all(fd, [data], self.layout.offset(chunk.file, name, first), len(data))
        self.layout.check(chunk.file, name, first, data)
        if whole is not out:
            out[:] = whole[chunk.start - first:chunk.stop - first]

    def batch_buffer(self, n: int) -> tuple[torch.Tensor, list[memoryview]]:
        """An uninitialised float16 (n, *sample_shape) tensor for one batch (piece), and a writable view of each row.

        Buffers come from a pool of at most `keep`: a fresh one costs a page fault per 4 KiB and, with several
        threads, TLB shoot-downs when glibc returns it (0.5 to 2 ms per 2 MB batch against 0.2 ms for its read
        on the AMD EPYC host, docs/design/loader.md). A buffer goes back to the pool when the batch made from it is
        garbage: the tensor is made with torch.from_numpy from a numpy view of the buffer, which that tensor's
        memory (every view of it included) keeps alive, and weakref.finalize on that numpy view returns the
        buffer once it dies. The row views are made once per buffer: making thousands per window set off the
        cyclic garbage collector, whose full passes cost more than the reads.
        """
        if self.allocate is not None:
            given = self.allocate(n)
            if given is not None:
                return given
        try:
            entry = self.free.pop()
        except IndexError:
            entry = self._new_buffer()
            if self.made >= self.keep:  # beyond the pool: a fresh buffer, not returned
                return torch.from_numpy(entry[0][:n]), entry[1][:n]
            self.made += 1
        view = entry[0][:n]
        weakref.finalize(view, self.free.append, entry).atexit = False
        return torch.from_numpy(view), entry[1][:n]

    def _new_buffer(self) -> tuple[np.ndarray, list[memoryview]]:
        array = np.empty((self.batch_rows, *self.sample_shape), np.float16)
        flat, size = memoryview(array).cast("B"), self.sample_bytes
        return array, [flat[i * size:(i + 1) * size] for i in range(self.batch_rows)]

    def close(self) -> None:
        self.free.clear()
        self.made = 0


def _preadv_all(fd: int, buffers: list, offset: int, total: int) -> None:
    """Fill `buffers` (`total` bytes) from the file at `offset`, in order (preadv may return less than asked for)."""
    if len(buffers) <= _IOV_MAX and os.preadv(fd, buffers, offset) == total:
        return  # the usual case, without a Python loop over the buffers
    i = 0
    while i < len(buffers):  # from the start again (re-reading is harmless), resuming after short reads
        got = os.preadv(fd, buffers[i:i + _IOV_MAX], offset)
        if got == 0:
            raise OSError(f"the file ends at byte {offset}, inside a chunk")
        offset += got
        while i < len(buffers) and got >= len(buffers[i]):
            got -= len(buffers[i])
            i += 1
        if got:
            buffers[i] = memoryview(buffers[i])[got:]
