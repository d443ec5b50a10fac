"""Compute backends for the merger's chunk operations.

`reference` (plain torch, fp32) is the definition and the base class; `cpu` (libdtm_kernels: C++,
OpenMP) and `triton` (CUDA) override it operation by operation and are tested against it.
auto: triton when a GPU is present and triton is usable, else cpu when the native library loads,
else reference. Whether a GPU is present is decided from the device files, without importing torch
(2-4 s of start-up), so a merge on a machine without a GPU never pays for torch.
"""

from __future__ import annotations

import logging

from dtm_fast.errors import DtmError
from dtm_fast.merge.backends.devices import gpu_may_be_present, interpreting

log = logging.getLogger(__name__)
BACKEND_NAMES = ("auto", "reference", "cpu", "triton")


def select_backend(name: str = "auto"):
    """Return a backend instance; an explicitly requested backend that cannot run is an error."""
    if name not in BACKEND_NAMES:
        raise DtmError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "reference":
        from dtm_fast.merge.backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "triton" or (name == "auto" and (interpreting() or gpu_may_be_present())):
        from dtm_fast.merge.backends import triton_backend

        problem = triton_backend.unavailable_reason()
        if problem is None:
            return triton_backend.TritonBackend()
        if name == "triton":
            raise DtmError(f"--backend triton cannot run here: {problem}")
        log.info("GPU backend unavailable (%s); using the cpu backend", problem)
    from dtm_fast.merge.backends import native

    problem = native.unavailable_reason()
    if problem is None:
        from dtm_fast.merge.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "cpu":
        raise DtmError(f"--backend cpu cannot run here: {problem}")
    log.warning("native kernels unavailable (%s); using the reference backend, which is slower", problem)
    from dtm_fast.merge.backends.reference import ReferenceBackend

    return ReferenceBackend()
