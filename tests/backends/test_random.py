"""DARE's random masks: every backend keeps exactly the elements of dtm's Philox stream
(dtm_fast.merge.rng, itself checked against Random123's published known-answer vector), at chunk
starts that cross the counter's 32-bit word, for any density."""

from __future__ import annotations

import pytest
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import GtaSpec, Sparsify

from . import cases

# Philox4x32-10 known-answer vector (Random123 kat_vectors: counter 0, key 0): its four output words,
# which elements 0, 16, 32 and 48 draw (element 64b + 16w + j takes word w of counter 16b + j).
KAT_WORDS = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_rng_philox_words_are_the_known_answer():
    zero = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in rng.philox4x32((zero, zero, zero, zero), (0, 0))] == list(KAT_WORDS)


@pytest.mark.parametrize("start", [0, 999, (1 << 32) - 5, (3 << 32) + 17, (1 << 40) + 17])
@pytest.mark.parametrize("density", [0.0, 1e-6, 0.1, 0.5, 0.9, 1.0])
def test_dare_masks_bit_identical_to_rng(accelerated, start, density):
    # (1 << 32) - 5 with more than 5 elements crosses a carry into the counter's high word
    for size in ("one", "odd", "many-blocks"):
        cases.check_dare_masks(accelerated, accelerated.size(size), start, density)


@pytest.mark.parametrize("word", range(4))
def test_dare_keeps_by_the_known_answer(backend, word):
    """Element 16w draws KAT word w; it is kept iff (word >> 8) < threshold, so thresholds at and just
    above that decide exactly: alone (a scalar path) and inside whole 64-element blocks (a vector path)."""
    draw = KAT_WORDS[word] >> 8
    element = 16 * word
    for start, count in ((element, 1), (0, 200)):
        for threshold, kept in ((draw + 1, 1.0), (draw, 0.0)):
            spec = GtaSpec(weights=(1.0,), consensus=None, normalize=False, lambda_=1.0,
                           sparsify=(Sparsify("random", philox_key=(0, 0), threshold=threshold),))
            out = torch.empty(count)
            backend.gta(out, torch.zeros(count), [torch.ones(count)], spec, start)
            assert out[element - start].item() == kept
