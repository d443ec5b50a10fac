"""Comparisons of a backend's chunk operations with the reference backend (the specification), one
function per operation, shared by every test file of the suite and every backend."""

from __future__ import annotations

import numpy as np
import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs
from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, ReferenceBackend, Sparsify
from dtm_fast.merge.magnitude import magnitude_keys

REFERENCE = ReferenceBackend()
START = (1 << 32) + 12_345  # a chunk far into a tensor: the Philox counter's high word is non-zero
INF_OR_NAN_BUCKET = 0x7F80  # high 16 bits of +inf; every bucket above holds NaNs only


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 that orders like the float values, one step per representable value (-0 == +0)."""
    width = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}[values.dtype]
    bits = values.view(width).to(torch.int64)
    magnitude = bits & ((1 << (8 * values.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 0) -> None:
    """Same dtype, shape and NaN positions; every other element within `ulps` units in the last
    place of the dtype (0: identical values, -0 == +0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    distance = (ordered_bits(actual[~nan]) - ordered_bits(expected[~nan])).abs()
    worst = int(distance.max()) if distance.numel() else 0
    assert worst <= ulps, f"{int((distance > ulps).sum())} elements differ by more than {ulps} ulp (worst {worst})"


def assert_same_histogram(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Identical below +inf. Infinities and NaNs are compared as one class: a NaN's payload is not
    specified (torch widens an fp16 NaN to 0x7FC00000 on its vectorised path and to 0x7FFFFFFF on
    its scalar one), and every NaN key lies above +inf in both."""
    assert torch.equal(actual[:INF_OR_NAN_BUCKET], expected[:INF_OR_NAN_BUCKET])
    assert int(actual[INF_OR_NAN_BUCKET:].sum()) == int(expected[INF_OR_NAN_BUCKET:].sum())


def key_quantile(base: torch.Tensor, model: torch.Tensor, q: float) -> int:
    keys = magnitude_keys(model.float() - base.float())
    finite = keys[keys < 0x7F800000].double()
    return int(torch.quantile(finite, q)) if finite.numel() else 0


def band_rules(base: torch.Tensor, models: list[torch.Tensor]) -> list[Sparsify]:
    """A DARE rule, an exactly-k TIES band (ties kept below a flat index), a breadcrumbs band (ties
    kept from one index at the low bound, up to another at the high), then rules that keep all."""
    rules = [Sparsify("random", philox_key=rng.philox_key(7, "layer.weight", 0), threshold=rng.keep_threshold(0.3),
                      scale=1 / 0.3)]
    count = base.numel()
    if len(models) > 1:
        rules.append(Sparsify("band", key_quantile(base, models[1], 0.5), NO_UPPER_KEY, scale=1.25,
                              low_to=START + count // 2))
    if len(models) > 2:
        rules.append(Sparsify("band", key_quantile(base, models[2], 0.2), key_quantile(base, models[2], 0.9),
                              scale=1.25, low_from=START + count // 3, high_to=START + 2 * count // 3))
    rules += [Sparsify()] * (len(models) - len(rules))
    return rules[:len(models)]


def outputs(count: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected, actual); actual starts as garbage, so an operation that skips an element shows."""
    return torch.empty(count, dtype=dtype), torch.full((count,), 7.0, dtype=dtype)


def check_linear(backend, count, in_dtype, out_dtype, models=3, special=False):
    _, inputs = chunk_inputs(count, in_dtype, models, seed=count + models, special=special)
    coefficients = [0.5, -0.25, 0.75, 0.1, 1.0][:models]
    expected, actual = outputs(count, out_dtype)
    REFERENCE.linear(expected, inputs, coefficients)
    backend.linear(actual, inputs, coefficients)
    assert_within_ulps(actual, expected, backend.ulps)


def check_gta(backend, count, in_dtype, out_dtype, consensus, normalize, models=3, special=False):
    base, inputs = chunk_inputs(count, in_dtype, models, seed=3 * count + models, special=special)
    weights = (0.7, 1.0, -0.4, 0.3)[:models]
    spec = GtaSpec(weights=weights, sparsify=tuple(band_rules(base, inputs)), consensus=consensus,
                   normalize=normalize, lambda_=0.85)
    expected, actual = outputs(count, out_dtype)
    REFERENCE.gta(expected, base, inputs, spec, START)
    backend.gta(actual, base, inputs, spec, START)
    assert_within_ulps(actual, expected, backend.ulps)


def same_as_reference(backend, operation: str, count: int, out_dtype, *args) -> None:
    """`operation` into a fresh output on the reference and on `backend`: equal within its ulps."""
    expected, actual = outputs(count, out_dtype)
    getattr(REFERENCE, operation)(expected, *args)
    getattr(backend, operation)(actual, *args)
    assert_within_ulps(actual, expected, backend.ulps)


def check_model_stock_combine(backend, count, in_dtype, out_dtype, models=3):
    base, inputs = chunk_inputs(count, in_dtype, models, seed=13 * count + models)
    for ratio in (0.0, 0.37, 1.0):
        same_as_reference(backend, "model_stock_combine", count, out_dtype, base, inputs, ratio)


def check_fisher(backend, count, in_dtype, out_dtype, models=3, special=False):
    _, inputs = chunk_inputs(count, in_dtype, models, seed=19 * count + models, special=special)
    generator = torch.Generator().manual_seed(count)
    fishers = [torch.rand(count, generator=generator) * (torch.rand(count, generator=generator) > 0.2)
               for _ in range(models)]
    if count:
        for fisher in fishers:
            fisher[0] = 0.0  # every model's Fisher zero: epsilon decides
    weights = [1.0, 2.5, 0.5, 1.5][:models]
    expected, actual = outputs(count, out_dtype)
    REFERENCE.fisher(expected, inputs, fishers, weights, 1e-8)
    backend.fisher(actual, inputs, fishers, weights, 1e-8)
    assert_within_ulps(actual, expected, backend.ulps)


def check_nearswap(backend, count, in_dtype, out_dtype, special=False):
    base, (model,) = chunk_inputs(count, in_dtype, 1, seed=23 * count + 1, special=special)
    for t in (1e-3, 0.05, 0.0):  # distances around t: weights strictly between 0 and 1 as well as clamped
        same_as_reference(backend, "nearswap", count, out_dtype, base, model, t)


def check_ram(backend, count, in_dtype, out_dtype, models=3, special=False):
    base, inputs = chunk_inputs(count, in_dtype, models, seed=29 * count + models, special=special)
    for epsilon, scales in ((1e-3, [1.0] * models), (1e-5, [1.15, 1.0, 1.2, 1.05][:models])):
        same_as_reference(backend, "ram", count, out_dtype, base, inputs, epsilon, scales)
        assert backend.ram_counts(base, inputs, epsilon) == REFERENCE.ram_counts(base, inputs, epsilon)


def check_histograms(backend, count, in_dtype, special=False):
    """Both radix-select passes: the high-16-bit histogram, then the low bits of its fullest finite bucket."""
    base, (model,) = chunk_inputs(count, in_dtype, 1, seed=5 * count, special=special)
    expected = torch.full((1 << 16,), 3, dtype=torch.int64)  # the operation adds to what is there
    actual = expected.clone()
    REFERENCE.abs_delta_histogram(base, model, expected, None)
    backend.abs_delta_histogram(base, model, actual, None)
    assert_same_histogram(actual, expected)
    if count:
        bucket = int(torch.argmax(expected[:INF_OR_NAN_BUCKET]))
        low_expected, low_actual = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
        REFERENCE.abs_delta_histogram(base, model, low_expected, bucket)
        backend.abs_delta_histogram(base, model, low_actual, bucket)
        assert torch.equal(low_actual, low_expected) and int(low_expected.sum()) == int(expected[bucket]) - 3


def same_nan_keys(keys: np.ndarray) -> np.ndarray:
    """NaN keys as one value: their payload is not specified (see assert_same_histogram)."""
    return np.where((keys > 0x7F800000) & (keys <= NO_UPPER_KEY), np.uint32(0x7FC00000), keys)


def check_select(backend, count, in_dtype, special=False):
    """The bracketed threshold pass against plain torch on the same |x - b| keys: counts above and
    keys inside each bracket, for several searches in one call (two over the same model), with room
    for every key and with room for half (nothing is written past a buffer's end)."""
    base, models = chunk_inputs(count, in_dtype, 2, seed=17 * count + 3, special=special)
    keys = [magnitude_keys(model.float() - base.float()) for model in models]
    searches = [(0, key_quantile(base, models[0], 0.3), key_quantile(base, models[0], 0.6)), (0, 0, NO_UPPER_KEY),
                (1, key_quantile(base, models[1], 0.5), key_quantile(base, models[1], 0.5))]
    inside = [keys[m][(keys[m] >= low) & (keys[m] <= high)] for m, low, high in searches]
    for shrink in (False, True):
        capacities = [selected.numel() // 2 if shrink else selected.numel() + 5 for selected in inside]
        buffers = [np.full(capacity, 0xFFFFFFFF, dtype=np.uint32) for capacity in capacities]
        counts = backend.abs_delta_select(base, [models[m] for m, _, _ in searches],
                                          [(low, high) for _, low, high in searches], buffers)
        assert counts == [(int((keys[m] > high).sum()), selected.numel())
                          for (m, _, high), selected in zip(searches, inside)]
        for buffer, selected in zip(buffers, inside):
            kept = min(len(buffer), selected.numel())
            assert np.all(buffer[kept:] == 0xFFFFFFFF)
            got, wanted = same_nan_keys(buffer[:kept]), same_nan_keys(selected.numpy().astype(np.uint32))
            if kept == selected.numel():
                assert np.array_equal(np.sort(got), np.sort(wanted))
            else:
                assert set(got.tolist()) <= set(wanted.tolist())


def check_masked_l1(backend, count, in_dtype):
    base, inputs = chunk_inputs(count, in_dtype, 3, seed=7 * count)
    for model, rule in zip(inputs, band_rules(base, inputs)):
        expected = REFERENCE.masked_l1(base, model, rule, START)
        actual = backend.masked_l1(base, model, rule, START)
        # float64 sums in another order: equal to ~1e-15 relative
        np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                   rtol=1e-12, atol=1e-300)


def check_delta_gram(backend, count, in_dtype, models=3):
    """The deltas' Gram matrix, and without a base the inputs' own (against plain float64 dot products
    of the inputs as well: no base must mean a zero base, not a missing term)."""
    base, inputs = chunk_inputs(count, in_dtype, models, seed=11 * count + models)
    own = torch.stack([x.double() for x in inputs]) if models else torch.zeros(0, count, dtype=torch.float64)
    for given, exact in ((base, None), (None, own @ own.T)):
        expected = torch.from_numpy(REFERENCE.delta_gram(given, inputs))
        if exact is not None:
            torch.testing.assert_close(expected, exact, rtol=1e-12, atol=1e-300)
        actual = backend.delta_gram(given, inputs)
        assert isinstance(actual, np.ndarray) and actual.dtype == np.float64 and actual.shape == (models, models)
        # off-diagonal terms can cancel: close relative to the norms
        scale = float(expected.diagonal().max()) if count else 0.0
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-12, atol=1e-12 * scale + 1e-300)


def check_model_stock_rows(backend, rows, row_length, in_dtype, out_dtype, models=3):
    count = rows * row_length
    base, inputs = chunk_inputs(count, in_dtype, models, seed=13 * count + models)
    if rows:
        inputs[1][:row_length] = base[:row_length]  # a row whose delta vanishes: ratio 0 for that row
    expected, actual = outputs(count, out_dtype)
    REFERENCE.model_stock_rows(expected, base, inputs, row_length)
    backend.model_stock_rows(actual, base, inputs, row_length)
    assert_within_ulps(actual, expected, 1)


def check_slerp_rows(backend, rows, row_length, in_dtype, out_dtype):
    count = rows * row_length
    first, (second,) = chunk_inputs(count, in_dtype, 1, seed=17 * count)
    second = second + torch.randn(count, generator=torch.Generator().manual_seed(1)).to(in_dtype)
    if rows >= 3:
        second[:row_length] = first[:row_length] * 2  # collinear: the linear branch
        first[row_length:2 * row_length] = 0  # zero norm
    for t in (0.0, 0.3, 1.0):
        expected, actual = outputs(count, out_dtype)
        REFERENCE.slerp_rows(expected, first, second, row_length, t)
        backend.slerp_rows(actual, first, second, row_length, t)
        assert_within_ulps(actual, expected, 1)


def check_dare_masks(backend, count, start, density, seed=3):
    """The kept set of a DARE rule, read off gta with base 0, model 1, scale 1, equals rng.keep_mask."""
    key = rng.philox_key(seed, "model.layers.0.mlp.up_proj.weight", 2)
    rule = Sparsify("random", philox_key=key, threshold=rng.keep_threshold(density))
    spec = GtaSpec(weights=(1.0,), sparsify=(rule,), consensus=None, normalize=False, lambda_=1.0)
    kept = torch.empty(count, dtype=torch.float32)
    backend.gta(kept, torch.zeros(count, dtype=torch.bfloat16), [torch.ones(count, dtype=torch.bfloat16)], spec, start)
    expected = rng.keep_mask(key, start, count, rule.threshold)
    assert torch.equal(kept == 1, expected)
    assert torch.equal(kept[~expected], torch.zeros(int((~expected).sum())))


# -- SCE, arcee_fusion and the order keys of their statistics -------------------------------------------
def check_sce(backend, count, in_dtype, out_dtype, models=3, special=False):
    """The variance, then the combine and the squared sums without a selection and with top-k rules:
    one that splits the ties at a mid key by flat index, one at the zero variance, one keeping nothing."""
    from dtm_fast.merge.order_statistics import ZERO_KEY, TopRule, order_keys

    base, inputs = chunk_inputs(count, in_dtype, models, seed=31 * count + models, special=special)
    expected, actual = outputs(count, torch.float32)
    REFERENCE.sce_variance(expected, base, inputs)
    backend.sce_variance(actual, base, inputs)
    assert_within_ulps(actual, expected, 0)
    weights = [0.4, 0.25, 0.35, 0.1, 0.6][:models]
    same_as_reference(backend, "sce", count, out_dtype, base, inputs, weights)
    rules = [TopRule(), TopRule(ZERO_KEY, START + count // 2)]
    if count:
        rules.append(TopRule(int(order_keys(expected[count // 2: count // 2 + 1])[0]), START + count // 3))
    for rule in rules:
        same_as_reference(backend, "sce", count, out_dtype, base, inputs, weights, expected, rule, START)
        ours = backend.sce_squares(base, inputs, expected, rule, START)
        theirs = REFERENCE.sce_squares(base, inputs, expected, rule, START)
        assert np.allclose(ours, theirs, rtol=1e-12, atol=0, equal_nan=True), (rule, ours, theirs)


def fusion_row_lengths(count: int) -> list[int]:
    return sorted({length for length in (1, 3, 7, 23, 89, 103, 179, 683, count) if 0 < length <= count
                   and count % length == 0})


def check_fusion(backend, count, in_dtype, out_dtype, special=False):
    """arcee_fusion's importance from each row's divergence, for several row lengths, then its combine
    at the median importance (and at +inf: nothing kept, an infinite delta gives NaN)."""
    base, (model,) = chunk_inputs(count, in_dtype, 1, seed=37 * count + 1, special=special)
    for row_length in fusion_row_lengths(count):
        divergence, ours = outputs(count // row_length, torch.float32)
        REFERENCE.fusion_divergence(divergence, base, model, row_length)
        backend.fusion_divergence(ours, base, model, row_length)
        assert_within_ulps(ours, divergence, 0)
        expected, actual = outputs(count, torch.float32)
        REFERENCE.fusion_importance(expected, base, model, divergence, row_length)
        backend.fusion_importance(actual, base, model, divergence, row_length)
        assert_within_ulps(actual, expected, 0)
        finite = expected[torch.isfinite(expected)]
        median = float(finite.median()) if finite.numel() else 0.0
        for threshold in (median, float("inf")):
            same_as_reference(backend, "fusion_combine", count, out_dtype, base, model, expected, threshold)


def order_key_values(count: int, seed: int) -> torch.Tensor:
    """fp32 statistics with ties, both zeros, infinities and NaNs of several payloads (one key)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, generator=generator).to(torch.bfloat16).float()  # bf16-rounded: many ties
    if count >= 8:
        nan_bits = torch.tensor([0x7FC00000, 0x7F800001, -0x400000, -1], dtype=torch.int32).view(torch.float32)
        values[:4] = nan_bits
        values[4:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
        values = values[torch.randperm(count, generator=generator)]
    return values


def check_order_keys(backend, count):
    """Both radix-select histograms and the tie positions, against the reference."""
    from dtm_fast.merge.order_statistics import ZERO_KEY, order_keys

    values = order_key_values(count, seed=41 * count)
    expected = torch.full((1 << 16,), 3, dtype=torch.int64)  # the operation adds to what is there
    actual = expected.clone()
    REFERENCE.order_key_histogram(values, expected, None)
    backend.order_key_histogram(values, actual, None)
    assert torch.equal(actual, expected)
    keys = order_keys(values)
    for bucket in ({int(torch.argmax(expected))} | ({int(keys[0]) >> 16} if count else set())):
        low_expected, low_actual = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
        REFERENCE.order_key_histogram(values, low_expected, bucket)
        backend.order_key_histogram(values, low_actual, bucket)
        assert torch.equal(low_actual, low_expected) and int(low_expected.sum()) == int(expected[bucket]) - 3
    wanted = [ZERO_KEY, 0x7FC00000 + ZERO_KEY, 1 << 32] + ([int(keys[count // 2])] if count else [])
    for key in wanted:
        tied = int((keys == key).sum())
        for nth in (0, 1, 2, tied, tied + 1):
            assert backend.order_key_position(values, key, nth) == REFERENCE.order_key_position(values, key, nth)
