"""Random dispersal: a seeded shuffle dealt round-robin, so portion sizes differ by at most one.

The shuffle order comes from SplitMix64 of (seed, record index) rather than a library RNG stream,
so the same seed gives the same portions on every numpy version and platform.
"""

from __future__ import annotations

import numpy as np

from dtm_fast.disperse.methods.assignment import Assignment
from dtm_fast.errors import DtmError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser applied elementwise to uint64 values (wrapping arithmetic)."""
    z = values.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def seeded_order(count: int, seed: int) -> np.ndarray:
    """A permutation of range(count) determined only by `seed`."""
    with np.errstate(over="ignore"):
        keys = splitmix64(np.arange(count, dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    return np.argsort(keys, kind="stable")


def assign(conversations, config):
    count = len(conversations)
    if config.k > count:
        raise DtmError(f"disperse: K = {config.k} portions but only {count} records; lower K")
    portion = np.empty(count, dtype=np.int64)
    portion[seeded_order(count, config.seed)] = np.arange(count) % config.k
    return Assignment(portion.tolist())
