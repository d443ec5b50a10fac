"""The Triton backend on a real GPU against the reference backend, at sizes that span many programs
and cross the Philox counter's 32-bit boundary. Skipped without CUDA."""

import pytest
import torch

pytest.importorskip("triton")

import triton_cases as cases  # noqa: E402

pytestmark = pytest.mark.gpu

LARGE = (1 << 20) + 3  # many programs, a ragged last block
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
          (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("count", [0, 1, 7, LARGE])
def test_elementwise_combines(cuda_backend, count, in_dtype, out_dtype):
    cases.check_linear(cuda_backend, count, in_dtype, out_dtype)
    for consensus, normalize in [(None, False), ("sum", True), ("count", True)]:
        cases.check_gta(cuda_backend, count, in_dtype, out_dtype, consensus, normalize)
    cases.check_fisher(cuda_backend, count, in_dtype, out_dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", DTYPES)
def test_nan_and_inf(cuda_backend, in_dtype, out_dtype):
    cases.check_linear(cuda_backend, LARGE, in_dtype, out_dtype, special=True)
    cases.check_gta(cuda_backend, LARGE, in_dtype, out_dtype, "sum", True, special=True)
    cases.check_fisher(cuda_backend, LARGE, in_dtype, out_dtype, special=True)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_histograms_identical(cuda_backend, in_dtype):
    cases.check_histograms(cuda_backend, LARGE, in_dtype)
    cases.check_histograms(cuda_backend, LARGE, in_dtype, special=True)  # NaN keys as on x86
    cases.check_select(cuda_backend, LARGE, in_dtype)
    cases.check_select(cuda_backend, LARGE, in_dtype, special=True)


@pytest.mark.parametrize("start", [0, (1 << 32) - 1000, (5 << 32) + 1])
def test_dare_masks_bit_identical(cuda_backend, start):
    cases.check_dare_masks(cuda_backend, LARGE, start, 0.3)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_statistics(cuda_backend, in_dtype):
    cases.check_masked_l1(cuda_backend, LARGE, in_dtype)
    cases.check_delta_gram(cuda_backend, LARGE, in_dtype)
    cases.check_delta_gram(cuda_backend, LARGE, in_dtype, models=6)


@pytest.mark.parametrize("rows,row_length", [(1, 1), (4096, 1), (64, 5632), (3, 70001)])
def test_row_operations(cuda_backend, rows, row_length):
    cases.check_model_stock(cuda_backend, rows, row_length, torch.bfloat16, torch.bfloat16)
    cases.check_slerp(cuda_backend, rows, row_length, torch.bfloat16, torch.bfloat16)
    cases.check_slerp(cuda_backend, rows, row_length, torch.float32, torch.float32)


@pytest.mark.parametrize("method,extra,ulps", [
    ("linear", [], 1),
    ("ties", ["--density", "0.3"], 1),
    ("dare_ties", ["--density", "0.4", "--seed", "5"], 1),
    ("breadcrumbs", ["--density", "0.5", "--gamma", "0.05", "--rescale", "l1"], 1),
    ("model_stock", [], 1),
    ("slerp", ["--t", "0.3"], 1),
])
def test_merge_equals_reference_backend(cuda_backend, large_bf16_family, tmp_path, method, extra, ulps):
    # the same budget gives different chunks: the reference needs host workspace, triton none
    cases.check_merge(large_bf16_family, tmp_path, method, extra, ulps, {"triton": "64MiB", "reference": "64MiB"})
