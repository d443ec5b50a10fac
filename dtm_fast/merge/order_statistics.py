"""Exact order statistics of a per-element fp32 statistic of a tensor, within the memory budget:
arcee_fusion's importance quantiles and sce's top-k variance.

The statistic is computed chunk by chunk into one scratch buffer (`fill(chunk, values)`), never held
for the whole tensor. Its fp32 values map to uint32 keys that order like them (`order_keys`: -0 as
+0, every NaN above +inf, where torch.sort and torch.topk place NaN), so the value at a rank is the
key at that rank. A whole-tensor stream (the reference) sorts the keys; a streamed tensor runs the
radix select of merge/magnitude.py: a 65536-bin histogram of the keys' high 16 bits locates the
bucket holding each rank, a histogram of the low 16 bits of that bucket's keys gives the exact key
(two passes). A top-k selection keeps exactly k elements; among elements tied at the k-th key it
keeps those of lowest flat index (a stable descending sort's choice), whose last index a third pass
finds, only when the k-th key's ties are split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from dtm_fast.merge.magnitude import RadixSearch, RankedKey, new_histogram
from dtm_fast.merge.specs import INDEX_END

if TYPE_CHECKING:
    import torch

    from dtm_fast.merge.chunk import Chunk

ZERO_KEY = 1 << 31  # the key of +0.0 (and of -0.0)
NO_KEY = 1 << 32  # above every key: a rule with it keeps nothing

Fill = Callable[["Chunk", object], None]  # writes the chunk's statistic into an F32 scratch array


def order_keys(values: "torch.Tensor") -> "torch.Tensor":
    """int64 keys in [0, 2^32) that order like the fp32 `values`, -0 as +0 and every NaN (x86's
    default NaN is negative) above +inf."""
    import torch

    values = values.float() + 0.0  # -0 + 0 = +0
    values = torch.where(torch.isnan(values), torch.full_like(values, float("nan")), values)
    bits = values.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + ZERO_KEY)  # negatives: larger magnitude, smaller key


def key_value(key: int) -> np.float32:
    """The fp32 value whose order key is `key`."""
    bits = key - ZERO_KEY if key >= ZERO_KEY else (1 << 32) - 1 - key
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


@dataclass(frozen=True)
class TopRule:
    """Which elements a top-k selection keeps: those whose key is above `key`, and those equal to it
    whose flat index is below `tie_stop`. The default keeps nothing (k = 0)."""

    key: int = NO_KEY
    tie_stop: int = 0

    def keeps(self, keys, index):
        """Boolean mask from the elements' order keys and flat indices (torch tensors)."""
        return (keys > self.key) | ((keys == self.key) & (index < self.tie_stop))


class Statistic:
    """A per-element fp32 statistic of a stream, in one scratch chunk: a tensor of one chunk (read
    once, held in its input slot) computes it once for all its passes."""

    def __init__(self, stream, fill: Fill):
        self.stream = stream
        self.fill = fill
        self.values = stream.backend.scratch("order_statistics.values", stream.chunk_elements, "F32")
        self._holds: int | None = None  # start of the chunk whose statistic the buffer holds

    def chunks(self, write: bool = False) -> Iterator[tuple["Chunk", object]]:
        """Each chunk of the stream with its statistic (an F32 backend array of chunk.count)."""
        for chunk in self.stream.chunks(write):
            values = self.values[:chunk.count]
            if self._holds != chunk.start:
                self.fill(chunk, values)
                self._holds = chunk.start
            yield chunk, values

    def whole_keys(self) -> "torch.Tensor":
        """The order keys of the whole tensor's statistic (a whole-tensor stream, whose reference
        backend computes on torch tensors)."""
        ((_, values),) = self.chunks()
        return order_keys(values)

    def histogram(self, count_zeros: bool = True) -> tuple[np.ndarray, int]:
        """Pass 1 of a radix select: the histogram of the keys' high 16 bits, and how many values are
        exactly zero (0 unless `count_zeros`: counting them reads the values once more)."""
        backend = self.stream.backend
        high, zeros = new_histogram(), 0
        for _, values in self.chunks():
            backend.order_key_histogram(values, high, None)
            if count_zeros:
                zeros += backend.order_key_position(values, ZERO_KEY, 0)[0]
        return high, zeros

    def keys_at(self, ranks: list[int], high: np.ndarray) -> dict[int, RankedKey]:
        """Pass 2: the keys at descending ranks (1-based), from pass 1's histogram."""
        searches = [RadixSearch(rank) for rank in ranks]
        buckets: dict[int, np.ndarray] = {}
        for search in searches:
            search.locate_bucket(high)
            buckets.setdefault(search.bucket, new_histogram())
        for _, values in self.chunks():
            for bucket, histogram in buckets.items():
                self.stream.backend.order_key_histogram(values, histogram, bucket)
        for search in searches:
            search.locate_key(buckets[search.bucket])
        return {search.rank: search.answer for search in searches}

    def tie_position(self, key: int, nth: int) -> int:
        """Pass 3: the flat index of the nth element (1-based, in index order) whose key is `key`."""
        before = 0
        for chunk, values in self.chunks():
            count, position = self.stream.backend.order_key_position(values, key, nth - before)
            if position >= 0:
                return chunk.start + position
            before += count
        raise RuntimeError(f"tensor {self.stream.context.name!r}: fewer elements tied at key {key} than counted")


def ascending_values(statistic: Statistic, positions: list[int]) -> list[np.float32]:
    """The statistic's values at 0-based positions of its ascending sort (torch.sort(...)[position])."""
    numel = statistic.stream.context.numel
    if statistic.stream.holds_whole_tensor:  # the definition: a full sort
        import torch

        ordered = torch.sort(statistic.whole_keys()).values
        return [key_value(int(ordered[position])) for position in positions]
    high, _ = statistic.histogram(count_zeros=False)
    found = statistic.keys_at(sorted({numel - p for p in positions}), high)  # descending rank n - position
    return [key_value(found[numel - position].key) for position in positions]


def top_rule(statistic: Statistic, kept_count: Callable[[int], int]) -> TopRule:
    """The rule keeping the k elements of largest statistic, k = kept_count(how many are nonzero),
    ties at the k-th value by lowest flat index."""
    numel = statistic.stream.context.numel
    if statistic.stream.holds_whole_tensor:  # the definition: a stable descending sort, its first k
        import torch

        keys = statistic.whole_keys()
        count = kept_count(numel - int((keys == ZERO_KEY).sum()))
        if count <= 0:
            return TopRule()
        last = int(torch.sort(keys, descending=True, stable=True).indices[min(count, numel) - 1])
        return TopRule(int(keys[last]), last + 1)
    high, zeros = statistic.histogram()
    count = min(kept_count(numel - zeros), numel)
    if count <= 0:
        return TopRule()
    kth = statistic.keys_at([count], high)[count]
    if kth.above + kth.ties <= count:
        return TopRule(kth.key, INDEX_END)  # every tied element is kept
    return TopRule(kth.key, statistic.tie_position(kth.key, count - kth.above) + 1)
