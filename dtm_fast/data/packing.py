"""Rows of examples for training: packing, deterministic order, and collation to tensors.

Packing puts several examples into one row of at most `max_length` tokens. Each example's
position_ids restart at 0; with no attention mask and no KV cache (`use_cache=False`),
transformers derives the sequence boundaries from those restarts (block-diagonal causal attention
for sdpa/eager, variable-length kernels for flash-attention), so an example never attends to the
one packed before it. Targets are shifted per example before packing, so the last token of one
example is never trained to predict the first token of the next.

Order is a pure function of the seed: examples are shuffled, packed first-fit-decreasing within
blocks (dense rows without sorting the whole corpus by length), and each epoch visits the rows in
its own seeded permutation. Step s always trains on the same rows, which is what makes a resumed
run continue the same loss curve.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Sequence

from dtm_fast.data.chat import IGNORE_INDEX, TokenizedExample

PACKING_BLOCK = 2048  # examples per first-fit-decreasing block


def shifted_targets(example: TokenizedExample) -> list[int]:
    """targets[t] is the label of token t+1 (what position t predicts); the last position of an
    example predicts nothing."""
    return example.labels[1:] + [IGNORE_INDEX]


def pack_rows(lengths: Sequence[int], max_length: int, seed: int, packing: bool) -> list[list[int]]:
    """Group example indices into rows. Without packing every example is its own row."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if not packing:
        return [[index] for index in order]
    rows: list[list[int]] = []
    for start in range(0, len(order), PACKING_BLOCK):
        block = sorted(order[start:start + PACKING_BLOCK], key=lambda i: -lengths[i])  # stable
        block_rows: list[list[int]] = []
        space: list[int] = []
        for index in block:
            length = lengths[index]
            for row_number, free in enumerate(space):
                if free >= length:
                    block_rows[row_number].append(index)
                    space[row_number] -= length
                    break
            else:
                block_rows.append([index])
                space.append(max_length - length)
        rows.extend(block_rows)
    return rows


@functools.lru_cache(maxsize=2)  # batches move forward, touching one or two epochs at a time
def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


@dataclass(frozen=True)
class RowSchedule:
    """Which rows each optimizer step trains on. Epochs are concatenated: step s takes the rows at
    positions [s*B, (s+1)*B) of the stream perm(epoch 0) + perm(epoch 1) + ..., so no row is ever
    dropped and a batch may straddle two epochs."""

    num_rows: int
    batch_size: int
    seed: int

    def total_steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.num_rows / self.batch_size))

    def rows_for_step(self, step: int) -> list[int]:
        rows = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_rows)
            rows.append(_epoch_permutation(self.num_rows, self.seed, epoch)[offset])
        return rows

    def epoch_at(self, step: int) -> float:
        return step * self.batch_size / self.num_rows


@dataclass(frozen=True)
class Batch:
    """A micro-batch as tensors, (rows, length) each, right-padded; or, flattened for
    variable-length attention kernels, one row of every example back to back with the cumulative
    sequence lengths that tell the kernel where each starts."""

    input_ids: "torch.Tensor"
    position_ids: "torch.Tensor"
    targets: "torch.Tensor"
    real_tokens: int    # tokens that are not padding
    padded_tokens: int  # tokens computed: rows * length
    sequence_lengths: tuple[int, ...] = ()  # every example's length, in order
    cu_seq_lens: "torch.Tensor | None" = None  # flattened only: (examples + 1,) int32, [0, n0, n0+n1, ...]
    max_seq_len: int = 0                       # flattened only: the longest example

    def attention_kwargs(self, device) -> dict:
        """What the model's forward needs beyond ids and positions: flash-attention's varlen
        arguments for a flattened batch, nothing for a padded one (its masks come from the
        position_ids restarts)."""
        if self.cu_seq_lens is None:
            return {}
        cu = self.cu_seq_lens.to(device)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.max_seq_len,
                "max_length_k": self.max_seq_len}


def collate(examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]], pad_id: int,
            pad_to: int | None = None) -> Batch:
    """Concatenate each row's examples; padding continues the last example's positions (so it
    forms no new sequence) and has no targets. Real tokens never attend to padding: it comes after
    them and attention is causal."""
    import torch

    row_ids, row_positions, row_targets = [], [], []
    for row in rows:
        ids, positions, targets = [], [], []
        for index in row:
            example = examples[index]
            ids.extend(example.input_ids)
            positions.extend(range(len(example)))
            targets.extend(shifted_targets(example))
        row_ids.append(ids)
        row_positions.append(positions)
        row_targets.append(targets)
    length = max(len(ids) for ids in row_ids)
    if pad_to is not None:
        length = max(length, pad_to)
    real = sum(len(ids) for ids in row_ids)
    for ids, positions, targets in zip(row_ids, row_positions, row_targets):
        missing = length - len(ids)
        next_position = positions[-1] + 1
        ids.extend([pad_id] * missing)
        positions.extend(range(next_position, next_position + missing))
        targets.extend([IGNORE_INDEX] * missing)
    return Batch(
        input_ids=torch.tensor(row_ids, dtype=torch.long),
        position_ids=torch.tensor(row_positions, dtype=torch.long),
        targets=torch.tensor(row_targets, dtype=torch.long),
        real_tokens=real,
        padded_tokens=length * len(rows),
        sequence_lengths=tuple(len(examples[index]) for row in rows for index in row),
    )


def collate_flat(examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]]) -> Batch:
    """All examples of `rows` as one row (1, total tokens), no padding at all, for flash-attention's
    variable-length kernel: it attends within [cu[i], cu[i+1]) only, so examples never see each
    other; targets are shifted per example as in `collate`. The loss equals the padded layout's."""
    import torch

    order = [index for row in rows for index in row]
    ids, positions, targets, boundaries = [], [], [], [0]
    for index in order:
        example = examples[index]
        ids.extend(example.input_ids)
        positions.extend(range(len(example)))
        targets.extend(shifted_targets(example))
        boundaries.append(boundaries[-1] + len(example))
    lengths = tuple(len(examples[index]) for index in order)
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        targets=torch.tensor([targets], dtype=torch.long),
        real_tokens=len(ids),
        padded_tokens=len(ids),
        sequence_lengths=lengths,
        cu_seq_lens=torch.tensor(boundaries, dtype=torch.int32),
        max_seq_len=max(lengths),
    )
