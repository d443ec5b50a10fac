"""Reading and validating safetensors headers without touching tensor data.

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {...}}), then the data
region; offsets are relative to the data region. We check everything a corrupt, truncated or
hand-edited file can get wrong before any tensor is read, and name the file and tensor in the error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dtm_fast.errors import DtmError

from dtm_fast.io.dtypes import DTYPE_SIZES, FLOAT_DTYPES  # noqa: F401 - re-exported, the one dtype table
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# More tensor entries than any real checkpoint file holds (a 671B MoE spreads ~92k over 163 files);
# parsing stops there, so a crafted header cannot make the parser hold millions of entries.
MAX_TENSORS_PER_FILE = 200_000
HEADER_ALIGNMENT = 8


class Shaped:
    """Element count of anything with a `shape` (tensor entries, planned tensors, merge contexts)."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorEntry(Shaped):
    """Where one tensor's bytes live on disk."""

    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_bytes: bytes  # the raw JSON, hashed for provenance


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate one safetensors file's header."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DtmError(f"{path}: truncated safetensors file ({file_size} bytes; the 8-byte header "
                               "length is missing). Re-download or re-export the checkpoint.")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES or 8 + header_length > file_size:
                raise DtmError(f"{path}: corrupt safetensors header: it claims {header_length} header bytes but "
                               f"the file has {file_size} bytes. The file is truncated or not safetensors.")
            raw = handle.read(header_length)
    except OSError as error:
        raise DtmError(f"{path}: cannot read ({error.strerror})") from None
    header = _parse_header_json(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise DtmError(f"{path}: corrupt safetensors header: __metadata__ must be an object of strings, got "
                       f"{type(metadata).__name__}")
    data_start = 8 + header_length
    data_size = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise DtmError(f"{where}: header entry needs dtype, shape and data_offsets")
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise DtmError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise DtmError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(o) for o in offsets) or not offsets[0] <= offsets[1]):
            raise DtmError(f"{where}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise DtmError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of "
                           f"{dtype} needs {expected}")
        if offsets[1] > data_size:
            raise DtmError(f"{where}: data ends at byte {offsets[1]} of the data region but the file holds only "
                           f"{data_size} data bytes: the file is truncated. Re-download or re-export it.")
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], expected)
    spans.sort()
    for (begin_a, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise DtmError(f"{path}: corrupt safetensors header: tensors {name_a!r} and {name_b!r} overlap "
                           f"(bytes {begin_a}-{end_a} and from {begin_b})")
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, raw)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _TooManyEntries(Exception):
    pass


def _parse_header_json(raw: bytes, path: Path) -> dict:
    """The header's JSON object; parsing stops after MAX_TENSORS_PER_FILE objects, so its memory is
    bounded by entries as well as by bytes."""
    if raw.count(b"{") > MAX_TENSORS_PER_FILE + 2:  # cheap: refuses before allocating any entry
        raise DtmError(f"{path}: corrupt safetensors header: more than {MAX_TENSORS_PER_FILE:,} entries, more "
                       "than any real checkpoint file holds")
    objects = 0

    def count_object(pairs):
        nonlocal objects
        objects += 1
        if objects > MAX_TENSORS_PER_FILE + 1:
            raise _TooManyEntries
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=count_object)
    except _TooManyEntries:
        raise DtmError(f"{path}: corrupt safetensors header: more than {MAX_TENSORS_PER_FILE:,} entries, more "
                       "than any real checkpoint file holds") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise DtmError(f"{path}: corrupt safetensors header: not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise DtmError(f"{path}: corrupt safetensors header: expected a JSON object")
    if len(header) > MAX_TENSORS_PER_FILE + 1:
        raise DtmError(f"{path}: corrupt safetensors header: {len(header):,} entries, more than any real "
                       f"checkpoint file holds ({MAX_TENSORS_PER_FILE:,})")
    return header


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Lay out a safetensors file for (name, dtype, shape) entries in the given order.

    Returns the full prefix (8-byte length + JSON padded with spaces to 8-byte alignment, so every
    tensor starts aligned) and each tensor's [begin, end) offsets relative to the data region.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets = []
    cursor = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        offsets.append((cursor, cursor + size))
        cursor += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw, offsets


def read_exact(fd: int, buffer: memoryview, offset: int, path: Path | str) -> None:
    """Positioned read that fills `buffer` completely (preadv may return short counts)."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    done = 0
    total = len(view)
    while done < total:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise DtmError(f"{path}: unexpected end of file at byte {offset + done}; the file changed or is "
                           "truncated")
        done += count


def write_exact(fd: int, buffer: memoryview, offset: int) -> None:
    """Positioned write of the whole buffer (pwritev may write short counts)."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
