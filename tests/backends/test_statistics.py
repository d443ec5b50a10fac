"""Statistics operations (magnitude histograms for the radix select, the bracketed threshold
select, masked L1 sums, delta Gram matrices, non-finite counts, key positions) of every backend:
against the reference, and against plain torch or hand counts where the reference is tested too."""

from __future__ import annotations

import pytest
import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs
from dtm_fast.merge.backends.reference import Sparsify
from dtm_fast.merge.magnitude import RadixSearch, kth_largest_key_in_memory, magnitude_keys

from . import cases
from .conftest import SIZE_NAMES

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_histograms(accelerated, size, dtype, special):
    cases.check_histograms(accelerated, accelerated.size(size), dtype, special=special)


def test_nan_payload_keys_follow_the_reference(accelerated):
    """Keys of NaN deltas: the base's NaN wins over the model's, inf - inf is the default NaN."""
    bits = torch.tensor([0x7FC00005, 0x7F800001, 0x7F800000, 0, -0x3FEDCBA], dtype=torch.int32)
    base_bits = torch.tensor([0x7FC00777, 0, 0x7F800000, -0x5FFFFFFD, 0], dtype=torch.int32)
    model, base = bits.view(torch.float32), base_bits.view(torch.float32)
    expected, actual = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
    cases.REFERENCE.abs_delta_histogram(base, model, expected, None)
    accelerated.abs_delta_histogram(base, model, actual, None)
    assert torch.equal(actual, expected)
    assert int(actual[0x7FC0]) >= 2  # hand-computed: 0x7fc00777 and inf - inf's 0x7fc00000


def test_radix_select_finds_the_exact_kth_largest(backend):
    """Two streamed passes over three chunks give the rank-k key of the whole tensor (the oracle
    sorts the keys in memory)."""
    base, (model,) = chunk_inputs(3001, torch.bfloat16, 1, seed=23)
    chunks = [(0, 1000), (1000, 2000), (2000, 3001)]
    for rank in (1, 17, 1500, 3001):
        search = RadixSearch(rank)
        high = torch.zeros(1 << 16, dtype=torch.int64)
        for lo, hi in chunks:
            backend.abs_delta_histogram(base[lo:hi], model[lo:hi], high, None)
        search.locate_bucket(high)
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for lo, hi in chunks:
            backend.abs_delta_histogram(base[lo:hi], model[lo:hi], low, search.bucket)
        search.locate_key(low)
        assert search.key == kth_largest_key_in_memory(magnitude_keys(model.float() - base.float()), rank)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_select_counts_and_collects_like_torch(backend, size, dtype, special):
    cases.check_select(backend, backend.size(size), dtype, special=special)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_masked_l1(accelerated, size, dtype):
    cases.check_masked_l1(accelerated, accelerated.size(size), dtype)


def test_masked_l1_propagates_nan(backend):
    base, models = chunk_inputs(backend.size("many-blocks"), torch.bfloat16, 1, seed=1, special=True)
    total, kept = backend.masked_l1(base, models[0], Sparsify(), 0)
    assert total != total and kept != kept  # NaN, as a plain sum of the deltas is


def test_masked_l1_is_the_sum_of_kept_deltas(backend):
    """Plain torch oracle: with the keep-all rule both sums are sum |x - b| (fp32 deltas) in float64."""
    base, (model,) = chunk_inputs(2049, torch.float32, 1, seed=2)
    total, kept = backend.masked_l1(base, model, Sparsify(), 0)
    expected = float((model.float() - base.float()).abs().double().sum())
    assert total == pytest.approx(expected, rel=1e-12) and kept == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("models", [3, 6])
def test_delta_gram(accelerated, size, dtype, models):
    cases.check_delta_gram(accelerated, accelerated.size(size), dtype, models=models)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_nonfinite_matches_a_hand_count(backend, size, dtype):
    """NaN, +inf and -inf are counted; the largest finite value and subnormals are not."""
    count = backend.size(size)
    data = torch.randn(count, generator=torch.Generator().manual_seed(count)).to(dtype)
    planted = 0
    if count >= 7:
        data[0], data[1], data[2] = float("nan"), float("inf"), float("-inf")
        data[3], data[4] = torch.finfo(dtype).max, torch.finfo(dtype).tiny / 4
        planted = 3
    if count > 4000:
        data[2049], data[4000] = float("nan"), float("-inf")  # in the blocks of other threads
        planted += 2
    assert backend.count_nonfinite(data) == planted


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_positions(backend, size, dtype):
    """How many |x - b| keys equal a key, and where its n-th occurrence is, in element order:
    plain torch on the keys is the oracle."""
    count = backend.size(size)
    base, (model,) = chunk_inputs(count, dtype, 1, seed=count + 3, special=True)
    keys = magnitude_keys(model.float() - base.float())
    key = int(keys.mode().values) if count else 0  # the most repeated key: many ties
    where = (keys == key).nonzero().flatten()
    for nth in sorted({1, 2, max(1, where.numel() // 2), max(1, where.numel()), where.numel() + 1}):
        total, position = backend.abs_delta_key_position(base, model, key, nth)
        assert total == where.numel()
        assert position == (int(where[nth - 1]) if nth <= where.numel() else -1)
        assert (total, position) == cases.REFERENCE.abs_delta_key_position(base, model, key, nth)
