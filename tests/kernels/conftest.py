"""Shared inputs for the native-kernel tests: every CpuBackend operation is compared with
ReferenceBackend (the specification) on random chunks of odd sizes, with NaN/Inf planted."""

from __future__ import annotations

import pytest
import torch

from dtm_fast.merge.backends import cpu
from dtm_fast.merge.magnitude import magnitude_keys

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 0, 1, odd sizes, a tile boundary (2048) +-1 and sizes large enough for the OpenMP path (>= 8 tiles)
SIZES = [0, 1, 7, 1023, 2049, 4099, 2048 * 9 + 5]
ULP_EXPONENT = {torch.bfloat16: -7, torch.float16: -10, torch.float32: -23}


def supported_isas() -> list[str]:
    if cpu.unavailable_reason() is not None:
        return ["generic"]
    supported = []
    for name in ("generic", "avx2", "avx512"):
        try:
            cpu.set_kernels_isa(name)
            supported.append(name)
        except ValueError:
            pass
    return supported


@pytest.fixture(params=supported_isas())
def backend(request):
    """A CpuBackend running the kernels of each instruction set this CPU has."""
    problem = cpu.unavailable_reason()
    if problem is not None:
        pytest.skip(f"native kernels not built: {problem}")
    cpu.set_kernels_isa(request.param)
    yield cpu.CpuBackend()
    cpu.set_kernels_isa(supported_isas()[-1])


def make_inputs(count: int, dtype: torch.dtype, models: int, seed: int, special: bool = True):
    """base and models = base + noise, with NaN, +-Inf, unchanged elements and -0 planted."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=generator)
    tensors = []
    for index in range(models):
        scale = 10.0 ** -torch.randint(1, 4, (count,), generator=generator).float()
        model = base + torch.randn(count, generator=generator) * scale
        if special and count >= 7:
            positions = torch.randperm(count, generator=generator)[:max(5, count // 200)]
            model[positions[0]] = float("nan")
            model[positions[1]] = float("inf")
            model[positions[2]] = float("-inf")
            model[positions[3:]] = base[positions[3:]]  # zero deltas: sign ties in TIES' election
            if index == 0:
                model[positions[4]] = -0.0
        tensors.append(model.to(dtype))
    if special and count >= 11:
        base[count // 3] = float("nan")
        base[count // 2] = float("inf")
    return base.to(dtype), tensors


def key_quantile(base: torch.Tensor, model: torch.Tensor, q: float) -> int:
    keys = magnitude_keys(model.float() - base.float()).double()
    return int(torch.quantile(keys, q)) if keys.numel() else 0


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same values (+0 == -0) and NaN in the same places."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.float(), expected.float()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN positions differ"
    keep = ~torch.isnan(e)
    difference = (a[keep] != e[keep]).nonzero()
    assert difference.numel() == 0, (f"{difference.numel()} elements differ, first at {int(difference[0])}: "
                                     f"{float(a[keep][difference[0]])} vs {float(e[keep][difference[0]])}")


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    """Within `ulps` units in the last place of the output dtype, NaN in the same places."""
    a, e = actual.float(), expected.float()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN positions differ"
    keep = torch.isfinite(e)
    assert torch.equal(a[~keep & ~torch.isnan(e)], e[~keep & ~torch.isnan(e)]), "infinities differ"
    magnitude = e[keep].abs().clamp(min=torch.finfo(expected.dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude)) + ULP_EXPONENT[expected.dtype])
    assert bool(((a[keep] - e[keep]).abs() <= ulps * ulp).all())
