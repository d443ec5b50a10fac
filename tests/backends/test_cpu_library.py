"""The native library itself: the C entry points on misaligned raw buffers and bad arguments, results
independent of the thread count, the reference fallback when the library is missing, and a stale
library refused (the cases every backend shares are in the other files of this suite)."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys

import pytest
import torch

from dtm_fast.bench.chunk_inputs import chunk_inputs
from dtm_fast.merge.backends import cpu, native
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, Sparsify

from . import cases
from .conftest import cpu_isas


@pytest.fixture(params=cpu_isas())
def native_backend(request):
    """The cpu backend running the kernels of each instruction set this CPU has."""
    problem = cpu.unavailable_reason()
    if problem is not None:
        pytest.skip(f"native kernels not built: {problem}")
    cpu.set_kernels_isa(request.param)
    yield cpu.CpuBackend()
    cpu.set_kernels_isa(cpu_isas()[-1])

def misaligned_copy(tensor: torch.Tensor, keep_alive: list) -> int:
    """Address of a copy of `tensor`'s bytes placed one byte past an aligned address."""
    raw = tensor.contiguous().view(torch.uint8)
    buffer = torch.zeros(raw.numel() + 64, dtype=torch.uint8)
    address = buffer.data_ptr()
    offset = (64 - address % 64) % 64 + 1
    buffer[offset:offset + raw.numel()] = raw
    keep_alive.append(buffer)
    return address + offset


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 2), (torch.float16, 1), (torch.float32, 0)])
def test_misaligned_buffers_give_the_same_result(native_backend, dtype, code):
    count = 4099
    base, models = chunk_inputs(count, dtype, 2, seed=3, special=True)
    rules = (Sparsify("band", 0x3C000000, NO_UPPER_KEY), Sparsify("random", philox_key=(9, 8), threshold=1 << 23))
    spec = GtaSpec((1.0, 0.5), rules, "sum", True, 1.0)
    expected = torch.empty(count, dtype=dtype)
    cases.REFERENCE.gta(expected, base, models, spec, 0)
    alive: list = []
    pointers = (ctypes.c_void_p * 2)(*[misaligned_copy(m, alive) for m in models])
    out_address = misaligned_copy(torch.zeros(count, dtype=dtype), alive)
    structs = (cpu.SparsifyStruct * 2)(*[cpu._sparsify(rule) for rule in rules])
    status = cpu._lib().dtm_gta(out_address, code, misaligned_copy(base, alive), pointers, code, 2,
                                (ctypes.c_float * 2)(1.0, 0.5), structs, 1, 1, 1.5, 1.0, 0, count)
    assert status == 0
    out_bytes = torch.empty(count * expected.element_size(), dtype=torch.uint8)
    ctypes.memmove(out_bytes.data_ptr(), out_address, out_bytes.numel())
    cases.assert_within_ulps(out_bytes.view(dtype), expected)


def test_bad_arguments_are_refused(native_backend):
    base, models = chunk_inputs(10, torch.bfloat16, 1, seed=1)
    with pytest.raises(ValueError, match="elements"):
        native_backend.linear(torch.empty(9, dtype=torch.bfloat16), models, [1.0])
    bad_rule = Sparsify("random", philox_key=(1, 2), threshold=(1 << 24) + 1)
    with pytest.raises(ValueError, match="rejected"):
        native_backend.gta(torch.empty(10, dtype=torch.bfloat16), base, models, GtaSpec((1.0,), (bad_rule,), None, False, 1.0), 0)
    with pytest.raises(ValueError, match="unknown sparsification"):
        native_backend.masked_l1(base, models[0], Sparsify("bogus"), 0)
    assert cpu._lib().dtm_linear(None, 7, None, 2, 0, None, 0) == 1  # unknown dtype code


