"""The one-read counting pass: the native `abs_delta_undecided` gives the same counts and the same
ascending positions as its torch definition (one_read.undecided on a torch backend), on odd sizes,
every float dtype, NaN/inf, overlapping searches of one model, and says when positions overflow."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dtm_fast.merge import one_read
from dtm_fast.merge.magnitude import magnitude_keys
from dtm_fast.merge.specs import NO_UPPER_KEY


def backends():
    from dtm_fast.merge.backends import cpu
    from dtm_fast.merge.backends.reference import ReferenceBackend

    if cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())
    return cpu.CpuBackend(), ReferenceBackend()


def chunk_for(backend, tensors: list[torch.Tensor]):
    from dtm_fast.io.dtypes import tag_of

    views = [backend.view(t.contiguous().view(torch.uint8).numpy(), tag_of(t.dtype)) for t in tensors]
    return SimpleNamespace(base=views[0], models=views[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 2049, 18437, 300_001])  # a chunk is never empty
def test_native_undecided_equals_its_definition(dtype, n):
    native, reference = backends()
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=generator) * 0.02
    models = [base + 1e-3 * torch.randn(n, generator=generator) for _ in range(2)]
    if n > 10:
        models[0][3], models[1][5], base[9] = float("nan"), float("inf"), float("-inf")
    tensors = [t.to(dtype) for t in [base, *models]]
    keys = [magnitude_keys(m.float() - tensors[0].float()) for m in tensors[1:]]
    searches = []
    for index, key in enumerate(keys):  # two overlapping ranges per model, around two quantiles
        ordered = torch.sort(key).values if n else torch.zeros(1, dtype=torch.int64)
        for q in (0.5, 0.9):
            at = min(len(ordered) - 1, int(q * len(ordered)))
            low, high = int(ordered[max(0, at - 50)]), int(ordered[min(len(ordered) - 1, at + 50)])
            searches.append(one_read.Search(index, 1, low, max(low, high)))
    searches.append(one_read.Search(1, 1, 0x7F800000, NO_UPPER_KEY))  # inf and NaN keys
    capacity = max(1, n)
    got = one_read.undecided(native, chunk_for(native, tensors), searches, capacity)
    want = one_read.undecided(reference, chunk_for(reference, tensors), searches, capacity)
    assert got[0] == want[0] and got[2] == want[2]
    assert np.array_equal(got[1], want[1]) and np.all(np.diff(got[1]) > 0)


def test_overflowing_positions_are_reported():
    native, _ = backends()
    n = 100_000
    tensors = [torch.zeros(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)]
    everything = [one_read.Search(0, 1, 0, NO_UPPER_KEY)]
    counts, positions, total = one_read.undecided(native, chunk_for(native, tensors), everything, 1000)
    assert counts == [(0, n)] and total > 1000
    # each of the kernel's blocks has capacity / blocks slots: room for a block of whole tiles
    counts, positions, total = one_read.undecided(native, chunk_for(native, tensors), everything, 2 * n)
    assert total == n and np.array_equal(positions, np.arange(n))
