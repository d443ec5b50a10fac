"""Streaming tensors through preallocated buffers, reading ahead across chunks, passes and tensors.

Memory: the merge allocates two slots of input buffers (one per input file: base, models, Fisher
estimates) and two output buffers once, sized from the budget, and reuses them for every chunk of
every tensor (fresh allocations cost ~10x in page faults).

Overlap: one `ChunkIO` serves the whole merge. Every read is keyed by (stream, chunk range), so a
chunk still held in its slot is not read again: a tensor that fits in one chunk is read once for all
its passes (TIES' two histogram passes and its combine). While the method computes on one slot, the
reader thread fills the other with what the merge needs next: the next chunk of this pass, the first
chunk of the next pass (a statistics pass is always followed by another), or, once the combine pass
reaches its last chunk, the first chunk of the next tensor. A writer thread writes each output chunk
at its planned offset; an output slot is reused once its previous write is done, so writes overlap
the next tensor's compute too.

Chunk inputs are handed to the backend as it asks (`backend.view`): `HostArray`s for the native
kernels, zero-copy torch tensors for the torch backends. A backend with `reads_mapped` (the native
one) gets views of the memory-mapped input files instead of copies, when the budget has room for
the pages the kernel maps beyond each chunk: the reader thread maps the
chunk's pages in (MADV_POPULATE_READ) and the kernels read the page cache directly, which saves
copying every input byte once (a fifth to a quarter of a merge's time on 2 cores); when the slot is
reused, its pages are dropped from the process (MADV_DONTNEED), so memory stays within the budget.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import numpy as np

from dtm_fast.io.output import start_writeback
from dtm_fast.errors import DtmError
from dtm_fast.io.safetensors_format import DTYPE_SIZES, TensorEntry, read_exact, write_exact
from dtm_fast.merge.chunk import Chunk, TensorContext
from dtm_fast.merge.nonfinite import NonFiniteCounts


class Buffers:
    """Two slots of per-input byte buffers plus two output buffers, allocated once. They are not
    pre-touched: a page is first touched by the reader or writer thread filling it, off the merge's
    critical path (pre-faulting 0.5 GB took 0.4 s of a 7 s merge)."""

    def __init__(self, input_itemsizes: Sequence[int], out_itemsize: int, chunk_elements: int, pinned: bool):
        self.chunk_elements = chunk_elements
        self._pinned_owners = []  # torch tensors behind pinned numpy views

        def allocate(nbytes: int) -> np.ndarray:
            if pinned:
                import torch

                owner = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self._pinned_owners.append(owner)
                buffer = owner.numpy()
            else:
                buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
            return buffer

        self.inputs = [[allocate(chunk_elements * size) for size in input_itemsizes] for _ in range(2)]
        self.outputs = [allocate(chunk_elements * out_itemsize) for _ in range(2)]

    @staticmethod
    def bytes_needed(input_itemsizes: Sequence[int], out_itemsize: int, chunk_elements: int) -> int:
        return 2 * chunk_elements * (sum(input_itemsizes) + out_itemsize)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python names it from 3.13


class FileCache:
    """Open file descriptors (and read-only maps) of the input files, one per file, kept for the
    whole merge."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._populate = True  # until the kernel says it has no MADV_POPULATE_READ

    def fd(self, path) -> int:
        key = str(path)
        if key not in self._fds:
            self._fds[key] = os.open(key, os.O_RDONLY)
        return self._fds[key]

    def map_range(self, path, offset: int, length: int) -> tuple[np.ndarray, tuple[mmap.mmap, int, int]]:
        """Bytes offset .. offset+length of a file as a read-only view of its map, with their pages
        mapped in; returns the view and the (map, start, length) page range to release later."""
        key = str(path)
        if key not in self._maps:
            self._maps[key] = mmap.mmap(self.fd(path), 0, access=mmap.ACCESS_READ)
        mapping = self._maps[key]
        if offset + length > len(mapping):
            raise DtmError(f"{path}: unexpected end of file at byte {len(mapping)}; the file changed or is truncated")
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        pages = (start, offset + length - start)
        if self._populate and length:
            try:
                mapping.madvise(MADV_POPULATE_READ, *pages)
            except OSError as error:
                if error.errno != 22:  # EINVAL: an older kernel; pages then fault in when read
                    raise DtmError(f"{path}: cannot read bytes {offset}..{offset + length} ({error})") from error
                self._populate = False
        view = np.frombuffer(mapping, dtype=np.uint8, count=length, offset=offset)
        return view, (mapping, *pages)

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:
                pass  # a view still refers to it; it is unmapped when that goes
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ChunkIO:
    """The merge's two input slots with one read running ahead, and its two output slots with
    their writes running behind. Not thread-safe: one consumer (the merge loop) drives it."""

    def __init__(self, buffers: Buffers, files: FileCache, reader: ThreadPoolExecutor, writer: ThreadPoolExecutor,
                 on_written: Callable[[int], None], mapped: bool = False, nonfinite: NonFiniteCounts | None = None):
        self.buffers = buffers
        self.nonfinite = nonfinite if nonfinite is not None else NonFiniteCounts(strict=False)
        self.mapped = mapped  # inputs are views of the mapped files, not copies in buffers
        self.files = files
        self.reader = reader
        self.writer = writer
        self.on_written = on_written
        self._held: list[tuple | None] = [None, None]  # (stream, start, stop) each input slot holds or is filling
        self._reads: list[Future | None] = [None, None]
        self._in_use: int | None = None  # the input slot the consumer computes on
        self._writes: list[Future | None] = [None, None]
        self._next_output = 0

    def get(self, stream: "TensorStream", start: int, stop: int) -> Chunk:
        """The chunk's inputs, read now unless a slot already holds (or is filling) them."""
        slot = self._slot_holding((stream, start, stop))
        if slot is None:
            slot = self._submit(stream, start, stop)
        self._in_use = slot
        return replace(self._reads[slot].result())

    def prefetch(self, stream: "TensorStream", start: int, stop: int) -> None:
        """Start reading a chunk the consumer will ask for next into the slot it is not using."""
        if self._slot_holding((stream, start, stop)) is None:
            self._submit(stream, start, stop)

    def _slot_holding(self, key: tuple) -> int | None:
        for slot in (0, 1):
            if self._held[slot] == key:
                return slot
        return None

    def _submit(self, stream: "TensorStream", start: int, stop: int) -> int:
        slot = 0 if self._in_use is None else 1 - self._in_use
        self._release(slot)
        self._reads[slot] = self.reader.submit(stream.read, slot, start, stop)
        self._held[slot] = (stream, start, stop)
        return slot

    def _release(self, slot: int) -> None:
        """Wait for the read into `slot` (never read into a buffer a read is still filling) and drop
        the mapped pages its chunk held."""
        future = self._reads[slot]
        if future is not None:
            wait([future])
            if future.exception() is None:
                future.result().release()

    def output_slot(self) -> int:
        """An output buffer free to fill (its previous write is done)."""
        slot = self._next_output
        self._next_output = 1 - slot
        if self._writes[slot] is not None:
            self._writes[slot].result()
            self._writes[slot] = None
        return slot

    def write(self, slot: int, fd: int, offset: int, raw: np.ndarray) -> None:
        self._writes[slot] = self.writer.submit(self._write, fd, offset, raw)

    def _write(self, fd: int, offset: int, raw: np.ndarray) -> None:
        write_exact(fd, memoryview(raw), offset)
        start_writeback(fd, offset, raw.nbytes)
        self.on_written(raw.nbytes)

    def flush(self) -> None:
        """Wait for every write (before a shard file is closed); raises the first write error."""
        for slot in (0, 1):
            future, self._writes[slot] = self._writes[slot], None
            if future is not None:
                future.result()

    def drain(self) -> None:
        """Wait for everything in flight without raising (when the merge stops, normally or not)."""
        wait([f for f in self._writes if f is not None])
        for slot in (0, 1):
            self._release(slot)
        self._reads = [None, None]
        self._held = [None, None]
        self._in_use = None


