"""Exact magnitude thresholds (TIES, breadcrumbs) without holding a tensor in memory.

A magnitude |d| of an fp32 value, read as its IEEE-754 bit pattern, is a non-negative int32 that
orders exactly like the magnitudes, NaN above +inf. So "the k-th largest |d|" is the k-th largest
integer key, and a radix select finds it in two streaming passes: a 65536-bin histogram of the high
16 bits locates the bucket holding rank k, then a histogram of the low 16 bits of the keys in that
bucket gives the exact key. (The design note's one-pass bf16 shortcut does not apply: deltas of bf16
weights are computed in fp32 and are not bf16 values.)

Ties at the threshold: every search also says how many keys lie above the answer and how many
equal it (`RankedKey`), so a method can keep exactly k elements and choose among the tied ones by
flat index (methods/gta.py), or keep every tied element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dtm_fast.io.safetensors_format import DTYPE_SIZES
from dtm_fast.merge.specs import NO_UPPER_KEY

if TYPE_CHECKING:
    import torch

BINS = 1 << 16


@dataclass(frozen=True)
class RankedKey:
    """The key at a descending rank, with how many keys are above it and how many equal it."""

    key: int
    above: int
    ties: int


def magnitude_keys(values: "torch.Tensor") -> "torch.Tensor":
    """int64 keys that order like |values| (fp32), NaN above +inf."""
    import torch

    return values.float().abs().view(torch.int32).to(torch.int64)


def kth_largest_key_in_memory(keys: "torch.Tensor", rank: int) -> int:
    """Reference: the rank-th largest key (1-based) of a whole tensor."""
    import torch

    return int(torch.sort(keys.reshape(-1), descending=True).values[rank - 1])


def sorted_select(stream, ranks_per_model: list[list[int]]) -> list[dict[int, RankedKey]]:
    """The definition of the keys at descending ranks: a full sort of each model's |x - b| keys.
    Only for a stream that holds whole tensors (the reference); the streaming searches below must
    give exactly these keys."""
    (chunk,) = stream.chunks()
    found = []
    for model, ranks in zip(chunk.models, ranks_per_model):
        keys = magnitude_keys(model.float() - chunk.base.float()) if ranks else None
        answers = {}
        for rank in ranks:
            key = kth_largest_key_in_memory(keys, rank)
            answers[rank] = RankedKey(key, int((keys > key).sum()), int((keys == key).sum()))
        found.append(answers)
    return found


def new_histogram() -> np.ndarray:
    """A zeroed 65536-bin count array, as every backend's abs_delta_histogram fills."""
    return np.zeros(BINS, dtype=np.int64)


def _from_top(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest element, how many elements lie in higher bins)."""
    counts_from_top = np.cumsum(np.asarray(histogram)[::-1])
    position = int(np.searchsorted(counts_from_top, rank))
    above = int(counts_from_top[position - 1]) if position > 0 else 0
    return len(counts_from_top) - 1 - position, above


SAMPLE_SLICES = 64
SAMPLE_SLICE_ELEMENTS = 2048
SAMPLE_ELEMENTS = SAMPLE_SLICES * SAMPLE_SLICE_ELEMENTS
BRACKET_SIGMAS = 4  # how wide the sampled bracket is, in standard deviations of the sample's rank
COLLECT_FRACTION = 8  # a search collects at most chunk_elements / 8 keys (budgeted by the engine)


def _strided_sample(array, step: int):
    """SAMPLE_SLICES slices of SAMPLE_SLICE_ELEMENTS elements, `step` elements apart, side by side
    in a new array (HostArray or torch tensor)."""
    from dtm_fast.merge.host_array import HostArray

    if isinstance(array, HostArray):
        size = DTYPE_SIZES[array.dtype]
        rows = np.lib.stride_tricks.as_strided(array.raw, shape=(SAMPLE_SLICES, SAMPLE_SLICE_ELEMENTS * size),
                                               strides=(step * size, 1), writeable=False)
        return HostArray(rows.reshape(-1), array.dtype)  # reshape copies the strided rows
    return array.as_strided((SAMPLE_SLICES, SAMPLE_SLICE_ELEMENTS), (step, 1)).reshape(-1)


def sample_keys(backend, base, models) -> list[np.ndarray] | None:
    """The |model - base| keys of 64 evenly spaced slices of 2048 elements of a chunk (uint32), one
    array per model, or None for a chunk too small for a sample to save anything."""
    count = base.numel()
    if count < 4 * SAMPLE_ELEMENTS:
        return None
    step = count // SAMPLE_SLICES
    keys = [np.empty(SAMPLE_ELEMENTS, dtype=np.uint32) for _ in models]
    backend.abs_delta_select(_strided_sample(base, step), [_strided_sample(model, step) for model in models],
                             [(0, NO_UPPER_KEY)] * len(models), keys)
    return keys


def bracket(sample: np.ndarray, rank: int, numel: int) -> tuple[int, int]:
    """Keys (low, high) that the rank-th largest key of `numel` very probably lies between, from the
    sample's keys around the same quantile, BRACKET_SIGMAS binomial standard deviations either side."""
    size = len(sample)
    quantile = rank / numel
    position = quantile * size
    margin = BRACKET_SIGMAS * math.sqrt(size * quantile * (1 - quantile)) + 8
    top, bottom = math.floor(position - margin), math.ceil(position + margin)  # descending ranks in the sample
    # a sort, not np.partition: keys of bf16 deltas repeat a lot, which makes introselect ~10x slower
    ordered = np.sort(sample)
    high = int(ordered[size - top]) if top >= 1 else NO_UPPER_KEY
    low = int(ordered[size - bottom]) if bottom <= size else 0
    return low, high


