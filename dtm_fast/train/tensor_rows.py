"""Rows of dim-0 sharded tensors on disk: which rows a rank holds, reading exactly those rows from
safetensors files, and writing a rank's rows as a safetensors file.

FSDP2 shards every parameter (and AdamW state) along dim 0 the way `torch.chunk` splits it: rank r
holds rows [r·c, min(N, (r+1)·c)) with c = ceil(N / world_size). A rank therefore needs only a
contiguous byte range of each tensor in a row-major safetensors file, which it reads with positioned
reads (`dtm_fast.io.safetensors_format.read_exact`) straight into its shard when the dtypes agree,
or through one temporary of its own rows when they are cast (a bf16 checkpoint into fp32 master
weights). Nothing here unpickles: safetensors headers are JSON and tensor data are raw bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dtm_fast.errors import DtmError
from dtm_fast.io.dtypes import tag_of, torch_dtype
from dtm_fast.io.safetensors_format import TensorEntry, encode_header, read_exact, write_exact


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) of an N-row tensor that `rank` holds under torch.chunk sharding."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


def local_rows(tensor: Any) -> tuple[Any, int]:
    """(this rank's part of `tensor`, the global index of its first row). A plain tensor is all
    of itself; a DTensor must be sharded along dim 0 (FSDP2's layout) or replicated."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    local = tensor.to_local()
    placements = tensor.placements
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise DtmError(f"a parameter is sharded as {placements}; only dim-0 sharding (FSDP2) is supported")
    mesh = tensor.device_mesh
    start, stop = row_range(tensor.shape[0], mesh.get_local_rank(), mesh.size())
    if local.shape[0] != stop - start:
        raise DtmError(f"a shard holds {local.shape[0]} rows where torch.chunk gives {stop - start}; "
                       "this torch version shards differently from what dtm expects")
    return local, start


@dataclass(frozen=True)
class RowSource:
    """A safetensors tensor holding global rows [first_row, first_row + entry.shape[0]) of a tensor
    (the whole tensor when first_row is 0 and its shape is the full one)."""

    entry: TensorEntry
    first_row: int = 0

    @property
    def rows(self) -> int:
        return self.entry.shape[0] if self.entry.shape else 1


class RowReader:
    """Positioned reads from a set of safetensors files; one open descriptor per file."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()

    def _fd(self, path: Path) -> int:
        if path not in self._descriptors:
            try:
                self._descriptors[path] = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise DtmError(f"{path}: cannot open ({error.strerror})") from None
        return self._descriptors[path]

    def fill(self, destination: Any, first_row: int, sources: Iterable[RowSource], name: str) -> None:
        """Copy global rows [first_row, first_row + len(destination)) into `destination` (any
        device, any float dtype) from the sources that hold them; every row must be covered."""
        import torch

        if destination.dim() == 0:
            sources = list(sources)
            if not sources or sources[0].entry.shape not in ((), (1,)):
                raise DtmError(f"{name}: expected a scalar on disk")
            destination.copy_(self._read(sources[0].entry, 0, 1).reshape(()))
            return
        wanted_stop = first_row + destination.shape[0]
        covered = 0
        for source in sources:
            start, stop = max(first_row, source.first_row), min(wanted_stop, source.first_row + source.rows)
            if start >= stop:
                continue
            if tuple(source.entry.shape[1:]) != tuple(destination.shape[1:]):
                raise DtmError(f"{source.entry.path}: tensor {source.entry.name!r} has shape {list(source.entry.shape)}, "
                               f"the model expects rows of {list(destination.shape[1:])}")
            target = destination[start - first_row:stop - first_row]
            direct = target.device.type == "cpu" and target.is_contiguous() and tag_of(target.dtype) == source.entry.dtype
            if direct:  # read straight into the shard: no temporary at all
                self._read_into(source.entry, start - source.first_row, stop - source.first_row, target)
            else:
                with torch.no_grad():
                    target.copy_(self._read(source.entry, start - source.first_row, stop - source.first_row))
            covered += stop - start
        if covered != destination.shape[0]:
            raise DtmError(f"{name}: the files on disk hold {covered} of the {destination.shape[0]} rows this rank "
                           "needs; the checkpoint is incomplete or from another model")

    def _byte_range(self, entry: TensorEntry, start: int, stop: int) -> tuple[int, int]:
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else entry.nbytes
        return entry.offset + start * row_bytes, (stop - start) * row_bytes

    def _read(self, entry: TensorEntry, start: int, stop: int) -> Any:
        """Rows [start, stop) of `entry` as a new CPU tensor of the file's dtype."""
        import torch

        offset, size = self._byte_range(entry, start, stop)
        raw = torch.empty(size, dtype=torch.uint8)
        read_exact(self._fd(entry.path), memoryview(raw.numpy()), offset, entry.path)
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        return raw.view(torch_dtype(entry.dtype)).view(shape)

    def _read_into(self, entry: TensorEntry, start: int, stop: int, target: Any) -> None:
        import torch

        offset, size = self._byte_range(entry, start, stop)
        view = target.view(torch.uint8).view(-1)
        if view.numel() != size:
            raise DtmError(f"{entry.path}: tensor {entry.name!r} rows {start}-{stop} are {size} bytes, "
                           f"the destination {view.numel()}")
        read_exact(self._fd(entry.path), memoryview(view.numpy()), offset, entry.path)


def write_tensor_file(path: Path, tensors: list[tuple[str, Any]], metadata: dict[str, str]) -> None:
    """Write CPU or device tensors as one safetensors file, tensor by tensor (a device tensor is
    copied to the host one at a time), then fsync it."""
    import torch

    layout = []
    for name, tensor in tensors:
        tag = tag_of(tensor.dtype)
        if tag is None:
            raise DtmError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        layout.append((name, tag, tuple(tensor.shape)))
    prefix, offsets = encode_header(layout, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_exact(fd, memoryview(prefix), 0)
        for (name, tensor), (begin, end) in zip(tensors, offsets):
            if end == begin:
                continue
            host = tensor.detach().to("cpu").contiguous()
            write_exact(fd, memoryview(host.reshape(-1).view(torch.uint8).numpy()), len(prefix) + begin)
        os.fsync(fd)
    finally:
        os.close(fd)