class TensorStream:
    """The chunks of one tensor across all inputs, for a method's statistics and combine passes."""

    holds_whole_tensor = False  # see in_memory.WholeTensorStream

    def __init__(self, context: TensorContext, backend, base: TensorEntry | None, models: Sequence[TensorEntry],
                 fishers: Sequence[TensorEntry], io: ChunkIO, chunk_elements: int, out_dtype: str,
                 out_fd: int | None, out_offset: int):
        self.context = context
        self.backend = backend
        self.base_entry = base
        self.model_entries = list(models)
        self.fisher_entries = list(fishers)
        self.io = io
        self.buffers = io.buffers
        self.files = io.files
        self.chunk_elements = chunk_elements
        self.out_dtype = out_dtype
        self.out_fd = out_fd  # may be set later: streams are planned before their shard file is created
        self.out_offset = out_offset
        self.following: TensorStream | None = None  # the stream the merge runs next, read ahead

    @property
    def models(self) -> list[TensorEntry]:
        return self.model_entries

    def _entries(self) -> list[TensorEntry]:
        return ([self.base_entry] if self.base_entry is not None else []) + self.model_entries + self.fisher_entries

    def ranges(self) -> list[tuple[int, int]]:
        numel = self.context.numel
        step = self.chunk_elements
        return [(start, min(numel, start + step)) for start in range(0, numel, step)]

    def view(self, raw: np.ndarray, dtype: str):
        return self.backend.view(raw, dtype)

    def read(self, slot: int, start: int, stop: int) -> Chunk:
        """Read (or map) a chunk of every input into input slot `slot` (runs on the reader thread)."""
        count = stop - start
        raws, views, mapped = [], [], []
        for index, entry in enumerate(self._entries()):
            size = DTYPE_SIZES[entry.dtype]
            if self.io.mapped:
                raw, pages = self.files.map_range(entry.path, entry.offset + start * size, count * size)
                mapped.append(pages)
            else:
                raw = self.buffers.inputs[slot][index][: count * size]
                read_exact(self.files.fd(entry.path), memoryview(raw), entry.offset + start * size, entry.path)
            self.io.nonfinite.check(id(self), self.context.name, str(entry.path), start, raw, entry.dtype)
            raws.append(raw)
            views.append(self.view(raw, entry.dtype))
        base = views.pop(0) if self.base_entry is not None else None
        models = views[: len(self.model_entries)]
        fishers = views[len(self.model_entries):]
        return Chunk(start, count, base, models, fishers, raws, mapped=mapped)

    def _read_ahead(self, index: int, ranges: list[tuple[int, int]], write: bool) -> None:
        """Prefetch what follows chunk `index`; a one-chunk tensor stays in its slot for all its
        passes, so the next tensor can be read into the other slot right away."""
        if index + 1 < len(ranges):
            self.io.prefetch(self, *ranges[index + 1])
        elif len(ranges) > 1 and not write:
            self.io.prefetch(self, *ranges[0])  # a statistics pass is followed by another pass
        elif self.following is not None:
            upcoming = self.following.ranges()
            if upcoming:
                self.io.prefetch(self.following, *upcoming[0])

    def chunks(self, write: bool = False) -> Iterator[Chunk]:
        """Yield each chunk with its inputs read; with write=True, the chunk's `out` buffer is
        written to the output file after the caller fills it (when the caller asks for the next)."""
        ranges = self.ranges()
        out_size = DTYPE_SIZES[self.out_dtype]
        for index, (start, stop) in enumerate(ranges):
            chunk = self.io.get(self, start, stop)
            self._read_ahead(index, ranges, write)
            if write:
                slot = self.io.output_slot()
                chunk.out_raw = self.buffers.outputs[slot][: (stop - start) * out_size]
                chunk.out = self.view(chunk.out_raw, self.out_dtype)
            yield chunk
            if write:
                self.io.write(slot, self.out_fd, self.out_offset + start * out_size, chunk.out_raw)

    def copy_first_input(self) -> None:
        """Pass a non-float tensor (e.g. an integer buffer) through from the first input unchanged."""
        for chunk in self.chunks(write=True):
            np.copyto(chunk.out_raw, chunk.inputs_raw[0])
