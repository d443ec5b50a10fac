"""Memory layouts and call sequences a backend must not get wrong: strided and misaligned views,
writes confined to the chunk, buffers reused across calls of other sizes and dtypes, models stored
in different dtypes."""

from __future__ import annotations

import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, Sparsify

from . import cases


def test_strided_and_misaligned_views(accelerated):
    """Views of stride 2, and views starting one element (2 bytes) into their storage, the output too."""
    count = accelerated.size("block+1")
    base, models = chunk_inputs(2 * count, torch.bfloat16, 3, seed=29, special=True)
    strided = [m[::2] for m in models]
    misaligned = [m[1:count + 1] for m in models]
    spec = GtaSpec(weights=(1.0, 0.5, 0.25), sparsify=tuple(cases.band_rules(base[::2], strided)),
                   consensus="sum", normalize=True, lambda_=1.0)
    for inputs, base_view in [(strided, base[::2]), (misaligned, base[1:count + 1])]:
        expected = torch.empty(count, dtype=torch.bfloat16)
        actual = torch.empty(count + 1, dtype=torch.bfloat16)[1:]
        cases.REFERENCE.gta(expected, base_view.contiguous(), [m.contiguous() for m in inputs], spec, 5)
        accelerated.gta(actual, base_view, inputs, spec, 5)
        cases.assert_within_ulps(actual, expected, accelerated.ulps)
        cases.REFERENCE.linear(expected, [m.contiguous() for m in inputs], [0.25, 0.25, 0.5])
        accelerated.linear(actual, inputs, [0.25, 0.25, 0.5])
        cases.assert_within_ulps(actual, expected, accelerated.ulps)


def test_strided_output_leaves_the_gaps_alone(accelerated):
    count = accelerated.size("many-blocks")
    base, models = chunk_inputs(2 * count, torch.float16, 2, seed=4, special=True)
    out_storage = torch.zeros(2 * count, dtype=torch.float32)
    spec = GtaSpec((0.3, 0.7), (Sparsify(), Sparsify("band", 0x3A000000, NO_UPPER_KEY)), None, False, 1.0)
    accelerated.gta(out_storage[1::2], base[::2], [m[::2] for m in models], spec, 0)
    expected = torch.empty(count, dtype=torch.float32)
    cases.REFERENCE.gta(expected, base[::2].contiguous(), [m[::2].contiguous() for m in models], spec, 0)
    cases.assert_within_ulps(out_storage[1::2].contiguous(), expected, accelerated.ulps)
    assert torch.count_nonzero(out_storage[0::2]) == 0


def test_no_write_outside_the_chunk(accelerated):
    for size in ("empty", "one", "odd", "block-1", "block+1", "many-blocks"):
        count = accelerated.size(size)
        base, models = chunk_inputs(count, torch.bfloat16, 3, seed=count)
        guarded = torch.full((count + 2,), 96.0, dtype=torch.bfloat16)  # sentinels on both sides
        out = guarded[1:count + 1]
        rule = Sparsify("random", philox_key=(1, 1), threshold=1 << 23)
        accelerated.gta(out, base, models, GtaSpec((1.0,) * 3, (rule,) * 3, "sum", True, 1.0), 3)
        accelerated.linear(out, models, [0.5, 0.25, 0.25])
        accelerated.model_stock_combine(out, base, models, 0.5)
        assert float(guarded[0]) == 96.0 and float(guarded[-1]) == 96.0, size
        expected = torch.empty(count, dtype=torch.bfloat16)
        cases.REFERENCE.model_stock_combine(expected, base, models, 0.5)
        cases.assert_within_ulps(out, expected, accelerated.ulps)


def test_reused_buffers_do_not_leak_between_calls(accelerated):
    """A large chunk, then smaller ones with other model counts and dtypes, through the same buffers."""
    large = accelerated.size("many-blocks")
    for count, models, dtype in [(large, 4, torch.bfloat16), (7, 2, torch.bfloat16), (300, 3, torch.float32),
                                 (1, 1, torch.float16), (large, 4, torch.bfloat16)]:
        cases.check_linear(accelerated, count, dtype, dtype, models=models)
        cases.check_gta(accelerated, count, dtype, torch.bfloat16, "sum", True, models=models)
        cases.check_histograms(accelerated, count, dtype)


def test_models_in_different_dtypes(accelerated):
    """Models stored in different dtypes are combined after widening, as the reference does; a dtype
    no kernel takes (float64) goes to the reference."""
    base, models = chunk_inputs(1023, torch.float32, 3, seed=31)
    mixed = [models[0].bfloat16(), models[1].half(), models[2]]
    spec = GtaSpec((1.0, 1.0, 1.0), (Sparsify(),) * 3, "sum", True, 1.0)
    expected, actual = cases.outputs(1023, torch.bfloat16)
    cases.REFERENCE.gta(expected, base.bfloat16(), mixed, spec, 0)
    accelerated.gta(actual, base.bfloat16(), mixed, spec, 0)
    cases.assert_within_ulps(actual, expected, accelerated.ulps)
    for inputs, out_dtype in [(mixed[:2], torch.bfloat16), ([m.double() for m in models[:2]], torch.float64)]:
        expected, actual = cases.outputs(1023, out_dtype)
        cases.REFERENCE.linear(expected, inputs, [0.5, 0.5])
        accelerated.linear(actual, inputs, [0.5, 0.5])
        cases.assert_within_ulps(actual, expected, accelerated.ulps)
