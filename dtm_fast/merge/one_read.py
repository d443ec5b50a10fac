"""TIES and breadcrumbs (without L1 rescale) in one read of each input, whatever the tensor's size.

The exact thresholds are the keys at fixed descending ranks of each model's |x - b| (merge/bands.py).
A sample of the first chunk brackets each of them (magnitude.bracket); then ONE pass over the tensor
  * counts, per search, the keys above its bracket and inside it (`abs_delta_undecided`),
  * lists the positions where some model's key lies inside one of its brackets: the undecided
    elements (a few percent, by construction of the bracket),
  * combines every chunk with provisional rules (keep above the bracket, drop below it), which are
    the final decisions everywhere but at the undecided positions, and writes it,
  * keeps the undecided elements aside: positions and every input's bytes there (merge/kept_aside.py,
    bounded in memory, spilled to an unnamed scratch file beside the output past that).
Once the pass is over, the counts fix each threshold exactly: the rank's key is selected among the
kept-aside keys (every key inside a bracket was kept aside), ties at it are located among their
positions; the undecided elements are combined again with the final rules and written over the
provisional values with positioned writes. The result is bit-identical to the reference: the same
combine (backend.gta) on the same widened values, a dropped delta given as x = b, whose delta is the
+0 the reference's mask gives.

When a bracket misses its rank or the kept-aside positions overflow their buffer (or a dropped
element has a non-finite base), the caller falls back to the exact multi-pass path, which rewrites
the whole tensor: slower, never wrong.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from dtm_fast.merge.bands import Band, band_rule, per_band, wanted_ranks
from dtm_fast.merge.kept_aside import KeptAside, directory_of, patch, widen
from dtm_fast.merge import magnitude
from dtm_fast.merge.magnitude import BINS, SAMPLE_ELEMENTS, RankedKey, _from_top, sample_keys
from dtm_fast.merge.specs import NO_UPPER_KEY, Sparsify

# Undecided positions one chunk may have: a quarter of it (int64s: 2 bytes per chunk element), and
# as much again of kept-aside elements held in memory before they spill; the method budgets both
# (STATISTICS_BYTES_PER_ELEMENT). A 4-sigma bracket holds ~1.1% of the elements per search at
# density 0.5, but bf16 fine-tunes whose deltas take few distinct values tie so much that a bracket
# is one key holding several percent: 11% (TIES) to 17% (breadcrumbs) of the elements of the tests'
# and the benchmark's synthetic fine-tunes are undecided.
UNDECIDED_FRACTION = 4
STATISTICS_BYTES_PER_ELEMENT = 2 * 8 / UNDECIDED_FRACTION


@dataclass
class Search:
    model: int
    rank: int
    low: int
    high: int
    above: int = 0
    in_range: int = 0


def applies(stream, bands: list[Band | None]) -> bool:
    """One read is possible, and it saves reads: a tensor streamed in several chunks whose first is
    large enough for a sample. A tensor held in one chunk is read once whatever the number of passes
    (its chunk stays in its input slot), and there the exact thresholds from the chunk in memory
    cost less than keeping the undecided elements aside (11-17% of them with tied bf16 deltas)."""
    return (not stream.holds_whole_tensor and stream.context.numel > stream.chunk_elements >= 4 * SAMPLE_ELEMENTS
            and stream.base_entry is not None and stream.out_fd is not None
            and any(b is not None and b.last >= b.first for b in bands))


def provisional(bands: list[Band | None], searches: list[Search]) -> list[Sparsify]:
    """Rules that decide every element outside the brackets as the final rules will."""
    def rule(index: int, band: Band) -> Sparsify:
        mine = {s.rank: s for s in searches if s.model == index}
        high = mine[band.first].high if band.first > 1 else NO_UPPER_KEY
        return Sparsify(kind="band", low_key=mine[band.last].low, high_key=high)

    return per_band(bands, rule)


def undecided(backend, chunk, searches: list[Search], capacity: int) -> tuple[list[tuple[int, int]], np.ndarray, int]:
    """Per search (above, in range), the ascending undecided positions (up to `capacity`), and how
    many there were: the native kernel when the backend has it, else the same in torch."""
    from dtm_fast.merge.backends import native

    models = [chunk.models[s.model] for s in searches]
    lib = native.library() if getattr(backend, "name", "") == "cpu" else None
    if lib is not None and hasattr(lib, "dtm_abs_delta_undecided") and native.supported([chunk.base, *models]):
        inputs = native.KernelInputs([chunk.base, *models])
        count, num = inputs.count(None, "abs_delta_undecided"), max(1, len(searches))
        lows = (ctypes.c_int32 * num)(*[s.low for s in searches])
        highs = (ctypes.c_int32 * num)(*[s.high for s in searches])
        above, in_range, total = (ctypes.c_int64 * num)(), (ctypes.c_int64 * num)(), ctypes.c_int64()
        positions = np.empty(capacity, dtype=np.int64)
        native.check(lib.dtm_abs_delta_undecided(inputs.addresses[0], inputs.pointers(1), inputs.code, len(searches),
                                                 count, lows, highs, above, in_range, positions.ctypes.data, capacity,
                                                 ctypes.byref(total)), "abs_delta_undecided")
        found = min(capacity, total.value)
        return [(above[i], in_range[i]) for i in range(len(searches))], positions[:found], total.value
    from dtm_fast.merge.backends.native import as_torch
    from dtm_fast.merge.magnitude import magnitude_keys

    base = as_torch(chunk.base).float()
    inside = None
    counts = []
    for model, search in zip(models, searches):
        keys = magnitude_keys(as_torch(model).float() - base)
        flags = (keys >= search.low) & (keys <= search.high)
        counts.append((int((keys > search.high).sum()), int(flags.sum())))
        inside = flags if inside is None else inside | flags
    positions = inside.nonzero().reshape(-1).cpu().numpy().astype(np.int64)
    return counts, positions[:capacity], len(positions)


def sampled_searches(backend, chunk, bands: list[Band | None], numel: int) -> list[Search]:
    """A search per bounding rank of every band, bracketed by a sample of this (first) chunk."""
    wanted = [wanted_ranks(band) for band in bands]
    sampled = [index for index, ranks in enumerate(wanted) if ranks]
    samples = sample_keys(backend, chunk.base, [chunk.models[index] for index in sampled])
    return [Search(index, rank, *magnitude.bracket(sample, rank, numel))
            for index, sample in zip(sampled, samples) for rank in wanted[index]]


def count_undecided(backend, chunk, searches: list[Search], capacity: int) -> np.ndarray | None:
    """Adds this chunk's counts to every search; its undecided positions, or None past `capacity`."""
    counts, local, total = undecided(backend, chunk, searches, capacity)
    if total > capacity:
        return None
    for search, (above, in_range) in zip(searches, counts):
        search.above += above
        search.in_range += in_range
    return local


