"""Each input's embeddings and lm_head laid out over the output vocabulary (merge/vocab.py says which
row each token takes), written row block by row block into the merge's cache directory. The inputs
then point at those files for these tensors, so the merge itself reads them as it reads any other
tensor: chunked, streamed and bounded by --max-memory. Only the vocabulary tensors are rewritten,
never a whole model, and each block of rows is gathered from mapped input pages.

Defaults are computed as mergekit computes them, in the input's dtype (a mean adds the rows one by
one then divides); the padding rows' mean is accumulated in fp32 over row blocks and rounded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import Checkpoint
from dtm_fast.io.safetensors_format import DTYPE_SIZES, TensorEntry, encode_header, write_exact
from dtm_fast.merge.plan import EMBEDDING_HINT
from dtm_fast.merge.vocab import TokenizerSpec, Vocabulary, build_vocabulary


def vocabulary_names(checkpoint: Checkpoint) -> list[str]:
    """The tensors with one row per token (mergekit's vocabulary-axis weights of a causal LM)."""
    return sorted(name for name, entry in checkpoint.tensors.items()
                  if EMBEDDING_HINT.search(name) and len(entry.shape) == 2)


def align_vocabularies(spec: TokenizerSpec, base: Checkpoint | None, models: tuple[Checkpoint, ...], cache: Path,
                       max_memory: int, where: str) -> tuple[Checkpoint | None, tuple[Checkpoint, ...]]:
    """`base` and `models` with their vocabulary tensors replaced by aligned copies in `cache`."""
    inputs = ([base] if base is not None else []) + list(models)
    vocabulary = build_vocabulary(spec, [c.path for c in inputs], where)
    names = vocabulary_names(inputs[0])
    for checkpoint in inputs[1:]:
        if vocabulary_names(checkpoint) != names:
            raise DtmError(f"{where}: {checkpoint.label} holds vocabulary tensors {vocabulary_names(checkpoint)} but "
                           f"{inputs[0].label} holds {names}; save the models the same way (tie_word_embeddings)")
    _check_rows(vocabulary, inputs, names, where)
    cache.mkdir(parents=True, exist_ok=True)
    aligned = [_aligned(checkpoint, vocabulary, inputs, names, cache, max_memory, index)
               for index, checkpoint in enumerate(inputs)]
    return (aligned[0], tuple(aligned[1:])) if base is not None else (None, tuple(aligned))


def _check_rows(vocabulary: Vocabulary, inputs: list[Checkpoint], names: list[str], where: str) -> None:
    for index, checkpoint in enumerate(inputs):
        for name in names:
            rows = checkpoint.tensors[name].shape[0]
            used = [r for r in vocabulary.rows[index] if r >= 0]
            used += [d[2] for d in vocabulary.defaults.values() if d[0] == "row" and d[1] == index]
            if used and max(used) >= rows:
                raise DtmError(f"{where}: {checkpoint.label}: {name} has {rows} rows but its tokenizer (or a "
                               f"tokenizer.tokens source) uses row {max(used)}; give each model its own tokenizer")


def _torch_view(entry: TensorEntry):
    """The tensor's bytes as a torch tensor over the mapped file (read only; nothing is loaded)."""
    import numpy as np
    import torch

    from dtm_fast.io.dtypes import torch_dtype

    raw = np.memmap(entry.path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.nbytes,))
    with warnings.catch_warnings():  # torch warns that the read-only map is not writable; it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=torch_dtype(entry.dtype)).view(entry.shape)


def _aligned(checkpoint: Checkpoint, vocabulary: Vocabulary, inputs: list[Checkpoint], names: list[str],
             cache: Path, max_memory: int, index: int) -> Checkpoint:
    entries = [checkpoint.tensors[name] for name in names]
    shapes = [(name, e.dtype, (vocabulary.size, e.shape[1])) for name, e in zip(names, entries)]
    header, offsets = encode_header(shapes)
    key = hashlib.sha256(repr((checkpoint.header_sha256, str(checkpoint.path), index, vocabulary.rows,
                               sorted(vocabulary.defaults.items()), sorted(vocabulary.forced),
                               vocabulary.size)).encode()).hexdigest()[:16]
    path = cache / f"vocabulary-{key}.safetensors"
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_exact(fd, memoryview(header), 0)
        for name, entry, (begin, _) in zip(names, entries, offsets):
            sources = [c.tensors[name] for c in inputs]
            _write_tensor(fd, len(header) + begin, index, sources, vocabulary, max_memory)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    tensors = dict(checkpoint.tensors)
    for (name, dtype, shape), (begin, end) in zip(shapes, offsets):
        tensors[name] = TensorEntry(name, dtype, shape, path, len(header) + begin, end - begin)
    return dataclasses.replace(checkpoint, tensors=tensors)


def _write_tensor(fd: int, offset: int, index: int, sources: list[TensorEntry], vocabulary: Vocabulary,
                  max_memory: int) -> None:
    """Rows of input `index` for every output token, block by block; padding rows last."""
    import torch

    views = [_torch_view(entry) for entry in sources]
    own = views[index]
    width, dtype = own.shape[1], own.dtype
    row_bytes = width * DTYPE_SIZES[sources[index].dtype]
    block = max(1, min(vocabulary.tokens, (max_memory // 8) // max(1, row_bytes * 4)))
    mapping = torch.tensor(vocabulary.rows[index], dtype=torch.int64)
    total = torch.zeros(width, dtype=torch.float32)
    for start in range(0, vocabulary.tokens, block):
        stop = min(start + block, vocabulary.tokens)
        rows = mapping[start:stop]
        out = torch.zeros((stop - start, width), dtype=dtype)
        have = rows >= 0
        out[have] = own[rows[have]]
        for token in range(start, stop):
            if token in vocabulary.defaults and (rows[token - start] < 0 or token in vocabulary.forced):
                out[token - start] = _default(vocabulary.defaults[token], views, width, dtype)
        total += out.to(torch.float32).sum(dim=0)
        write_exact(fd, memoryview(out.view(torch.uint8).numpy()), offset + start * row_bytes)
    if vocabulary.size > vocabulary.tokens:  # mean of this input's rows, for the padding rows
        pad = (total / vocabulary.tokens).to(dtype).expand(vocabulary.size - vocabulary.tokens, width).contiguous()
        write_exact(fd, memoryview(pad.view(torch.uint8).numpy()), offset + vocabulary.tokens * row_bytes)


def _default(rule: tuple, views: list, width: int, dtype):
    import torch

    if rule[0] == "zero":
        return torch.zeros(width, dtype=dtype)
    if rule[0] == "row":
        return views[rule[1]][rule[2]]
    total = torch.zeros(width, dtype=dtype)  # mergekit's order: add each row in the input dtype, then divide
    for source, row in rule[1]:
        total = total + views[source][row]
    return total / len(rule[1])
