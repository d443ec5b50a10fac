"""TIES and breadcrumbs with mergekit's `rescale: l1` in two reads of each input, whatever the
tensor's size: one pass finds the thresholds and the L1 sums together, then the combine.

Each model's kept deltas are scaled by sum |d| / (sum of the kept |d|) over the whole tensor, so no
output element is known before a full pass. That pass is the one-read path's counting pass
(merge/one_read.py): a sample of the first chunk brackets each threshold, every chunk counts the
keys above and inside each bracket and keeps aside the elements inside one (bounded in memory,
spilled to a scratch file past that). Every key between a model's brackets is kept and every key
outside them dropped whatever the exact thresholds are, so each chunk also adds its sum |d| and its
sum over the keys between the brackets (backend.masked_l1, on the chunk already in memory). Once
the pass is over, the kept-aside keys fix the thresholds and their tie positions exactly, and their
kept values complete the sums. A key is the bit pattern of the fp32 |d|, so the sums are exact
double sums of the same values the reference adds, in another order.

Where that pass cannot decide (a bracket misses its rank, brackets overlap, too many undecided
elements in a chunk), `bounds_then_sums` takes the thresholds by the multi-pass search and the sums
in a pass of their own; the elements tied at a bound are all equal, so the sum needs only how many
of them the band keeps, not which.
"""

from __future__ import annotations

import numpy as np

from dtm_fast.merge.bands import EMPTY, Band, Bounds, find_bounds
from dtm_fast.merge.kept_aside import KeptAside, directory_of, widen
from dtm_fast.merge.magnitude import SAMPLE_ELEMENTS
from dtm_fast.merge.one_read import (UNDECIDED_FRACTION, Search, count_undecided, exact_keys, final_rules, keep_mask,
                                     sampled_searches)
from dtm_fast.merge.specs import NO_UPPER_KEY, Sparsify

Sums = list[tuple[float, float]]  # per model: (sum |d|, sum of the kept |d|)


def between(low_exclusive: int, high_exclusive: int | None) -> Sparsify:
    """The band rule keeping the keys strictly between two keys (no upper bound: None)."""
    low = low_exclusive + 1
    high = NO_UPPER_KEY if high_exclusive is None else high_exclusive - 1
    return EMPTY if low > NO_UPPER_KEY or low > high else Sparsify(kind="band", low_key=low, high_key=high)


def thresholds_and_sums(stream, bands: list[Band | None], keep_all_ties: bool) -> tuple[list[Sparsify], Sums] | None:
    """The final rule of every model and the L1 sums, from one read of each input; None when the
    caller must take the multi-pass path (nothing has been written)."""
    backend, numel = stream.backend, stream.context.numel
    dtypes = [entry.dtype for entry in stream._entries()]
    capacity = max(SAMPLE_ELEMENTS, stream.chunk_elements // UNDECIDED_FRACTION)
    kept = KeptAside(dtypes, capacity * 8, directory_of(stream.out_fd))
    sums = [[0.0, 0.0] for _ in bands]
    try:
        searches: list[Search] = []
        between_brackets: list[Sparsify | None] | None = None
        for chunk in stream.chunks():
            if between_brackets is None:
                searches = sampled_searches(backend, chunk, bands, numel)
                between_brackets = [_between_brackets(index, band, searches) for index, band in enumerate(bands)]
                if any(rule is False for rule in between_brackets):
                    return None  # overlapping brackets: the keys between them are not all kept
            local = count_undecided(backend, chunk, searches, capacity)
            if local is None:
                return None
            add_l1_sums(backend, chunk, between_brackets, sums)
            kept.add(chunk.start, local, chunk.inputs_raw)
        keys = exact_keys(kept, dtypes, searches)
        if keys is None:
            return None
        rules = final_rules(kept, dtypes, bands, keep_all_ties, keys)
        for flat, arrays in kept.parts():
            base = widen(arrays[0], dtypes[0])
            for index, rule in enumerate(rules):
                mine = [s for s in searches if s.model == index]
                if not mine:
                    continue
                magnitudes = np.abs(widen(arrays[1 + index], dtypes[1 + index]) - base)
                model_keys = magnitudes.view(np.uint32)
                inside = np.zeros(len(flat), dtype=bool)  # this model's own undecided elements
                for search in mine:
                    inside |= (model_keys >= search.low) & (model_keys <= search.high)
                chosen = inside & keep_mask(model_keys, flat, rule)
                sums[index][1] += float(magnitudes[chosen].sum(dtype=np.float64))
        return rules, [tuple(s) for s in sums]
    finally:
        kept.close()


def add_l1_sums(backend, chunk, rules: list[Sparsify | None], sums: list[list[float]]) -> None:
    """Add each model's Σ|d| over the chunk and over the elements its rule keeps (None: no sums)."""
    for index, rule in enumerate(rules):
        if rule is not None:
            total, kept = backend.masked_l1(chunk.base, chunk.models[index], rule, chunk.start)
            sums[index][0] += total
            sums[index][1] += kept


def _between_brackets(index: int, band: Band | None, searches: list[Search]) -> Sparsify | None | bool:
    """The rule keeping the keys between a model's brackets (None without a band; False when its
    brackets overlap)."""
    if band is None or band.last < band.first:
        return None
    mine = {s.rank: s for s in searches if s.model == index}
    last, first = mine[band.last], mine.get(band.first) if band.first > 1 else None
    if first is not None and first.low <= last.high:
        return False
    return between(last.high, first.low if first is not None else None)


def tied_kept(band: Band, bound, keep_all_ties: bool) -> int:
    """How many of the elements tied at `bound` (a RankedKey) the band keeps."""
    if keep_all_ties:
        return bound.ties
    return max(0, min(band.last, bound.above + bound.ties) - max(band.first, bound.above + 1) + 1)


def key_value(key: int) -> float:
    """The |d| whose fp32 bit pattern is `key`."""
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


def bounds_then_sums(stream, bands: list[Band | None], keep_all_ties: bool) -> tuple[list[Bounds | None], Sums]:
    """The exact bounds (magnitude.py's multi-pass search), then the L1 sums in a pass of their own:
    the keys strictly between the bounds by masked_l1, the elements tied at a bound by count."""
    bounds = find_bounds(stream, bands)
    rules = [None if bound is None else between(bound.low.key, bound.high.key if bound.high is not None else None)
             for bound in bounds]
    sums = [[0.0, 0.0] for _ in bands]
    for chunk in stream.chunks():
        add_l1_sums(stream.backend, chunk, rules, sums)
    for index, (band, bound) in enumerate(zip(bands, bounds)):
        if bound is not None:
            low, high = bound.low, bound.high
            sums[index][1] += tied_kept(band, low, keep_all_ties) * key_value(low.key)
            if high is not None and high.key != low.key:
                sums[index][1] += tied_kept(band, high, keep_all_ties) * key_value(high.key)
    return bounds, [tuple(s) for s in sums]
