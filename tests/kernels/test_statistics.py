"""Statistics kernels (magnitude histograms, masked L1 sums, delta Gram matrices), the per-row
methods (model stock filter_wise, SLERP) and DARE's Philox mask against the reference backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, ReferenceBackend, Sparsify
from dtm_fast.merge.magnitude import magnitude_keys

from .conftest import DTYPES, SIZES, assert_identical, assert_within_ulp, key_quantile, make_inputs

reference = ReferenceBackend()


INF_OR_NAN_BUCKET = 0x7F80  # high 16 bits of +inf; every bucket above holds NaNs only


def assert_same_histogram(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Identical below +inf. The keys of infinities and NaNs are compared as one class: a NaN's
    payload is not specified (torch itself widens an fp16 NaN to 0x7FC00000 on its vectorised path
    and to 0x7FFFFFFF on its scalar one), and every NaN key lies above +inf in both."""
    assert torch.equal(actual[:INF_OR_NAN_BUCKET], expected[:INF_OR_NAN_BUCKET])
    assert int(actual[INF_OR_NAN_BUCKET:].sum()) == int(expected[INF_OR_NAN_BUCKET:].sum())


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_histograms_identical(backend, count, dtype):
    base, (model,) = make_inputs(count, dtype, 1, seed=count)
    actual = torch.full((1 << 16,), 3, dtype=torch.int64)  # the kernels add to what is there
    expected = actual.clone()
    backend.abs_delta_histogram(base, model, actual, None)
    reference.abs_delta_histogram(base, model, expected, None)
    assert_same_histogram(actual, expected)
    if count:
        # the fullest finite bucket, whose keys' low bits the second radix pass counts
        bucket = int(torch.argmax(expected[:INF_OR_NAN_BUCKET]))
        actual_low, expected_low = torch.zeros_like(actual), torch.zeros_like(expected)
        backend.abs_delta_histogram(base, model, actual_low, bucket)
        reference.abs_delta_histogram(base, model, expected_low, bucket)
        assert torch.equal(actual_low, expected_low) and int(expected_low.sum()) == int(expected[bucket]) - 3


def same_nan_keys(keys: np.ndarray) -> np.ndarray:
    """NaN keys as one value: their payload is not specified (see assert_same_histogram)."""
    return np.where((keys > 0x7F800000) & (keys <= NO_UPPER_KEY), np.uint32(0x7FC00000), keys)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_counts_and_collects_like_torch(backend, count, dtype):
    """Keys above each bracket are counted and keys inside it collected, in any order, for several
    searches in one call (two of them over the same model); the oracle is plain torch on the same
    |x - b| keys (NaN/Inf planted, so NaN keys sit above every bracket)."""
    base, models = make_inputs(count, dtype, 2, seed=count + 3)
    keys = [magnitude_keys(model.float() - base.float()) for model in models]

    def key_at(model: int, quantile: float) -> int:
        finite = keys[model][keys[model] < 0x7F800000].double()
        return int(torch.quantile(finite, quantile)) if finite.numel() else 0

    searches = [(0, key_at(0, 0.3), key_at(0, 0.6)), (0, 0, NO_UPPER_KEY), (1, key_at(1, 0.5), key_at(1, 0.5))]
    expected = [keys[m][(keys[m] >= low) & (keys[m] <= high)] for m, low, high in searches]
    for shrink in (False, True):  # room for every key, then for half of them
        capacities = [selected.numel() // 2 if shrink else selected.numel() + 5 for selected in expected]
        collected = [np.full(capacity, 0xFFFFFFFF, dtype=np.uint32) for capacity in capacities]
        results = backend.abs_delta_select(base, [models[m] for m, _, _ in searches],
                                           [(low, high) for _, low, high in searches], collected)
        for (m, low, high), selected, buffer, (above, in_range) in zip(searches, expected, collected, results):
            assert above == int((keys[m] > high).sum()) and in_range == selected.numel()
            kept = min(len(buffer), selected.numel())
            assert np.all(buffer[kept:] == 0xFFFFFFFF)  # nothing written past what fits
            actual, wanted = same_nan_keys(buffer[:kept]), same_nan_keys(selected.numpy().astype(np.uint32))
            if kept == selected.numel():
                assert np.array_equal(np.sort(actual), np.sort(wanted))
            else:  # a subset of the range's keys
                assert set(actual.tolist()) <= set(wanted.tolist())


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_l1_matches_reference(backend, count, dtype):
    base, models = make_inputs(count, dtype, 2, seed=count + 7, special=False)
    rules = [Sparsify(), Sparsify("band", key_quantile(base, models[0], 0.5), NO_UPPER_KEY),
             Sparsify("random", philox_key=(123, 456), threshold=rng.keep_threshold(0.4))]
    for rule in rules:
        actual = backend.masked_l1(base, models[0], rule, 99)
        expected = reference.masked_l1(base, models[0], rule, 99)
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_masked_l1_propagates_nan(backend):
    base, models = make_inputs(4099, torch.bfloat16, 1, seed=1)
    total, kept = backend.masked_l1(base, models[0], Sparsify(), 0)
    assert total != total and kept != kept  # NaN, as the reference's sum


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_gram_matches_reference(backend, count, dtype):
    base, models = make_inputs(count, dtype, 3, seed=count + 9, special=False)
    actual = torch.from_numpy(backend.delta_gram(base, models))
    expected = torch.from_numpy(reference.delta_gram(base, models))
    assert actual.dtype == torch.float64 and actual.shape == (3, 3)
    # double sums in another order: close relative to the norms (off-diagonal terms can cancel)
    scale = float(expected.diagonal().max()) if count else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * scale + 1e-300)


