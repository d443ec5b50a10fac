"""Bit-exact DARE masks, NaN/Inf propagation, odd memory layouts and buffer reuse of the Triton
backend, run by Triton's interpreter on CPU (TRITON_INTERPRET=1, see conftest)."""

import pytest
import torch

pytest.importorskip("triton")

import triton_cases as cases  # noqa: E402

from dtm_fast.merge.backends.reference import GtaSpec, ReferenceBackend, Sparsify  # noqa: E402
from dtm_fast.merge.magnitude import RadixSearch, kth_largest_key_in_memory, magnitude_keys  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # numpy, which runs the interpreted kernels, warns about the NaN these tests feed it on purpose
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


@pytest.mark.parametrize("start", [0, 999, (1 << 32) - 5, (3 << 32) + 17])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_masks_bit_identical_to_rng(interpreted_backend, start, density):
    # (1 << 32) - 5 with 1000 elements crosses a carry into the counter's high word
    cases.check_dare_masks(interpreted_backend, 1000, start, density)


def test_philox_known_answer(interpreted_backend):
    """Random123's published Philox4x32-10 vector: counter 0, key 0 -> word 0 = 0x6627e8d5; element 0 is
    kept iff 0x6627e8 (word 0 >> 8) < threshold."""
    spec = lambda threshold: GtaSpec(weights=(1.0,), consensus=None, normalize=False, lambda_=1.0,  # noqa: E731
                                     sparsify=(Sparsify("random", philox_key=(0, 0), threshold=threshold),))
    for threshold, kept in [(0x6627E8, 0.0), (0x6627E9, 1.0)]:
        out = torch.empty(1)
        interpreted_backend.gta(out, torch.zeros(1), [torch.ones(1)], spec(threshold), 0)
        assert out.item() == kept


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_nan_and_inf_propagate_as_in_reference(interpreted_backend, in_dtype, out_dtype):
    for count in (7, 1003):
        cases.check_linear(interpreted_backend, count, in_dtype, out_dtype, special=True)
        for consensus, normalize in [(None, False), ("sum", True), ("count", True)]:
            cases.check_gta(interpreted_backend, count, in_dtype, out_dtype, consensus, normalize, special=True)
        cases.check_fisher(interpreted_backend, count, in_dtype, out_dtype, special=True)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_histograms_with_nan_and_inf_identical(interpreted_backend, in_dtype):
    # fp16 is left out on purpose: torch's own fp16 -> fp32 conversion keeps a NaN's payload in its
    # vectorised body and returns 0x7fffffff in its scalar tail, so the reference's keys depend on position
    cases.check_histograms(interpreted_backend, 1003, in_dtype, special=True)


def test_nan_payload_keys_follow_the_reference(interpreted_backend):
    """Keys of NaN deltas: the base's NaN wins over the model's, inf - inf is the default NaN."""
    bits = torch.tensor([0x7FC00005, 0x7F800001, 0x7F800000, 0, -0x3FEDCBA], dtype=torch.int32)
    base_bits = torch.tensor([0x7FC00777, 0, 0x7F800000, -0x5FFFFFFD, 0], dtype=torch.int32)
    model, base = bits.view(torch.float32), base_bits.view(torch.float32)
    expected, actual = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
    ReferenceBackend().abs_delta_histogram(base, model, expected, None)
    interpreted_backend.abs_delta_histogram(base, model, actual, None)
    assert torch.equal(actual, expected)
    assert int(actual[0x7FC0]) >= 2  # hand-computed: 0x7fc00777 and inf - inf's 0x7fc00000


def test_radix_select_finds_the_exact_kth_largest(interpreted_backend):
    """Two streamed passes over three chunks give the rank-k key of the whole tensor."""
    base, (model,) = cases.make_inputs(3001, 1, torch.bfloat16, seed=23)
    chunks = [(0, 1000), (1000, 2000), (2000, 3001)]
    for rank in (1, 17, 1500, 3001):
        search = RadixSearch(rank)
        high = torch.zeros(1 << 16, dtype=torch.int64)
        for lo, hi in chunks:
            interpreted_backend.abs_delta_histogram(base[lo:hi], model[lo:hi], high, None)
        search.locate_bucket(high)
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for lo, hi in chunks:
            interpreted_backend.abs_delta_histogram(base[lo:hi], model[lo:hi], low, search.bucket)
        search.locate_key(low)
        assert search.key == kth_largest_key_in_memory(magnitude_keys(model.float() - base.float()), rank)


def test_non_contiguous_and_misaligned_inputs(interpreted_backend):
    """Strided views and views starting one element (2 bytes) into their storage."""
    base, models = cases.make_inputs(2 * 501 - 1, 3, torch.bfloat16, seed=29)
    strided = [m[::2] for m in models]  # 501 elements, stride 2
    misaligned = [m[1:502] for m in models]
    spec = GtaSpec(weights=(1.0, 0.5, 0.25), sparsify=tuple(cases.band_rules(base[::2], strided)),
                   consensus="sum", normalize=True, lambda_=1.0)
    for inputs, base_view in [(strided, base[::2]), (misaligned, base[1:502])]:
        expected = torch.empty(501, dtype=torch.bfloat16)
        storage = torch.empty(502, dtype=torch.bfloat16)
        actual = storage[1:]  # the output misaligned too
        cases.REFERENCE.gta(expected, base_view, inputs, spec, 5)
        interpreted_backend.gta(actual, base_view, inputs, spec, 5)
        cases.assert_within_one_ulp(actual, expected)
        cases.REFERENCE.linear(expected, inputs, [0.25, 0.25, 0.5])
        interpreted_backend.linear(actual, inputs, [0.25, 0.25, 0.5])
        cases.assert_within_one_ulp(actual, expected)


def test_reused_buffers_do_not_leak_between_calls(interpreted_backend):
    """A large chunk, then smaller ones with other model counts and dtypes, through the same buffers."""
    for count, models, dtype in [(1003, 4, torch.bfloat16), (7, 2, torch.bfloat16), (300, 3, torch.float32),
                                 (1, 1, torch.float16), (1003, 4, torch.bfloat16)]:
        cases.check_linear(interpreted_backend, count, dtype, dtype, models=models)
        cases.check_gta(interpreted_backend, count, dtype, torch.bfloat16, "sum", True, models=models)
        cases.check_histograms(interpreted_backend, count, dtype)


def test_mixed_input_dtypes(interpreted_backend):
    """Models stored in different dtypes are combined after widening, as the reference does."""
    base, models = cases.make_inputs(333, 3, torch.float32, seed=31)
    models = [models[0].bfloat16(), models[1].half(), models[2]]
    expected, actual = torch.empty(333, dtype=torch.bfloat16), torch.empty(333, dtype=torch.bfloat16)
    spec = GtaSpec((1.0, 1.0, 1.0), (Sparsify(),) * 3, "sum", True, 1.0)
    cases.REFERENCE.gta(expected, base.bfloat16(), models, spec, 0)
    interpreted_backend.gta(actual, base.bfloat16(), models, spec, 0)
    cases.assert_within_one_ulp(actual, expected)


def test_backend_contract_under_the_interpreter(interpreted_backend):
    from dtm_fast.merge.backends import select_backend, triton_backend

    assert triton_backend.unavailable_reason() is None
    assert select_backend("triton").name == "triton"
    assert interpreted_backend.wants_pinned_buffers is False  # nothing is copied to a GPU
    assert interpreted_backend.workspace_bytes_per_element(4) > 0
