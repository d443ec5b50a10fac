"""Elementwise combines (linear, generalised task arithmetic with every sparsification, model stock,
Fisher, nearswap, RAM and its counts) of every accelerated backend against the reference, for every input/output dtype pair, at
each backend's block boundaries, with and without NaN/Inf in the inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, Sparsify

from . import cases
from .conftest import SIZE_NAMES

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_PAIRS = list(itertools.product(DTYPES, DTYPES))
PAIR_IDS = [f"{a}-to-{b}".replace("torch.", "") for a, b in DTYPE_PAIRS]


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_linear(accelerated, size, in_dtype, out_dtype, special):
    cases.check_linear(accelerated, accelerated.size(size), in_dtype, out_dtype, special=special)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("consensus,normalize", [(None, False), (None, True), ("sum", True), ("count", False)])
def test_gta(accelerated, size, in_dtype, out_dtype, consensus, normalize):
    cases.check_gta(accelerated, accelerated.size(size), in_dtype, out_dtype, consensus, normalize)


@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("consensus,normalize", [(None, False), ("sum", True), ("count", True)])
def test_gta_with_nan_and_inf(accelerated, in_dtype, out_dtype, consensus, normalize):
    for size in ("odd", "many-blocks"):
        cases.check_gta(accelerated, accelerated.size(size), in_dtype, out_dtype, consensus, normalize, special=True)


@pytest.mark.parametrize("models", [1, 2, 4])
def test_gta_model_counts(accelerated, models):
    cases.check_gta(accelerated, accelerated.size("block+1"), torch.bfloat16, torch.bfloat16, "sum", True,
                    models=models)


@pytest.mark.parametrize("edge", ["empty band", "weights sum to zero", "everything dropped"])
def test_gta_edge_rules(accelerated, edge):
    count = accelerated.size("many-blocks")
    base, models = chunk_inputs(count, torch.bfloat16, 2, seed=5, special=True)
    if edge == "empty band":
        spec = GtaSpec((1.0, 1.0), (Sparsify("band", NO_UPPER_KEY, -1), Sparsify("band", 0, NO_UPPER_KEY)),
                       "sum", True, 1.0)
    elif edge == "weights sum to zero":
        spec = GtaSpec((1.0, -1.0), (Sparsify(), Sparsify()), None, True, 1.0)
    else:
        rules = (Sparsify("random", philox_key=(1, 2), threshold=0, scale=2.0),) * 2
        spec = GtaSpec((1.0, -2.0), rules, "count", True, 1.0)
    expected, actual = cases.outputs(count, torch.bfloat16)
    cases.REFERENCE.gta(expected, base, models, spec, 77)
    accelerated.gta(actual, base, models, spec, 77)
    cases.assert_within_ulps(actual, expected, accelerated.ulps)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("operation", ["model_stock_combine", "nearswap", "ram"])
def test_finite_combines(accelerated, operation, size, in_dtype, out_dtype):
    getattr(cases, f"check_{operation}")(accelerated, accelerated.size(size), in_dtype, out_dtype)


@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_fisher(accelerated, size, in_dtype, out_dtype, special):
    cases.check_fisher(accelerated, accelerated.size(size), in_dtype, out_dtype, special=special)


@pytest.mark.parametrize("out_dtype,step", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_rounding_is_to_nearest_even(backend, out_dtype, step):
    """Hand-computed: values halfway between two representable outputs round to the even one,
    others to the nearest; overflow gives inf."""
    half = step / 2
    values = torch.tensor([1 + half, 1 + 3 * half, -(1 + half), 1 + half * 1.25, 1 + half * 0.75, 3.5e38],
                          dtype=torch.float32)
    expected = torch.tensor([1.0, 1 + 2 * step, -1.0, 1 + step, 1.0, float("inf")]).to(out_dtype)
    actual = torch.empty(values.numel(), dtype=out_dtype)
    backend.linear(actual, [values], [1.0])
    assert torch.equal(actual.view(torch.int16), expected.view(torch.int16))


def test_task_arithmetic_is_base_plus_the_deltas(backend):
    """Hand-written oracle for every backend, the reference included: b + lambda * sum(w_i (x_i - b))
    in fp32, rounded once."""
    base, models = chunk_inputs(1001, torch.bfloat16, 3, seed=8)
    spec = GtaSpec((1.0, 0.5, -0.25), (Sparsify(),) * 3, None, False, 0.75)
    actual = torch.empty(1001, dtype=torch.bfloat16)
    backend.gta(actual, base, models, spec, 0)
    b = base.float()
    deltas = sum(w * (m.float() - b) for w, m in zip((1.0, 0.5, -0.25), models))
    cases.assert_within_ulps(actual, (b + 0.75 * deltas).bfloat16(), 1)


@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_nearswap_and_ram_with_nan_and_inf(accelerated, in_dtype, out_dtype):
    for size in ("odd", "many-blocks"):
        cases.check_nearswap(accelerated, accelerated.size(size), in_dtype, out_dtype, special=True)
        cases.check_ram(accelerated, accelerated.size(size), in_dtype, out_dtype, special=True)


@pytest.mark.parametrize("models", [1, 2, 4])
def test_ram_model_counts(accelerated, models):
    cases.check_ram(accelerated, accelerated.size("many-blocks"), torch.float32, torch.float32, models=models)
