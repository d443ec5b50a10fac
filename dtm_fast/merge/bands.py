"""The kept band of each model's task vector for TIES and breadcrumbs, exactly, from one stream.

A band is a range of descending magnitude ranks [first, last]: TIES keeps [1, k], breadcrumbs drops
the largest gamma fraction and keeps the next density fraction. Its bounds are the keys at ranks
`first` and `last` (merge/magnitude.py finds them: one bracketed pass, two radix passes where the
bracket fails, a full sort on whole tensors). Elements tied with a bound are kept by flat index,
as a stable sort orders them, so exactly last - first + 1 elements are kept (mergekit's rule, whose
argsort keeps the same elements on its tests; on large tensors torch's unstable sort may pick other
elements of equal magnitude):
  TIES ("ascending" ties): among elements tied at the threshold, the lowest indices are kept;
  breadcrumbs ("descending"): its ascending sort keeps the highest-index ties at the lower bound
  and the lowest-index ties at the upper bound.
The index where ties stop being kept is found during the combine itself (`ChunkRules`): the
running count of tied keys (`abs_delta_key_position` on each chunk, only for a bound that splits its
ties) reaches the wanted ordinal in some chunk, and every chunk before it keeps (or drops) all of its
tied elements, so no pass of its own is needed. `threshold_ties: all` keeps every tied element
instead (more than k when magnitudes repeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dtm_fast.merge.magnitude import RadixSearch, RankedKey, bracketed_select, new_histogram, sorted_select
from dtm_fast.merge.specs import INDEX_END, NO_UPPER_KEY, Sparsify

EMPTY = Sparsify(kind="band", low_key=NO_UPPER_KEY, high_key=-1)  # keeps nothing


@dataclass(frozen=True)
class Band:
    first: int  # descending ranks kept, 1-based, inclusive
    last: int
    tie_order: str  # "ascending" or "descending": the flat-index order in which tied elements are ranked


@dataclass(frozen=True)
class Bounds:
    """The keys at a band's last and first ranks (high is None for a band that starts at rank 1)."""

    low: RankedKey
    high: RankedKey | None


def wanted_ranks(band: Band | None) -> list[int]:
    """The descending ranks whose keys bound `band` (rank 1 as an upper bound needs no search:
    nothing lies above it; as the lower bound it does)."""
    return [] if band is None or band.last < band.first else sorted(({band.first} - {1}) | {band.last})


def find_bounds(stream, bands: list[Band | None]) -> list[Bounds | None]:
    """The keys bounding each model's band (None for a model without one, or an empty band)."""
    wanted = [wanted_ranks(band) for band in bands]
    found = select(stream, wanted) if any(wanted) else [{} for _ in bands]
    return [Bounds(found[index][band.last], found[index][band.first] if band.first > 1 else None)
            if ranks else None for index, (band, ranks) in enumerate(zip(bands, wanted))]


class ChunkRules:
    """Each model's rule for the chunks of a combine pass, in order. Where a bound splits its ties,
    the flat index of the wanted tied element is found in the chunk where the running count of tied
    keys reaches it; until then a chunk's tied elements all lie on one side of it, which the rule
    for that chunk says by an index range that ends (or starts) past the tensor."""

    def __init__(self, stream, bands: list[Band | None], bounds: list[Bounds | None], keep_all_ties: bool):
        self.backend, self.numel = stream.backend, stream.context.numel
        self.bands, self.bounds, self.keep_all_ties = bands, bounds, keep_all_ties
        self.ties: dict[tuple[int, int], _TieCount] = {}

    def for_chunk(self, chunk) -> list[Sparsify]:
        def rule(index: int, band: Band) -> Sparsify:
            def locate(key: int, ordinals: list[int]) -> dict[int, int]:
                count = self.ties.setdefault((index, key), _TieCount(sorted(set(ordinals))))
                return count.through(self.backend, chunk, index, key, self.numel)
            bounds = self.bounds[index]
            return band_rule(band, bounds.low, bounds.high, self.keep_all_ties, locate)

        return per_band(self.bands, rule)


def per_band(bands: list[Band | None], rule) -> list[Sparsify]:
    """Each model's rule: keep all without a band, nothing for an empty one, else rule(index, band)."""
    return [Sparsify() if band is None else EMPTY if band.last < band.first else rule(index, band)
            for index, band in enumerate(bands)]


