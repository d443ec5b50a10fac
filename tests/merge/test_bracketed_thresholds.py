"""TIES / breadcrumbs thresholds on tensors large enough to be sampled but held in one chunk (the
one-read merge, merge/one_read.py, is for tensors of several chunks: tests/merge/test_one_read.py):
the bracketed search (merge/magnitude.py) on the chunk in memory must give exactly the thresholds of
a full sort, whether the sampled bracket holds the rank, misses it, or overflows its buffer (then
the radix select answers)."""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import BIG_SHAPE, load_state
from dtm_fast.merge import magnitude, one_read
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext


@pytest.fixture
def outcomes(monkeypatch):
    """How each bracketed search ended: hit, miss or overflow."""
    seen = collections.Counter()
    original = magnitude.BracketedSearch.key

    def key(self):
        position = self.rank - self.above
        seen["overflow" if self.in_range > len(self.collected)
             else "hit" if 1 <= position <= self.in_range else "miss"] += 1
        return original(self)

    monkeypatch.setattr(magnitude.BracketedSearch, "key", key)
    merge_bands = one_read.merge_bands

    def counted(*args):
        done = merge_bands(*args)
        seen["one_read" if done else "one_read_fallback"] += 1
        return done

    monkeypatch.setattr(one_read, "merge_bands", counted)
    return seen


def merged_equals_reference(paths, tmp_path, method: str, per_model: list[dict], backend: str,
                            max_memory: int = 512 * 2**20) -> None:
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(paths[1:], per_model)),
                         output=tmp_path / "out", base=paths[0], backend=backend, max_memory=max_memory)
    run_merge(config)
    merged = load_state(tmp_path / "out")["w"]
    tensors = [load_state(p)["w"] for p in paths]
    expected = METHODS[method].reference(config.tensor_params("w", None, None), tensors[0], tensors[1:],
                                         TensorContext("w", BIG_SHAPE, 0)).bfloat16()
    assert torch.equal(merged.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bracketed_ties_equals_the_sorted_reference(bf16_big_family, tmp_path, outcomes, backend):
    from dtm_fast.merge.backends import cpu

    if backend == "cpu" and cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())
    merged_equals_reference(bf16_big_family, tmp_path, "ties", [{"density": 0.5}, {"density": 0.2}, {"density": 0.9}],
                            backend)
    assert outcomes == {"hit": 3}  # one bracketed search per model, no one-read merge


def test_bracketed_breadcrumbs_searches_both_band_edges(bf16_big_family, tmp_path, outcomes):
    merged_equals_reference(bf16_big_family, tmp_path, "breadcrumbs", [{"density": 0.4, "gamma": 0.05}] * 3, "auto")
    assert outcomes == {"hit": 6}


def test_a_bracket_that_misses_falls_back_to_the_radix_select(bf16_big_family, tmp_path, outcomes, monkeypatch):
    # a bracket above every finite key (as a sample far off the rank would give)
    monkeypatch.setattr(magnitude, "bracket", lambda sample, rank, numel: (0x7F800001, 0x7F800002))
    merged_equals_reference(bf16_big_family, tmp_path, "ties", [{"density": 0.5}] * 3, "auto")
    assert outcomes == {"miss": 3}


def test_a_bracket_that_overflows_falls_back_to_the_radix_select(bf16_big_family, tmp_path, outcomes, monkeypatch):
    monkeypatch.setattr(magnitude, "BRACKET_SIGMAS", 400)  # a bracket of every key...
    # ...and a budget whose chunks (of about 1M elements) give buffers of 131,072 keys, too few for all
    merged_equals_reference(bf16_big_family, tmp_path, "ties", [{"density": 0.5}] * 3, "auto", max_memory=40 * 2**20)
    assert outcomes == {"overflow": 3}



def test_a_one_key_bracket_needs_no_buffer():
    """Heavily tied bf16 deltas give brackets that are one key of many elements: counting them is
    enough (hand-built searches: 3 keys above, 10 equal to the bracket's one key, buffer of 2)."""
    import numpy as np

    one_key = magnitude.BracketedSearch(0, 5, 7, 7, np.empty(2, dtype=np.uint32), above=3, in_range=10)
    assert one_key.key() == magnitude.RankedKey(7, 3, 10)
    two_keys = magnitude.BracketedSearch(0, 5, 7, 8, np.empty(2, dtype=np.uint32), above=3, in_range=10)
    assert two_keys.key() is None  # overflowed: which of the two keys holds rank 5 is unknown
    missed = magnitude.BracketedSearch(0, 14, 7, 7, np.empty(2, dtype=np.uint32), above=3, in_range=10)
    assert missed.key() is None  # rank 14 lies below the bracket
