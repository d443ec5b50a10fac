"""Exact magnitude thresholds (TIES, breadcrumbs) without holding a tensor in memory.

A magnitude |d| of an fp32 value, read as its IEEE-754 bit pattern, is a non-negative int32 that
orders exactly like the magnitudes, NaN above +inf. So "the k-th largest |d|" is the k-th largest
integer key, and a radix select finds it in two streaming passes: a 65536-bin histogram of the high
16 bits locates the bucket holding rank k, then a histogram of the low 16 bits of the keys in that
bucket gives the exact key. (The design note's one-pass bf16 shortcut does not apply: deltas of bf16
weights are computed in fp32 and are not bf16 values.)

Ties at the threshold: every element whose key equals the threshold is kept, so a tensor with
repeated magnitudes can keep more than k elements. mergekit keeps exactly k, choosing among equal
magnitudes by argsort order, which depends on the sort implementation; ours depends on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BINS = 1 << 16


def magnitude_keys(values: "torch.Tensor") -> "torch.Tensor":
    """int64 keys that order like |values| (fp32), NaN above +inf."""
    import torch

    return values.float().abs().view(torch.int32).to(torch.int64)


def kth_largest_key_in_memory(keys: "torch.Tensor", rank: int) -> int:
    """Reference: the rank-th largest key (1-based) of a whole tensor."""
    import torch

    return int(torch.sort(keys.reshape(-1), descending=True).values[rank - 1])


def new_histogram() -> np.ndarray:
    """A zeroed 65536-bin count array, as every backend's abs_delta_histogram fills."""
    return np.zeros(BINS, dtype=np.int64)


def _from_top(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest element, how many elements lie in higher bins)."""
    counts_from_top = np.cumsum(np.asarray(histogram)[::-1])
    position = int(np.searchsorted(counts_from_top, rank))
    above = int(counts_from_top[position - 1]) if position > 0 else 0
    return BINS - 1 - position, above


SAMPLE_SLICES = 64
SAMPLE_SLICE_ELEMENTS = 2048


def _gather(array, starts: list[int], length: int):
    """The slices array[start:start + length] side by side in a new array (HostArray or torch)."""
    from dtm_fast.merge.host_array import HostArray

    if isinstance(array, HostArray):
        return HostArray(np.concatenate([array[start:start + length].raw for start in starts]), array.dtype)
    import torch

    return torch.cat([array[start:start + length] for start in starts])


def predict_bucket(backend, base, model, rank: int, numel: int) -> int | None:
    """A guess of the bucket (high 16 bits) of the rank-th largest |model - base| key of a tensor of
    `numel` elements, from 64 evenly spaced slices of 2048 elements of this chunk of it. The first
    radix-select pass then counts that bucket's low bits too, and a right guess saves the second
    pass; a wrong one costs nothing but the sample. None for chunks too small to be worth it."""
    count = base.numel()
    sampled = SAMPLE_SLICES * SAMPLE_SLICE_ELEMENTS
    if count < 4 * sampled:
        return None
    starts = [index * (count // SAMPLE_SLICES) for index in range(SAMPLE_SLICES)]
    sample = new_histogram()
    backend.abs_delta_histogram(_gather(base, starts, SAMPLE_SLICE_ELEMENTS),
                                _gather(model, starts, SAMPLE_SLICE_ELEMENTS), sample, None)
    bucket, _ = _from_top(sample, min(sampled, max(1, round(rank * sampled / numel))))
    return bucket


@dataclass
class RadixSearch:
    """Finds the key at one descending rank (1-based) over streamed histograms."""

    rank: int
    bucket: int = -1  # high 16 bits of the answer, known after the first pass
    rank_in_bucket: int = 0
    key: int = -1  # the answer, known after the second pass

    def locate_bucket(self, high_histogram: np.ndarray) -> None:
        self.bucket, above = _from_top(high_histogram, self.rank)
        self.rank_in_bucket = self.rank - above

    def locate_key(self, low_histogram: np.ndarray) -> None:
        low, _ = _from_top(low_histogram, self.rank_in_bucket)
        self.key = (self.bucket << 16) | low


def top_k_count(density: float, numel: int) -> int:
    """How many elements TIES keeps: max(1, floor(density * n)), as mergekit does."""
    return max(1, int(density * numel))


def breadcrumbs_ranks(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Descending ranks (1-based, inclusive) of the band breadcrumbs keeps: the largest gamma
    fraction is dropped as outliers, then the next density fraction is kept (mergekit's
    magnitude_outliers). Returns (first, last); last < first means an empty band."""
    keep = int(density * numel)
    top_removed = int(gamma * numel)
    bottom_removed = max(0, numel - keep - top_removed)
    top_removed = numel - keep - bottom_removed
    return top_removed + 1, top_removed + keep