ROW_SHAPES = [(0, 5), (1, 1), (7, 1), (3, 7), (5, 2049), (40, 517)]


@pytest.mark.parametrize("rows,row_length", ROW_SHAPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_model_stock_rows_within_one_ulp(backend, rows, row_length, in_dtype, out_dtype):
    count = rows * row_length
    base, models = make_inputs(count, in_dtype, 3, seed=count + 11, special=False)
    actual, expected = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    backend.model_stock_rows(actual, base, models, row_length)
    reference.model_stock_rows(expected, base, models, row_length)
    assert_within_ulp(actual, expected)


@pytest.mark.parametrize("rows,row_length", ROW_SHAPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_slerp_rows_within_one_ulp(backend, rows, row_length, in_dtype, out_dtype):
    count = rows * row_length
    base, (model,) = make_inputs(count, in_dtype, 1, seed=count + 13, special=False)
    if rows >= 3:
        model[row_length:2 * row_length] = base[row_length:2 * row_length]  # collinear row: linear path
    actual, expected = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    for t in (0.0, 0.3, 1.0):
        backend.slerp_rows(actual, base, model, row_length, t)
        reference.slerp_rows(expected, base, model, row_length, t)
        assert_within_ulp(actual, expected)


def test_row_methods_propagate_nan(backend):
    base, models = make_inputs(3 * 517, torch.float32, 2, seed=3)
    for operation, args in [("model_stock_rows", (base, models, 517)), ("slerp_rows", (base, models[0], 517, 0.4))]:
        actual, expected = torch.empty(3 * 517), torch.empty(3 * 517)
        getattr(backend, operation)(actual, *args)
        getattr(reference, operation)(expected, *args)
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), operation


@pytest.mark.parametrize("start", [0, 5, (1 << 32) - 1000, (1 << 40) + 17])
@pytest.mark.parametrize("density", [0.0, 1e-6, 0.1, 0.5, 0.9, 1.0])
def test_dare_mask_bit_identical(backend, start, density):
    key = rng.philox_key(42, "model.layers.3.self_attn.q_proj.weight", 2)
    threshold = rng.keep_threshold(density)
    for count in (0, 1, 7, 20001):
        expected = rng.keep_mask(key, start, count, threshold)
        assert torch.equal(backend.keep_mask(key, start, count, threshold), expected)


# Philox4x32-10 known-answer vector (Random123 kat_vectors: counter 0, key 0): its four output words,
# which elements 0, 16, 32 and 48 draw (element 64b + 16w + j takes word w of counter 16b + j).
KAT_WORDS = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("word", range(4))
def test_dare_mask_known_values(backend, word):
    # keep iff (draw >> 8) < threshold, so thresholds just above and at draw >> 8 decide exactly
    draw = KAT_WORDS[word] >> 8
    element = 16 * word
    # alone (the scalar path), and inside a run of whole 64-element blocks (the SIMD path)
    for start, count in ((element, 1), (0, 200)):
        assert bool(backend.keep_mask((0, 0), start, count, draw + 1)[element - start])
        assert not bool(backend.keep_mask((0, 0), start, count, draw)[element - start])


def test_reference_philox_words_are_the_known_answer():
    import torch

    zero = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in rng.philox4x32((zero, zero, zero, zero), (0, 0))] == list(KAT_WORDS)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_nonfinite_matches_a_hand_count(backend, count, dtype):
    """NaN, +inf and -inf are counted; the largest finite value and subnormals are not."""
    generator = torch.Generator().manual_seed(count)
    data = torch.randn(count, generator=generator).to(dtype)
    planted = 0
    if count >= 7:
        data[0], data[1], data[2] = float("nan"), float("inf"), float("-inf")
        data[3], data[4] = torch.finfo(dtype).max, torch.finfo(dtype).tiny / 4
        planted = 3
    if count > 4000:
        data[2049], data[4000] = float("nan"), float("-inf")  # in the tiles of other threads
        planted += 2
    assert backend.count_nonfinite(data) == planted
    assert reference.count_nonfinite(data) == planted
    assert "count_nonfinite" in backend.accelerated
