"""What a merge method sees of one tensor: its context (name, shape, seed) and its chunks (a range
of elements of every input, and the output buffer to fill). Plain data, imported by the methods, the
streams and the engine alike."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtm_fast.io.safetensors_format import Shaped
from dtm_fast.merge.budget import FAULT_AROUND_BYTES


@dataclass(frozen=True)
class TensorContext(Shaped):
    """What a method may know about the tensor being merged."""

    name: str
    shape: tuple[int, ...]
    seed: int

    @property
    def row_length(self) -> int:
        """Elements per row along the leading axis (1 for vectors and scalars)."""
        return self.numel // self.shape[0] if len(self.shape) >= 2 and self.shape[0] else 1


@dataclass
class Chunk:
    start: int  # flat index of the first element
    count: int
    base: Any | None  # typed views of the inputs, as the backend takes them
    models: list
    fishers: list
    inputs_raw: list[np.ndarray] = field(default_factory=list)  # the same inputs' bytes, base first
    out: Any | None = None
    out_raw: np.ndarray | None = None
    mapped: list[tuple[mmap.mmap, int, int]] = field(default_factory=list)  # (map, start, length) held in memory

    def release(self) -> None:
        """Drop mapped input pages from this process (they stay in the page cache). The range is
        widened by the kernel's fault-around window on both sides: populating a range also maps up
        to that much of its neighbours, which would otherwise stay mapped (and counted) until the
        merge ends. A neighbouring chunk still in use just faults those few pages in again."""
        for mapping, start, length in self.mapped:
            if not mapping.closed:
                first = max(0, start - FAULT_AROUND_BYTES)
                last = min(len(mapping), start + length + FAULT_AROUND_BYTES)
                mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        self.mapped = []
