"""Every Triton kernel against the reference backend, run by Triton's interpreter on CPU.

Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -m triton_interpret tests/triton
"""

import pytest
import torch

pytest.importorskip("triton")

import triton_cases as cases  # noqa: E402  (tests/triton is on sys.path: no __init__.py, see conftest)

pytestmark = pytest.mark.triton_interpret

SIZES = [0, 1, 7, 1003]
# Elementwise combines mirror the reference's fp32 operations one by one: identical values expected
# (the 1-ulp bar is for the GPU, where float64 reductions may sum in another order).
EXACT = 0
# (input dtype, output dtype): same-dtype merges, widening and narrowing outputs
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]
DTYPE_IDS = [f"{a}-to-{b}".replace("torch.", "") for a, b in DTYPES]


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES, ids=DTYPE_IDS)
def test_linear(interpreted_backend, count, in_dtype, out_dtype):
    cases.check_linear(interpreted_backend, count, in_dtype, out_dtype, ulps=EXACT)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("consensus,normalize", [(None, False), (None, True), ("sum", True), ("count", False)])
def test_gta(interpreted_backend, count, in_dtype, out_dtype, consensus, normalize):
    cases.check_gta(interpreted_backend, count, in_dtype, out_dtype, consensus, normalize, ulps=EXACT)


@pytest.mark.parametrize("models", [1, 2, 4])
def test_gta_model_counts(interpreted_backend, models):
    cases.check_gta(interpreted_backend, 257, torch.bfloat16, torch.bfloat16, "sum", True, models=models,
                    ulps=EXACT)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_histograms_identical(interpreted_backend, count, in_dtype):
    cases.check_histograms(interpreted_backend, count, in_dtype)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_select(interpreted_backend, count, in_dtype, special):
    cases.check_select(interpreted_backend, count, in_dtype, special)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_masked_l1(interpreted_backend, count, in_dtype):
    cases.check_masked_l1(interpreted_backend, count, in_dtype)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_delta_gram(interpreted_backend, count, in_dtype):
    cases.check_delta_gram(interpreted_backend, count, in_dtype)


# (rows, row_length): no rows, scalars, a vector (rows of one element), one row, a matrix
ROW_SHAPES = [(0, 5), (1, 1), (7, 1), (1, 7), (13, 77)]


@pytest.mark.parametrize("rows,row_length", ROW_SHAPES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES[:4], ids=DTYPE_IDS[:4])
def test_model_stock(interpreted_backend, rows, row_length, in_dtype, out_dtype):
    cases.check_model_stock(interpreted_backend, rows, row_length, in_dtype, out_dtype, ulps=EXACT)


@pytest.mark.parametrize("rows,row_length", ROW_SHAPES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES[:4], ids=DTYPE_IDS[:4])
def test_slerp(interpreted_backend, rows, row_length, in_dtype, out_dtype):
    cases.check_slerp(interpreted_backend, rows, row_length, in_dtype, out_dtype)


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES, ids=DTYPE_IDS)
def test_fisher(interpreted_backend, count, in_dtype, out_dtype):
    cases.check_fisher(interpreted_backend, count, in_dtype, out_dtype, ulps=EXACT)


@pytest.mark.parametrize("out_dtype,step", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_rounding_is_to_nearest_even(interpreted_backend, out_dtype, step):
    """Hand-computed: values halfway between two representable outputs round to the even one,
    others to the nearest; overflow gives inf."""
    half = step / 2
    values = torch.tensor([1 + half, 1 + 3 * half, -(1 + half), 1 + half * 1.25, 1 + half * 0.75, 3.5e38],
                          dtype=torch.float32)
    expected = torch.tensor([1.0, 1 + 2 * step, -1.0, 1 + step, 1.0, float("inf")]).to(out_dtype)
    actual = torch.empty(values.numel(), dtype=out_dtype)
    interpreted_backend.linear(actual, [values], [1.0])
    assert torch.equal(actual.view(torch.int16), expected.view(torch.int16))
