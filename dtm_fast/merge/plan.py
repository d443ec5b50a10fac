"""Planning a merge from headers alone: check that the inputs agree tensor by tensor, explain any
mismatch, and lay out the output shards so every output tensor has its file and offset before a
single byte of data is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import Checkpoint
from dtm_fast.io.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, Shaped, TensorEntry, layout_shards

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


def plan_output(reference: Checkpoint, out_dtype: str | None, max_shard_bytes: int,
                max_shard_elements: int | None = None) -> OutputPlan:
    """Output tensors in the reference's order, packed into shards (io.layout_shards)."""
    entries: list[TensorEntry] = sorted(reference.tensors.values(), key=lambda e: (str(e.path), e.offset))
    return plan_tensors([(e.name, e.dtype, e.shape) for e in entries], out_dtype, max_shard_bytes, max_shard_elements)


def plan_tensors(tensors: list[tuple[str, str, tuple[int, ...]]], out_dtype: str | None, max_shard_bytes: int,
                 max_shard_elements: int | None = None) -> OutputPlan:
    """The output plan of (name, input dtype, shape) tensors in this order: float tensors are merged
    (into `out_dtype` when given), the others copied."""
    typed = [(name, (out_dtype or dtype) if dtype in FLOAT_DTYPES else dtype, shape, dtype in FLOAT_DTYPES)
             for name, dtype, shape in tensors]
    merged = {name: is_float for name, _, _, is_float in typed}
    layouts = layout_shards([(name, dtype, shape) for name, dtype, shape, _ in typed], max_shard_bytes,
                            max_shard_elements)
    shards = []
    for index, layout in enumerate(layouts):
        planned = tuple(PlannedTensor(name, shape, dtype, merged[name], index, offset, layer_index(name))
                        for (name, dtype, shape), offset in zip(layout.entries, layout.offsets))
        shards.append(PlannedShard(layout.filename, layout.header, layout.size, planned))
    layers = [i for i in (layer_index(name) for name, _, _ in tensors) if i is not None]
    return OutputPlan(tuple(shards), max(layers) + 1 if layers else None)
