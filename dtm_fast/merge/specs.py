"""The per-model rules a generalised task arithmetic combine applies, as plain values: what every
backend's `gta` operation takes (no torch here, so the native path never imports it)."""

from __future__ import annotations

from dataclasses import dataclass

NO_UPPER_KEY = (1 << 31) - 1  # above every magnitude key, NaN included
INDEX_END = (1 << 63) - 1  # past every element index: a tie range that keeps every tied element


@dataclass(frozen=True)
class Sparsify:
    """How one model's deltas are thinned before they are combined.

    kind "none": keep all; "band": keep low_key <= key(|d|) <= high_key (TIES: high_key is
    NO_UPPER_KEY; breadcrumbs: both bounds), where an element whose key equals low_key (high_key)
    is kept only if its flat index lies in [low_from, low_to) ([high_from, high_to)): how an
    exactly-k threshold keeps some of the elements tied at it; "random": keep where the Philox draw
    is below `threshold` (DARE). Kept deltas are multiplied by `scale` (DARE's rescale)."""

    kind: str = "none"
    low_key: int = 0
    high_key: int = NO_UPPER_KEY
    philox_key: tuple[int, int] = (0, 0)
    threshold: int = 1 << 24
    scale: float = 1.0
    low_from: int = 0
    low_to: int = INDEX_END
    high_from: int = 0
    high_to: int = INDEX_END

    def band_keeps(self, keys, index):
        """Which elements a "band" rule keeps, from their magnitude keys and flat indices: numpy
        arrays or torch tensors alike (the reference and the one-read patching share this)."""
        if self.high_key < 0 or self.low_key > self.high_key:
            return keys != keys  # an empty band: nothing (and no negative bound against unsigned keys)
        low_ok = (keys > self.low_key) | ((keys == self.low_key) & (index >= self.low_from) & (index < self.low_to))
        high_ok = (keys < self.high_key) | ((keys == self.high_key) & (index >= self.high_from) & (index < self.high_to))
        return low_ok & high_ok


@dataclass(frozen=True)
class GtaSpec:
    """Generalised task arithmetic: y = b + lambda * combine_i(w_i * sparsify_i(x_i - b))."""

    weights: tuple[float, ...]
    sparsify: tuple[Sparsify, ...]
    consensus: str | None  # None, "sum" (TIES) or "count"
    normalize: bool
    lambda_: float
