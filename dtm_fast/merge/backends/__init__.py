"""Compute backends for the merger's chunk operations.

`reference` (plain torch, fp32) is the definition; `cpu` (libdtm_kernels: C++, OpenMP) and
`triton` (CUDA) override it operation by operation and are tested against it.
auto: triton when CUDA and triton are usable, else cpu when the native library loads, else reference.
"""

from __future__ import annotations

import logging

from dtm_fast.errors import DtmError

log = logging.getLogger(__name__)
BACKEND_NAMES = ("auto", "reference", "cpu", "triton")


def select_backend(name: str = "auto"):
    """Return a backend instance; an explicitly requested backend that cannot run is an error."""
    if name not in BACKEND_NAMES:
        raise DtmError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "reference":
        from dtm_fast.merge.backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name in ("auto", "triton"):
        from dtm_fast.merge.backends import triton_backend

        problem = triton_backend.unavailable_reason()
        if problem is None:
            return triton_backend.TritonBackend()
        if name == "triton":
            raise DtmError(f"--backend triton cannot run here: {problem}")
    from dtm_fast.merge.backends import cpu

    problem = cpu.unavailable_reason()
    if problem is None:
        return cpu.CpuBackend()
    if name == "cpu":
        raise DtmError(f"--backend cpu cannot run here: {problem}")
    log.warning("native kernels unavailable (%s); using the reference backend, which is slower", problem)
    from dtm_fast.merge.backends.reference import ReferenceBackend

    return ReferenceBackend()
