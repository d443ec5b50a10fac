"""Planning a merge from headers alone: check that the inputs agree tensor by tensor, explain any
mismatch, and lay out the output shards so every output tensor has its file and offset before a
single byte of data is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import Checkpoint
from dtm_fast.io.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, Shaped, TensorEntry, encode_header

EMBEDDING_HINT = re.compile(r"(embed_tokens|wte|word_embeddings|lm_head|embed_out|output)\.weight$")
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class PlannedTensor(Shaped):
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    merged: bool  # False: a non-float tensor copied from the first input
    shard: int
    offset: int  # absolute offset in the shard file
    layer_index: int | None

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.out_dtype]


@dataclass(frozen=True)
class PlannedShard:
    filename: str
    header: bytes  # the complete prefix: length + JSON
    size: int  # total file size
    tensors: tuple[PlannedTensor, ...]


@dataclass(frozen=True)
class OutputPlan:
    shards: tuple[PlannedShard, ...]
    num_layers: int | None

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: shard.filename for shard in self.shards for t in shard.tensors}


def layer_index(name: str) -> int | None:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def check_agreement(reference: Checkpoint, others: Sequence[Checkpoint], role: str = "model") -> None:
    """Every input must hold the same tensors with the same shapes and dtypes as `reference`."""
    names = set(reference.tensors)
    for other in others:
        other_names = set(other.tensors)
        missing, extra = sorted(names - other_names), sorted(other_names - names)
        if missing or extra:
            lines = [f"{other.label} and {reference.label} do not hold the same tensors:"]
            if missing:
                lines.append(f"  missing from {other.label}: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
            if extra:
                lines.append(f"  only in {other.label}: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
            if any("lm_head" in n for n in missing + extra):
                lines.append("  One checkpoint stores lm_head.weight and the other ties it to the input embeddings "
                             "(tie_word_embeddings); save both the same way before merging.")
            raise DtmError("\n".join(lines))
        for name in sorted(names):
            mine, theirs = reference.tensors[name], other.tensors[name]
            if mine.shape != theirs.shape:
                message = (f"tensor {name!r}: shape {list(theirs.shape)} in {other.label} but "
                           f"{list(mine.shape)} in {reference.label}")
                if EMBEDDING_HINT.search(name) and len(mine.shape) == 2 and mine.shape[1:] == theirs.shape[1:]:
                    message += (f". The vocabularies differ ({theirs.shape[0]} vs {mine.shape[0]} rows): one model's "
                                "tokenizer added tokens. Merge only checkpoints that share a tokenizer, or resize the "
                                "embeddings of all of them to the same vocabulary first.")
                raise DtmError(message)
            if mine.dtype != theirs.dtype:
                raise DtmError(f"tensor {name!r}: dtype {theirs.dtype} in {other.label} but {mine.dtype} in "
                               f"{reference.label}; convert the checkpoints to one dtype before merging")


def plan_output(reference: Checkpoint, out_dtype: str | None, max_shard_bytes: int) -> OutputPlan:
    """Output tensors in the reference's order, packed into shards of at most max_shard_bytes
    (a tensor larger than that gets a shard of its own), with HF file names."""
    entries: list[TensorEntry] = sorted(reference.tensors.values(), key=lambda e: (str(e.path), e.offset))
    groups: list[list[tuple[TensorEntry, str]]] = [[]]
    group_bytes = 0
    for entry in entries:
        merged = entry.dtype in FLOAT_DTYPES
        dtype = (out_dtype or entry.dtype) if merged else entry.dtype
        size = entry.numel * DTYPE_SIZES[dtype]
        if groups[-1] and group_bytes + size > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append((entry, dtype))
        group_bytes += size
    count = len(groups)
    layers = [i for i in (layer_index(e.name) for e in entries) if i is not None]
    shards = []
    for index, group in enumerate(groups):
        filename = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        header, offsets = encode_header([(e.name, dtype, e.shape) for e, dtype in group], {"format": "pt"})
        tensors = tuple(
            PlannedTensor(e.name, e.shape, dtype, e.dtype in FLOAT_DTYPES, index, len(header) + begin, layer_index(e.name))
            for (e, dtype), (begin, _) in zip(group, offsets))
        size = len(header) + (offsets[-1][1] if offsets else 0)
        shards.append(PlannedShard(filename, header, size, tensors))
    return OutputPlan(tuple(shards), max(layers) + 1 if layers else None)
