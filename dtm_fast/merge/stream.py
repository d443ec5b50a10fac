"""Streaming one tensor through preallocated buffers.

Memory: the merge allocates two slots of input buffers (one per input file: base, models, Fisher
estimates) and two output buffers once, sized from the budget, and reuses them for every chunk of
every tensor (fresh allocations cost ~10x in page faults). While the method computes on slot j, a
reader thread fills slot j+1 with positioned reads, and a writer thread writes the previous output
chunk at its planned offset, so disk, compute and write overlap.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from dtm_fast.io.safetensors_format import DTYPE_SIZES, TensorEntry, read_exact, write_exact
from dtm_fast.merge.methods.base import TensorContext

TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
}


@dataclass
class Chunk:
    start: int  # flat index of the first element
    count: int
    base: torch.Tensor | None
    models: list[torch.Tensor]
    fishers: list[torch.Tensor]
    out: torch.Tensor | None = None


class Buffers:
    """Two slots of per-input byte buffers plus two output buffers, allocated once and touched so
    their memory is resident (and counted) from the start."""

    def __init__(self, input_itemsizes: Sequence[int], out_itemsize: int, chunk_elements: int, pinned: bool):
        self.chunk_elements = chunk_elements

        def allocate(nbytes: int) -> torch.Tensor:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            buffer.zero_()
            return buffer

        self.inputs = [[allocate(chunk_elements * size) for size in input_itemsizes] for _ in range(2)]
        self.outputs = [allocate(chunk_elements * out_itemsize) for _ in range(2)]

    @staticmethod
    def bytes_needed(input_itemsizes: Sequence[int], out_itemsize: int, chunk_elements: int) -> int:
        return 2 * chunk_elements * (sum(input_itemsizes) + out_itemsize)


class FileCache:
    """Open file descriptors for reading inputs, one per file, kept for the whole merge."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def fd(self, path) -> int:
        key = str(path)
        if key not in self._fds:
            self._fds[key] = os.open(key, os.O_RDONLY)
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TensorStream:
    """The chunks of one tensor across all inputs, for a method's statistics and combine passes."""

    def __init__(self, context: TensorContext, backend, base: TensorEntry | None, models: Sequence[TensorEntry],
                 fishers: Sequence[TensorEntry], buffers: Buffers, files: FileCache, reader: ThreadPoolExecutor,
                 writer: ThreadPoolExecutor, chunk_elements: int, out_dtype: str, out_fd: int | None,
                 out_offset: int, on_written: Callable[[int], None]):
        self.context = context
        self.backend = backend
        self.base_entry = base
        self.model_entries = list(models)
        self.fisher_entries = list(fishers)
        self.buffers = buffers
        self.files = files
        self.reader = reader
        self.writer = writer
        self.chunk_elements = chunk_elements
        self.out_dtype = out_dtype
        self.out_fd = out_fd
        self.out_offset = out_offset
        self.on_written = on_written

    @property
    def models(self) -> list[TensorEntry]:
        return self.model_entries

    def _entries(self) -> list[TensorEntry]:
        return ([self.base_entry] if self.base_entry is not None else []) + self.model_entries + self.fisher_entries

    def _ranges(self) -> list[tuple[int, int]]:
        numel = self.context.numel
        step = self.chunk_elements
        return [(start, min(numel, start + step)) for start in range(0, numel, step)]

    def _read(self, slot: int, start: int, stop: int) -> Chunk:
        count = stop - start
        views = []
        for index, entry in enumerate(self._entries()):
            size = DTYPE_SIZES[entry.dtype]
            raw = self.buffers.inputs[slot][index][: count * size]
            read_exact(self.files.fd(entry.path), memoryview(raw.numpy()), entry.offset + start * size, entry.path)
            views.append(raw.view(TORCH_DTYPES[entry.dtype]))
        base = views.pop(0) if self.base_entry is not None else None
        models = views[: len(self.model_entries)]
        fishers = views[len(self.model_entries):]
        return Chunk(start, count, base, models, fishers)

    def chunks(self, write: bool = False) -> Iterator[Chunk]:
        """Yield each chunk with its inputs read; with write=True, the chunk's `out` buffer is
        written to the output file after the caller fills it (when the caller asks for the next)."""
        ranges = self._ranges()
        if not ranges:
            return
        pending_read: Future = self.reader.submit(self._read, 0, *ranges[0])
        pending_writes: list[Future | None] = [None, None]
        out_size = DTYPE_SIZES[self.out_dtype]
        try:
            for index, (start, stop) in enumerate(ranges):
                chunk = pending_read.result()
                if index + 1 < len(ranges):
                    pending_read = self.reader.submit(self._read, (index + 1) % 2, *ranges[index + 1])
                if write:
                    slot = index % 2
                    if pending_writes[slot] is not None:
                        pending_writes[slot].result()  # the buffer is free once its last write is done
                    raw = self.buffers.outputs[slot][: (stop - start) * out_size]
                    chunk.out = raw.view(TORCH_DTYPES[self.out_dtype])
                yield chunk
                if write:
                    pending_writes[slot] = self.writer.submit(self._write, raw, start * out_size)
        finally:
            if not pending_read.done():
                pending_read.result()  # never leave a read running into a buffer we reuse
            for future in pending_writes:
                if future is not None:
                    future.result()

    def _write(self, raw: torch.Tensor, byte_offset: int) -> None:
        write_exact(self.out_fd, memoryview(raw.numpy()), self.out_offset + byte_offset)
        self.on_written(raw.numel())

    def copy_first_input(self) -> None:
        """Pass a non-float tensor (e.g. an integer buffer) through from the first input unchanged."""
        for chunk in self.chunks(write=True):
            source = chunk.base if chunk.base is not None else chunk.models[0]
            chunk.out.view(torch.uint8).copy_(source.view(torch.uint8))