@dataclass
class BracketedSearch:
    """One pass of an exact k-th largest search: keys above the bracket are counted, keys inside it
    collected; the answer is then selected among the collected keys."""

    model: int
    rank: int
    low: int
    high: int
    collected: np.ndarray  # uint32, capacity
    above: int = 0
    in_range: int = 0

    def free(self) -> np.ndarray:
        """Where the next collected keys go (empty once full)."""
        return self.collected[min(self.in_range, len(self.collected)):]

    def brackets_its_rank(self) -> bool:
        """Whether the pass found the answer: the bracket holds the rank, and its keys all fit the
        buffer or are one key (heavily tied bf16 deltas: a bracket that is one key of many elements)."""
        complete = self.in_range <= len(self.collected) or self.low == self.high
        return complete and 1 <= self.rank - self.above <= self.in_range

    def key(self) -> RankedKey | None:
        """The exact key, or None when the bracket missed the rank or overflowed its buffer."""
        if not self.brackets_its_rank():
            return None
        if self.low == self.high:
            return RankedKey(self.low, self.above, self.in_range)
        position = self.rank - self.above  # descending rank among the collected keys
        index = self.in_range - position
        keys = self.collected[:self.in_range]
        keys.sort()  # in place (the buffer is not needed afterwards); see bracket() on partitions
        key = keys[index]
        # every key equal to it lies in the bracket, and every key above the bracket was counted
        first, stop = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        return RankedKey(int(key), self.above + int(len(keys) - stop), int(stop - first))


def bracketed_select(stream, ranks_per_model: list[list[int]]) -> list[dict[int, RankedKey]]:
    """Exact keys at descending ranks of every model's |x - b|, in one pass over the stream where a
    sample of its first chunk brackets them: a dict rank -> key per model. Ranks the sample could
    not bracket (small tensors, a bracket that missed or overflowed) are left out, for the caller's
    two-pass radix select, so the answer is exact either way."""
    backend = stream.backend
    capacity = max(SAMPLE_ELEMENTS, stream.chunk_elements // COLLECT_FRACTION)
    searches: list[BracketedSearch] = []  # grouped by model, as abs_delta_select wants them
    for chunk in stream.chunks():
        if chunk.start == 0:
            sampled = [index for index, ranks in enumerate(ranks_per_model) if ranks]
            samples = sample_keys(backend, chunk.base, [chunk.models[index] for index in sampled])
            for index, sample in zip(sampled, samples or ()):
                for rank in ranks_per_model[index]:
                    low, high = bracket(sample, rank, stream.context.numel)
                    searches.append(BracketedSearch(index, rank, low, high, np.empty(capacity, dtype=np.uint32)))
            if not searches:
                break
        counts = backend.abs_delta_select(chunk.base, [chunk.models[search.model] for search in searches],
                                          [(search.low, search.high) for search in searches],
                                          [search.free() for search in searches])
        for search, (above, in_range) in zip(searches, counts):
            search.above += above
            search.in_range += in_range
    found: list[dict[int, RankedKey]] = [{} for _ in ranks_per_model]
    for search in searches:
        key = search.key()
        if key is not None:
            found[search.model][search.rank] = key
    return found


@dataclass
class RadixSearch:
    """Finds the key at one descending rank (1-based) over streamed histograms."""

    rank: int
    bucket: int = -1  # high 16 bits of the answer, known after the first pass
    rank_in_bucket: int = 0
    answer: RankedKey | None = None  # known after the second pass

    def locate_bucket(self, high_histogram: np.ndarray) -> None:
        self.bucket, above = _from_top(high_histogram, self.rank)
        self.rank_in_bucket = self.rank - above

    @property
    def key(self) -> int:
        return self.answer.key

    def locate_key(self, low_histogram: np.ndarray) -> None:
        low, above_in_bucket = _from_top(low_histogram, self.rank_in_bucket)
        above = self.rank - self.rank_in_bucket + above_in_bucket
        self.answer = RankedKey((self.bucket << 16) | low, above, int(np.asarray(low_histogram)[low]))


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
