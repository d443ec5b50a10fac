"""The elements a one-read threshold merge could not decide while it streamed (merge/one_read.py):
their flat positions and every input's bytes there, held in memory up to a limit and spilled past it
to a scratch file beside the output; and the positioned writes that patch their final values into
the output file once the thresholds are known.

The scratch file is an unnamed file in the output's partial directory (O_TMPFILE, or a named file
unlinked as soon as it is open): it never appears among the partial directory's files, so it can
neither be published nor confuse a resume (io/owned_dir.py publishes what the directory lists), it
is removed when the tensor is done, and after a kill the kernel reclaims its space with the process.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from dtm_fast.io.safetensors_format import DTYPE_SIZES, read_exact, write_exact

UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
BATCH = 1 << 16  # elements widened at a time: ~2 MB of fp32 temporaries for 5 inputs, in the fixed overhead


def widen(values: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements (unsigned ints of the dtype's width) as fp32, exactly as the kernels widen them."""
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return values.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return values.view(np.float32)
    if dtype == "F64":
        return values.view(np.float64).astype(np.float32)
    raise ValueError(f"one-read thresholds take float tensors, not {dtype}")


def scratch_file(directory: str) -> int:
    """A read-write descriptor of an unnamed file in `directory`."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        path = os.path.join(directory, f".dtm-kept-aside-{os.getpid()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        return fd


def directory_of(fd: int) -> str:
    """The directory holding the open file `fd` (Linux /proc)."""
    return os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))


class KeptAside:
    """Parts in position order: (flat positions int64, one array of raw elements per input)."""

    def __init__(self, dtypes: Sequence[str], memory_limit: int, directory: str):
        self.dtypes = list(dtypes)
        self.memory_limit = memory_limit
        self.directory = directory
        self.held = 0
        self.count = 0
        self._parts: list[tuple] = []  # ("memory", positions, arrays) or ("file", offset, count)
        self._fd: int | None = None
        self._end = 0

    def add(self, start: int, local: np.ndarray, raws: Sequence[np.ndarray]) -> None:
        """Keep the elements at chunk positions `local` (ascending) of a chunk starting at `start`."""
        if not len(local):
            return
        positions = local + start
        arrays = [raw.view(UNSIGNED[DTYPE_SIZES[dtype]])[local] for raw, dtype in zip(raws, self.dtypes)]
        nbytes = positions.nbytes + sum(a.nbytes for a in arrays)
        self.count += len(local)
        if self.held + nbytes <= self.memory_limit:
            self._parts.append(("memory", positions, arrays))
            self.held += nbytes
            return
        if self._fd is None:
            self._fd = scratch_file(self.directory)
        offset = self._end
        for array in (positions, *arrays):
            write_exact(self._fd, memoryview(array).cast("B"), self._end)
            self._end += array.nbytes
        self._parts.append(("file", offset, len(local)))

    def parts(self) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Every kept element in position order, in batches of at most BATCH (bounded temporaries
        for whoever widens them), read back from the scratch file where spilled."""
        for part in self._parts:
            if part[0] == "memory":
                _, positions, arrays = part
                for first in range(0, len(positions), BATCH):
                    yield positions[first:first + BATCH], [a[first:first + BATCH] for a in arrays]
                continue
            _, offset, count = part
            types = [np.dtype(np.int64)] + [np.dtype(UNSIGNED[DTYPE_SIZES[d]]) for d in self.dtypes]
            starts = np.cumsum([0] + [count * t.itemsize for t in types])[:-1] + offset
            for first in range(0, count, BATCH):
                length = min(BATCH, count - first)
                arrays = []
                for kind, start in zip(types, starts):
                    array = np.empty(length, dtype=kind)
                    read_exact(self._fd, memoryview(array).cast("B"), int(start) + first * kind.itemsize,
                               "kept-aside scratch file")
                    arrays.append(array)
                yield arrays[0], arrays[1:]

    def close(self) -> None:
        self._parts = []
        self.held = 0
        if self._fd is not None:
            os.close(self._fd)  # unnamed: closing it frees its space
            self._fd = None


def patch(fd: int, offset: int, itemsize: int, positions: np.ndarray, values: np.ndarray, block: np.ndarray) -> None:
    """Write `values` (raw output elements) at element `positions` (ascending) of the tensor stored
    at byte `offset` of `fd`: each block of the output that holds some is read, patched and written
    back with positioned reads and writes through the `block` buffer."""
    per_block = max(1, block.nbytes // itemsize)
    unsigned = UNSIGNED[itemsize]
    index = 0
    while index < len(positions):
        first = int(positions[index]) // per_block * per_block
        stop = int(np.searchsorted(positions, first + per_block, "left"))
        last = int(positions[stop - 1]) + 1
        raw = block[: (last - first) * itemsize]
        read_exact(fd, memoryview(raw), offset + first * itemsize, "the output shard")
        raw.view(unsigned)[positions[index:stop] - first] = values[index:stop]
        write_exact(fd, memoryview(raw), offset + first * itemsize)
        index = stop
