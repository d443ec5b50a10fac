"""Elementwise combines (linear, generalised task arithmetic, model stock, Fisher): the cpu backend
must give exactly the reference backend's output for every input/output dtype pair."""

from __future__ import annotations

import itertools

import pytest
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, ReferenceBackend, Sparsify

from .conftest import DTYPES, SIZES, assert_identical, key_quantile, make_inputs

reference = ReferenceBackend()
DTYPE_PAIRS = list(itertools.product(DTYPES, DTYPES))


def run_both(operation: str, out_dtype, count, backend, *args):
    actual = torch.full((count,), 7.0, dtype=out_dtype)
    expected = torch.empty(count, dtype=out_dtype)
    getattr(backend, operation)(actual, *args)
    getattr(reference, operation)(expected, *args)
    return actual, expected


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS)
def test_linear_matches_reference(backend, count, in_dtype, out_dtype):
    _, models = make_inputs(count, in_dtype, 3, seed=count)
    actual, expected = run_both("linear", out_dtype, count, backend, models, [0.2, 0.3, 0.5])
    assert_identical(actual, expected)


def gta_rules(base, models, start):
    """One model of each sparsification: TIES band, breadcrumbs band, DARE, none."""
    name_key = rng.philox_key(11, "model.layers.0.mlp.up_proj.weight", 1)
    count = base.numel()
    return (
        # exactly-k TIES: ties at the threshold kept below a flat index inside this chunk
        Sparsify("band", key_quantile(base, models[0], 0.6), NO_UPPER_KEY, scale=1.25,
                 low_from=0, low_to=start + count // 2),
        Sparsify("random", philox_key=name_key, threshold=rng.keep_threshold(0.3), scale=1 / 0.3),
        Sparsify(),
        # breadcrumbs: the highest-index ties at the lower bound, the lowest at the upper
        Sparsify("band", key_quantile(base, models[3], 0.2), key_quantile(base, models[3], 0.9),
                 low_from=start + count // 3, high_to=start + 2 * count // 3),
    )


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
def test_gta_matches_reference(backend, count, in_dtype, out_dtype, consensus):
    base, models = make_inputs(count, in_dtype, 4, seed=count + 1)
    start = (1 << 32) - 3 if count > 4000 else 12345  # counters crossing 2^32 use Philox's high word
    for normalize, weights, lambda_ in [(True, (0.5, 1.0, -0.3, 0.7), 0.9), (False, (1.0, 1.0, 1.0, 1.0), 1.0)]:
        spec = GtaSpec(weights, gta_rules(base, models, start), consensus, normalize, lambda_)
        actual, expected = run_both("gta", out_dtype, count, backend, base, models, spec, start)
        assert_identical(actual, expected)


@pytest.mark.parametrize("edge", ["empty band", "weights sum to zero", "everything dropped"])
def test_gta_edge_rules_match_reference(backend, edge):
    base, models = make_inputs(4099, torch.bfloat16, 2, seed=5)
    if edge == "empty band":
        rules = (Sparsify("band", NO_UPPER_KEY, -1), Sparsify("band", 0, NO_UPPER_KEY))
        spec = GtaSpec((1.0, 1.0), rules, "sum", True, 1.0)
    elif edge == "weights sum to zero":
        spec = GtaSpec((1.0, -1.0), (Sparsify(), Sparsify()), None, True, 1.0)
    else:
        rules = (Sparsify("random", philox_key=(1, 2), threshold=0, scale=2.0),) * 2
        spec = GtaSpec((1.0, -2.0), rules, "count", True, 1.0)
    actual, expected = run_both("gta", torch.bfloat16, 4099, backend, base, models, spec, 77)
    assert_identical(actual, expected)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS)
def test_model_stock_combine_matches_reference(backend, count, in_dtype, out_dtype):
    base, models = make_inputs(count, in_dtype, 3, seed=count + 2)
    actual, expected = run_both("model_stock_combine", out_dtype, count, backend, base, models, 0.37)
    assert_identical(actual, expected)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS)
def test_fisher_matches_reference(backend, count, in_dtype, out_dtype):
    _, models = make_inputs(count, in_dtype, 2, seed=count + 3)
    generator = torch.Generator().manual_seed(count)
    fishers = [torch.rand(count, generator=generator).square().to(torch.float32) for _ in models]
    if count:
        fishers[0][0] = 0.0
        fishers[1][0] = 0.0  # both zero: epsilon decides
    actual, expected = run_both("fisher", out_dtype, count, backend, models, fishers, [1.0, 3.0], 1e-8)
    assert_identical(actual, expected)
