"""One backend test suite: the same cases run on every backend this machine can run.

`backend` is each backend in turn: the reference (the specification), the native cpu kernels for
each instruction set this CPU has, Triton under its interpreter (only in the process that sets
TRITON_INTERPRET=1 before triton is imported: the Makefile's second pytest run, `-m
triton_interpret`), and Triton on CUDA when there is a GPU. `accelerated` is every one but the
reference: the cases that compare a backend with the reference cannot test the reference itself,
which the known-answer cases (hand-computed values, published test vectors, plain torch) do.

Each backend comes as a Subject: its operations plus the scale it is tested at (the interpreter is
slow, a GPU needs many programs) and how close to the reference it must be (0 units in the last
place: identical; a GPU may sum float64 reductions in another order, so 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# named sizes, so one list of cases reads the same on every backend; each backend maps a name to
# the element count that exercises that path in its kernels
SIZE_NAMES = ("empty", "one", "odd", "block-1", "block+1", "many-blocks")
CPU_SIZES = {"empty": 0, "one": 1, "odd": 7, "block-1": 2047, "block+1": 2049, "many-blocks": 2048 * 9 + 5}
INTERPRETER_SIZES = {"empty": 0, "one": 1, "odd": 7, "block-1": 1023, "block+1": 1025, "many-blocks": 3 * 1024 + 5}
GPU_SIZES = {"empty": 0, "one": 1, "odd": 7, "block-1": 1023, "block+1": 1025, "many-blocks": (1 << 20) + 3}


@dataclass
class Subject:
    name: str
    ops: object
    sizes: dict[str, int]
    ulps: int = 0          # elementwise combines: how far from the reference, in output ulps
    isa: str | None = None  # the native kernels' instruction set, re-selected before each test
    extra: dict = field(default_factory=dict)

    def size(self, name: str) -> int:
        return self.sizes[name]

    def __getattr__(self, attribute):  # a Subject is used like the backend it wraps
        return getattr(self.ops, attribute)


def cpu_isas() -> list[str]:
    from dtm_fast.merge.backends import cpu

    if cpu.unavailable_reason() is not None:
        return ["generic"]
    supported = []
    for name in ("generic", "avx2", "avx512"):
        try:
            cpu.set_kernels_isa(name)
            supported.append(name)
        except ValueError:
            pass
    cpu.set_kernels_isa(supported[-1])
    return supported


def _reference() -> Subject:
    from dtm_fast.merge.backends.reference import ReferenceBackend

    return Subject("reference", ReferenceBackend(), CPU_SIZES)


def _cpu(isa: str) -> Subject:
    from dtm_fast.merge.backends import cpu

    problem = cpu.unavailable_reason()
    if problem is not None:
        pytest.skip(f"native kernels not built: {problem}")
    cpu.set_kernels_isa(isa)
    return Subject(f"cpu-{isa}", cpu.CpuBackend(), CPU_SIZES, isa=isa)


def _triton_interpreted() -> Subject:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter cases need TRITON_INTERPRET=1 set before triton is imported "
                    "(TRITON_INTERPRET=1 python -m pytest -m triton_interpret)")
    from dtm_fast.merge.backends.triton_backend import TritonBackend

    return Subject("triton-interpret", TritonBackend(), INTERPRETER_SIZES)


def _triton_cuda() -> Subject:
    pytest.importorskip("triton")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: kernels would be interpreted, not run on the GPU")
    from dtm_fast.merge.backends.triton_backend import TritonBackend

    return Subject("triton-cuda", TritonBackend(), GPU_SIZES, ulps=1)


def _accelerated_params() -> list:
    import torch

    params = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in cpu_isas()]
    params.append(pytest.param(("triton-interpret", None), id="triton-interpret", marks=pytest.mark.triton_interpret))
    if torch.cuda.is_available():  # without a GPU these cases are not generated, rather than skipped by the hundred
        params.append(pytest.param(("triton-cuda", None), id="triton-cuda", marks=pytest.mark.gpu))
    return params


def _build(kind: str, isa: str | None) -> Subject:
    return {"reference": lambda: _reference(), "cpu": lambda: _cpu(isa),
            "triton-interpret": _triton_interpreted, "triton-cuda": _triton_cuda}[kind]()


_subjects: dict = {}


def _subject(request) -> Subject:
    kind, isa = request.param
    if (kind, isa) not in _subjects:
        _subjects[(kind, isa)] = _build(kind, isa)
    subject = _subjects[(kind, isa)]
    if subject.isa is not None:
        from dtm_fast.merge.backends import cpu

        cpu.set_kernels_isa(subject.isa)
    return subject


@pytest.fixture(params=[pytest.param(("reference", None), id="reference")] + _accelerated_params())
def backend(request) -> Subject:
    """Every backend, the reference included: for known-answer cases."""
    return _subject(request)


@pytest.fixture(params=_accelerated_params())
def accelerated(request) -> Subject:
    """Every backend but the reference: for cases whose oracle is the reference."""
    return _subject(request)


def pytest_collection_modifyitems(items):
    # numpy, which runs interpreted kernels, warns about the NaN and inf - inf these cases feed it on purpose
    for item in items:
        if "triton-interpret" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"))
