"""Bad inputs for the kernels: misaligned and non-contiguous buffers, writes past a chunk's ends,
rejected arguments, thread-count independence, and the reference fallback without the library."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys

import pytest
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends import cpu, native
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, ReferenceBackend, Sparsify

from .conftest import assert_identical, make_inputs

reference = ReferenceBackend()


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
def test_misaligned_buffers_give_the_same_result(backend, dtype, code):
    count = 4099
    base, models = make_inputs(count, dtype, 2, seed=3)
    rules = (Sparsify("band", 0x3C000000, NO_UPPER_KEY), Sparsify("random", philox_key=(9, 8), threshold=1 << 23))
    spec = GtaSpec((1.0, 0.5), rules, "sum", True, 1.0)
    expected = torch.empty(count, dtype=dtype)
    reference.gta(expected, base, models, spec, 0)
    alive: list = []
    pointers = (ctypes.c_void_p * 2)(*[misaligned_copy(m, alive) for m in models])
    out_address = misaligned_copy(torch.zeros(count, dtype=dtype), alive)
    structs = (cpu.SparsifyStruct * 2)(*[cpu._sparsify(rule) for rule in rules])
    status = cpu._lib().dtm_gta(out_address, code, misaligned_copy(base, alive), pointers, code, 2,
                                (ctypes.c_float * 2)(1.0, 0.5), structs, 1, 1, 1.5, 1.0, 0, count)
    assert status == 0
    out_bytes = torch.empty(count * expected.element_size(), dtype=torch.uint8)
    ctypes.memmove(out_bytes.data_ptr(), out_address, out_bytes.numel())
    assert_identical(out_bytes.view(dtype), expected)


@pytest.mark.parametrize("count", [0, 1, 7, 2047, 2048, 2049, 2048 * 8 + 1])
def test_no_write_outside_the_chunk(backend, count):
    base, models = make_inputs(count, torch.bfloat16, 3, seed=count, special=False)
    guarded = torch.full((count + 2,), 96.0, dtype=torch.bfloat16)  # sentinels on both sides
    out = guarded[1:count + 1]
    spec = GtaSpec((1.0,) * 3, (Sparsify("random", philox_key=(1, 1), threshold=1 << 23),) * 3, "sum", True, 1.0)
    backend.gta(out, base, models, spec, 3)
    backend.linear(out, models, [0.5, 0.25, 0.25])
    backend.model_stock_combine(out, base, models, 0.5)
    assert float(guarded[0]) == 96.0 and float(guarded[-1]) == 96.0
    expected = torch.empty(count, dtype=torch.bfloat16)
    reference.model_stock_combine(expected, base, models, 0.5)
    assert_identical(out, expected)


def test_non_contiguous_inputs_and_output(backend):
    base, models = make_inputs(2 * 4099, torch.float16, 2, seed=4)
    strided_base, strided_models = base[::2], [m[::2] for m in models]
    out_storage = torch.zeros(2 * 4099, dtype=torch.float32)
    out = out_storage[1::2]
    spec = GtaSpec((0.3, 0.7), (Sparsify(), Sparsify("band", 0x3A000000, NO_UPPER_KEY)), None, False, 1.0)
    backend.gta(out, strided_base, strided_models, spec, 0)
    expected = torch.empty(4099, dtype=torch.float32)
    reference.gta(expected, strided_base.contiguous(), [m.contiguous() for m in strided_models], spec, 0)
    assert_identical(out, expected)
    assert torch.count_nonzero(out_storage[0::2]) == 0  # the gaps are untouched


def test_mixed_and_unsupported_dtypes_follow_the_reference(backend):
    base, models = make_inputs(1023, torch.float32, 2, seed=6)
    mixed = [models[0].to(torch.bfloat16), models[1].to(torch.float16)]
    for inputs, out_dtype in [(mixed, torch.bfloat16), ([m.double() for m in models], torch.float64)]:
        actual, expected = torch.empty(1023, dtype=out_dtype), torch.empty(1023, dtype=out_dtype)
        backend.linear(actual, inputs, [0.5, 0.5])
        reference.linear(expected, inputs, [0.5, 0.5])
        assert_identical(actual, expected)


def test_bad_arguments_are_refused(backend):
    base, models = make_inputs(10, torch.bfloat16, 1, seed=1)
    with pytest.raises(ValueError, match="elements"):
        backend.linear(torch.empty(9, dtype=torch.bfloat16), models, [1.0])
    bad_rule = Sparsify("random", philox_key=(1, 2), threshold=(1 << 24) + 1)
    with pytest.raises(ValueError, match="rejected"):
        backend.gta(torch.empty(10, dtype=torch.bfloat16), base, models, GtaSpec((1.0,), (bad_rule,), None, False, 1.0), 0)
    with pytest.raises(ValueError, match="unknown sparsification"):
        backend.masked_l1(base, models[0], Sparsify("bogus"), 0)
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
    base, models = make_inputs(101, torch.bfloat16, 2, seed=2)
    out, expected = torch.empty(101, dtype=torch.bfloat16), torch.empty(101, dtype=torch.bfloat16)
    spec = GtaSpec((1.0, 1.0), (Sparsify(),) * 2, None, False, 1.0)  # task arithmetic: b + d0 + d1
    chosen.gta(out, base, models, spec, 0)
    b32 = base.float()
    expected = (b32 + ((models[0].float() - b32) + (models[1].float() - b32))).bfloat16()
    assert_identical(out, expected)


def test_stale_library_is_rejected(monkeypatch):
    if cpu.unavailable_reason() is not None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 100)
    monkeypatch.setattr(native, "_looked", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_problem", None)
    assert "ABI version" in cpu.unavailable_reason()