@dataclass
class _TieCount:
    """Where the wanted ordinals of the elements tied at one key lie, chunk by chunk."""

    pending: list[int]
    before: int = 0  # tied elements in the chunks counted so far
    counted_through: int = -1  # start of the last chunk counted
    found: dict[int, int] = field(default_factory=dict)

    def through(self, backend, chunk, model: int, key: int, numel: int) -> dict[int, int]:
        """The flat indices of the wanted ordinals that lie in this chunk or an earlier one."""
        if self.pending and chunk.start > self.counted_through:
            self.counted_through = chunk.start
            count = 0
            while self.pending:
                count, position = backend.abs_delta_key_position(chunk.base, chunk.models[model], key,
                                                                 self.pending[0] - self.before)
                if position < 0:
                    break
                self.found[self.pending.pop(0)] = chunk.start + position
            self.before += count
            if self.pending and chunk.start + chunk.count >= numel:
                raise RuntimeError(f"fewer elements tied at key {key} than counted")
        return self.found


def select(stream, wanted: list[list[int]]) -> list[dict[int, RankedKey]]:
    """The keys at the wanted descending ranks of every model: sorted on a whole tensor, else one
    bracketed pass, then two radix passes for the ranks its brackets missed."""
    if stream.holds_whole_tensor:
        return sorted_select(stream, wanted)
    found = bracketed_select(stream, wanted)
    missing = [[rank for rank in ranks if rank not in found[index]] for index, ranks in enumerate(wanted)]
    if any(missing):
        for index, keys in enumerate(radix_select(stream, missing)):
            found[index].update(keys)
    return found


def band_rule(band: Band, low: RankedKey, high: RankedKey | None, keep_all_ties: bool, locate) -> Sparsify:
    """The rule keeping `band` given the keys at its bounds; `locate(key, ordinals)` gives the flat
    index of the n-th element tied at `key`, for each n (a pass over the stream, or the one-read
    path's kept-aside positions)."""
    rule = Sparsify(kind="band", low_key=low.key, high_key=high.key if high is not None else NO_UPPER_KEY)
    if keep_all_ties:
        return rule
    low_range = _tie_range(band, low, locate)
    if high is None:
        return Sparsify(rule.kind, rule.low_key, rule.high_key, low_from=low_range[0], low_to=low_range[1])
    high_range = low_range if high.key == low.key else _tie_range(band, high, locate)
    return Sparsify(rule.kind, rule.low_key, rule.high_key, low_from=low_range[0], low_to=low_range[1],
                    high_from=high_range[0], high_to=high_range[1])


def _tie_range(band: Band, bound: RankedKey, locate) -> tuple[int, int]:
    """[from, to) of flat indices of the elements tied at `bound` that lie inside the band."""
    group_first = bound.above + 1  # the tied elements take descending ranks group_first ..
    group_last = bound.above + bound.ties
    first = max(band.first, group_first) - group_first + 1  # their ordinals in tie order
    last = min(band.last, group_last) - group_first + 1
    if band.tie_order == "descending":
        first, last = bound.ties - last + 1, bound.ties - first + 1
    if first <= 1 and last >= bound.ties:
        return 0, INDEX_END  # every tied element is kept
    needed = ([first] if first > 1 else []) + ([last] if last < bound.ties else [])
    positions = locate(bound.key, needed)  # an ordinal not located yet lies past every index so far
    start = positions.get(first, INDEX_END) if first > 1 else 0
    stop = positions[last] + 1 if last < bound.ties and last in positions else INDEX_END
    return start, stop


def radix_select(stream, ranks_per_model: list[list[int]]) -> list[dict[int, RankedKey]]:
    """Keys at descending ranks per model with two radix-select passes over the stream."""
    backend = stream.backend
    searches = [[RadixSearch(rank) for rank in ranks] for ranks in ranks_per_model]
    high = [new_histogram() for _ in searches]
    for chunk in stream.chunks():
        for index, model in enumerate(chunk.models):
            if searches[index]:
                backend.abs_delta_histogram(chunk.base, model, high[index], None)
    buckets = {}
    for index, model_searches in enumerate(searches):
        for search in model_searches:
            search.locate_bucket(high[index])
            buckets.setdefault((index, search.bucket), new_histogram())
    for chunk in stream.chunks():
        for (index, bucket), histogram in buckets.items():
            backend.abs_delta_histogram(chunk.base, chunk.models[index], histogram, bucket)
    found = []
    for index, model_searches in enumerate(searches):
        for search in model_searches:
            search.locate_key(buckets[(index, search.bucket)])
        found.append({search.rank: search.answer for search in model_searches})
    return found
