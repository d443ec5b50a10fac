"""The per-row operations (model stock filter_wise, SLERP) of every accelerated backend against the
reference, within one unit in the last place (their norms are float64 sums in another order)."""

from __future__ import annotations

import pytest
import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs

from . import cases

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rows, row_length): no rows, scalars, a vector (rows of one element), one row, past a block, a matrix
ROW_SHAPES = [(0, 5), (1, 1), (7, 1), (1, 7), (3, 7), (5, 2049), (40, 517)]
LARGE_ROW_SHAPES = [(4096, 1), (64, 5632), (3, 70001)]  # on a GPU: many programs per row and rows per program


def row_shapes(backend):
    return ROW_SHAPES + (LARGE_ROW_SHAPES if backend.name == "triton-cuda" else [])


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_model_stock_rows(accelerated, in_dtype, out_dtype):
    for rows, row_length in row_shapes(accelerated):
        cases.check_model_stock_rows(accelerated, rows, row_length, in_dtype, out_dtype)


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_slerp_rows(accelerated, in_dtype, out_dtype):
    for rows, row_length in row_shapes(accelerated):
        cases.check_slerp_rows(accelerated, rows, row_length, in_dtype, out_dtype)


def test_row_operations_propagate_nan(accelerated):
    base, models = chunk_inputs(3 * 517, torch.float32, 2, seed=3, special=True)
    for operation, args in [("model_stock_rows", (base, models, 517)), ("slerp_rows", (base, models[0], 517, 0.4))]:
        expected, actual = cases.outputs(3 * 517, torch.float32)
        getattr(cases.REFERENCE, operation)(expected, *args)
        getattr(accelerated, operation)(actual, *args)
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), operation


def test_slerp_rows_known_values(backend):
    """Hand-computed: orthogonal unit rows at t = 0.5 meet at 45 degrees, (1/sqrt 2, 1/sqrt 2);
    collinear rows interpolate linearly."""
    first = torch.tensor([1.0, 0.0, 1.0, 2.0])
    second = torch.tensor([0.0, 1.0, 3.0, 6.0])
    out = torch.empty(4)
    backend.slerp_rows(out, first, second, 2, 0.5)
    half = 2 ** -0.5
    torch.testing.assert_close(out, torch.tensor([half, half, 2.0, 4.0]), rtol=1e-6, atol=1e-7)