def merge_bands(stream, bands: list[Band | None], keep_all_ties: bool, make_spec) -> bool:
    """Merge the stream's tensor in one read (see the module); False when the caller must merge it
    again by the exact multi-pass path (the output written so far is then overwritten)."""
    backend, numel = stream.backend, stream.context.numel
    dtypes = [entry.dtype for entry in stream._entries()]
    capacity = max(SAMPLE_ELEMENTS, stream.chunk_elements // UNDECIDED_FRACTION)
    kept = KeptAside(dtypes, capacity * 8, directory_of(stream.out_fd))
    try:
        searches: list[Search] = []
        spec = None
        for chunk in stream.chunks(write=True):
            if spec is None:
                searches = sampled_searches(backend, chunk, bands, numel)
                spec = make_spec(provisional(bands, searches))
            local = count_undecided(backend, chunk, searches, capacity)
            if local is None:
                return False
            backend.gta(chunk.out, chunk.base, chunk.models, spec, chunk.start)
            kept.add(chunk.start, local, chunk.inputs_raw)
            if chunk.start + chunk.count == numel:  # the last chunk: its output is still in memory
                keys = exact_keys(kept, dtypes, searches)
                if keys is None:
                    return False
                rules = final_rules(kept, dtypes, bands, keep_all_ties, keys)
                stream.io.flush()  # the earlier chunks' provisional output is on file before it is patched
                if not patch_undecided(stream, kept, dtypes, rules, make_spec, chunk):
                    return False
        return True
    finally:
        kept.close()


def model_keys(arrays: list[np.ndarray], dtypes: list[str], models) -> dict[int, np.ndarray]:
    """|x - b| keys (uint32) of the given models on a kept-aside part."""
    base = widen(arrays[0], dtypes[0])
    return {model: np.abs(widen(arrays[1 + model], dtypes[1 + model]) - base).view(np.uint32) for model in models}


NARROW_BRACKET = 1 << 20  # keys a bracket may span to be counted key by key (8 MiB of int64 counts)


class _Counts:
    """Counts of bin indices, added in batches: a bincount per kept-aside part (thousands of small
    parts) would allocate and add the whole count array for each."""

    BATCH = 1 << 20  # indices held before they are counted (4 MiB of uint32 per search)

    def __init__(self, bins: int):
        self.counts = np.zeros(bins, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.held = 0

    def add(self, indices: np.ndarray) -> None:
        self.pending.append(indices)
        self.held += len(indices)
        if self.held >= self.BATCH:
            self.total()

    def total(self) -> np.ndarray:
        if self.pending:
            self.counts += np.bincount(np.concatenate(self.pending), minlength=len(self.counts))
            self.pending, self.held = [], 0
        return self.counts


def exact_keys(kept: KeptAside, dtypes: list[str], searches: list[Search]) -> dict | None:
    """(model, rank) -> RankedKey for every search, from the kept-aside keys inside its bracket: a
    bracket of one key needs no pass (every key in it is the answer; heavily tied bf16 deltas give
    many); a narrow one (fewer than NARROW_BRACKET keys: the usual case) is counted key by key in
    one pass over them; a wide one by a radix select on 16-bit halves, two passes. None when a
    bracket missed its rank."""
    if any(not 1 <= s.rank - s.above <= s.in_range for s in searches):
        return None
    found = {(s.model, s.rank): RankedKey(s.low, s.above, s.in_range) for s in searches if s.low == s.high}
    narrow = [i for i, s in enumerate(searches) if 0 < s.high - s.low < NARROW_BRACKET]
    wide = [i for i, s in enumerate(searches) if s.high - s.low >= NARROW_BRACKET]
    counts = {i: _Counts(searches[i].high - searches[i].low + 1) for i in narrow}
    counts.update({i: _Counts(BINS) for i in wide})
    buckets: dict[int, int] = {}

    def accumulate(which: list[int]) -> None:
        """Each narrow bracket's keys counted one by one; a wide one's high 16 bits while its bucket is
        unknown, then the low 16 bits of its keys in that bucket."""
        for _, arrays in kept.parts():
            keys = model_keys(arrays, dtypes, sorted({searches[i].model for i in which}))
            for i in which:
                key = keys[searches[i].model]
                key = key[(key >= searches[i].low) & (key <= searches[i].high)]
                if i in narrow:
                    counts[i].add(key - np.uint32(searches[i].low))
                elif i not in buckets:
                    counts[i].add(key >> 16)
                else:
                    counts[i].add(key[(key >> 16) == buckets[i]] & 0xFFFF)

    if narrow or wide:
        accumulate(narrow + wide)
    ranks = {i: searches[i].rank - searches[i].above for i in narrow + wide}  # descending, in the bracket
    for i in wide:
        buckets[i], above = _from_top(counts[i].total(), ranks[i])
        ranks[i] -= above  # now among the keys of its bucket
        counts[i] = _Counts(BINS)
    if wide:
        accumulate(wide)
    for i in narrow:
        search, histogram = searches[i], counts[i].total()
        offset, above = _from_top(histogram, ranks[i])
        found[(search.model, search.rank)] = RankedKey(search.low + offset, search.above + above, int(histogram[offset]))
    for i in wide:
        search, histogram = searches[i], counts[i].total()
        bin_, above_in_bucket = _from_top(histogram, ranks[i])
        found[(search.model, search.rank)] = RankedKey((buckets[i] << 16) | bin_, search.rank - ranks[i] + above_in_bucket,
                                                       int(histogram[bin_]))
    return found


def final_rules(kept: KeptAside, dtypes: list[str], bands: list[Band | None], keep_all_ties: bool,
                keys: dict) -> list[Sparsify]:
    def locate(model: int):
        def positions(key: int, ordinals: list[int]) -> dict[int, int]:
            pending, found, before = sorted(set(ordinals)), {}, 0
            for flat, arrays in kept.parts():
                tied = flat[model_keys(arrays, dtypes, [model])[model] == key]
                while pending and pending[0] <= before + len(tied):
                    ordinal = pending.pop(0)
                    found[ordinal] = int(tied[ordinal - before - 1])
                before += len(tied)
            if pending:
                raise RuntimeError(f"fewer elements tied at key {key} than counted")
            return found
        return positions

    def rule(index: int, band: Band) -> Sparsify:
        high = keys[(index, band.first)] if band.first > 1 else None
        return band_rule(band, keys[(index, band.last)], high, keep_all_ties, locate(index))

    return per_band(bands, rule)


def keep_mask(keys: np.ndarray, flat: np.ndarray, rule: Sparsify) -> np.ndarray:
    """As the reference's keep_mask for 'none' and 'band' rules, on kept-aside keys (uint32)."""
    if rule.kind == "none":
        return np.ones(len(keys), dtype=bool)
    return rule.band_keeps(keys, flat)


def patch_undecided(stream, kept: KeptAside, dtypes: list[str], rules: list[Sparsify], make_spec, last) -> bool:
    """Combine the kept-aside elements with the final rules and write them over the provisional
    ones: into the output buffer of the `last` chunk (not written yet) for its own elements, with
    positioned writes into the output file for the earlier chunks' (written: the pass is over)."""
    from dtm_fast.io.safetensors_format import DTYPE_SIZES

    backend, out_size = stream.backend, DTYPE_SIZES[stream.out_dtype]
    spec = make_spec([Sparsify() for _ in rules])  # the final decisions are applied to the inputs
    # the output slot the last chunk does not use is free: every earlier write is done
    block = next(b for b in stream.buffers.outputs if not np.shares_memory(b, last.out_raw))
    in_last = last.out_raw.view(np.dtype(f"u{out_size}"))
    for flat, arrays in kept.parts():
        base = widen(arrays[0], dtypes[0])
        nonfinite = ~np.isfinite(base)
        models = []
        for index, rule in enumerate(rules):
            model = widen(arrays[1 + index], dtypes[1 + index])
            dropped = ~keep_mask(np.abs(model - base).view(np.uint32), flat, rule)
            if (dropped & nonfinite).any():
                return False  # x = b would not give a zero delta there
            models.append(backend.view(np.where(dropped, base, model).view(np.uint8), "F32"))
        out_raw = np.empty(len(flat) * out_size, dtype=np.uint8)
        backend.gta(backend.view(out_raw, stream.out_dtype), backend.view(base.view(np.uint8), "F32"), models, spec, 0)
        values = out_raw.view(np.dtype(f"u{out_size}"))
        split = int(np.searchsorted(flat, last.start, "left"))
        if split:
            patch(stream.out_fd, stream.out_offset, out_size, flat[:split], values[:split], block)
        in_last[flat[split:] - last.start] = values[split:]
    return True