THREAD_SCRIPT = r"""
import hashlib, sys, torch
from dtm_fast.merge import rng
from dtm_fast.merge.backends.cpu import CpuBackend
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, Sparsify
backend = CpuBackend()
g = torch.Generator().manual_seed(0)
n = 2048 * 40 + 3
base = torch.randn(n, generator=g).bfloat16()
models = [(base.float() + torch.randn(n, generator=g) * 1e-2).bfloat16() for _ in range(3)]
rules = (Sparsify("band", 0x3C000000, NO_UPPER_KEY), Sparsify("random", philox_key=(5, 6), threshold=1 << 22, scale=4.0), Sparsify())
out = torch.empty(n, dtype=torch.bfloat16)
backend.gta(out, base, models, GtaSpec((1.0, 0.5, 0.25), rules, "sum", True, 1.0), 1 << 33)
histogram = torch.zeros(1 << 16, dtype=torch.int64)
backend.abs_delta_histogram(base, models[0], histogram, None)
l1 = backend.masked_l1(base, models[1], rules[1], 17)
gram = backend.delta_gram(base, models)
rows = torch.empty(n - 3, dtype=torch.float32)
backend.model_stock_rows(rows, base[:-3], [m[:-3] for m in models], 2048)
digest = hashlib.sha256()
for tensor in (out.view(torch.int16), histogram, torch.from_numpy(gram), rows):
    digest.update(tensor.numpy().tobytes())
digest.update(repr(l1).encode())
print(digest.hexdigest())
"""


def test_results_do_not_depend_on_thread_count():
    if cpu.unavailable_reason() is not None:
        pytest.skip(f"native kernels not built: {cpu.unavailable_reason()}")
    digests = []
    for threads in ("1", "2"):
        environment = dict(os.environ, OMP_NUM_THREADS=threads)
        result = subprocess.run([sys.executable, "-c", THREAD_SCRIPT], env=environment, capture_output=True,
                                text=True, timeout=120, check=True)
        digests.append(result.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64


@pytest.fixture
def library_missing(monkeypatch, tmp_path):
    """native.py sees no library anywhere; its cached answer is restored afterwards."""
    monkeypatch.setattr(native, "_candidate_paths", lambda: [tmp_path / "nowhere" / native.LIBRARY_NAME])
    monkeypatch.setattr(native, "_looked", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_problem", None)
    import dtm_fast.merge.backends.triton_backend as triton_backend

    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda: "no CUDA in this test")


def test_missing_library_falls_back_to_reference(library_missing, caplog):
    from dtm_fast.errors import DtmError
    from dtm_fast.merge.backends import select_backend

    assert "not found" in cpu.unavailable_reason()
    with caplog.at_level(logging.WARNING):
        chosen = select_backend("auto")
    assert chosen.name == "reference"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not found" in warnings[0]
    with pytest.raises(DtmError, match="--backend cpu"):
        select_backend("cpu")
    base, models = chunk_inputs(101, torch.bfloat16, 2, seed=2)
    out, expected = torch.empty(101, dtype=torch.bfloat16), torch.empty(101, dtype=torch.bfloat16)
    spec = GtaSpec((1.0, 1.0), (Sparsify(),) * 2, None, False, 1.0)  # task arithmetic: b + d0 + d1
    chosen.gta(out, base, models, spec, 0)
    b32 = base.float()
    expected = (b32 + ((models[0].float() - b32) + (models[1].float() - b32))).bfloat16()
    cases.assert_within_ulps(out, expected)


def test_stale_library_is_rejected(monkeypatch):
    if cpu.unavailable_reason() is not None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 100)
    monkeypatch.setattr(native, "_looked", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_problem", None)
    assert "ABI version" in cpu.unavailable_reason()


def test_every_declared_native_operation_is_bound(native_backend):
    """Each operation of kernels/ops_list.h that the reference defines is run by the kernels: a
    parameter-name mismatch would silently fall back to the reference."""
    from dtm_fast.merge.backends.reference import ReferenceBackend

    declared = {name.removeprefix("dtm_") for name in native.operations()}
    chunk_operations = {name for name in declared if hasattr(ReferenceBackend, name)}
    assert {"linear", "gta", "abs_delta_histogram", "abs_delta_select", "count_nonfinite"} <= chunk_operations
    assert chunk_operations <= native_backend.accelerated
