"""How many CPU threads torch's kernels get when the user has not said (OMP_NUM_THREADS).

torch starts one OpenMP thread per core. Each parallel region ends when its slowest thread does, so
on a machine whose cores other processes also want, a descheduled thread stalls all the others,
which spin while they wait. Measured on the shared 2-core VM at load average 4-6 (docs/run.md):
one SmolLM2-135M forward of a 115-token prompt took 0.72 s on one thread and 3.2 s on two. Taking
only the cores the load average leaves free avoids that; a quiet machine still gets every core.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def free_cores(cores: int, load: float) -> int:
    """The cores not taken by the load average (rounded), at least one."""
    return max(1, min(cores, int(cores - load + 0.5)))


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads to the free cores unless OMP_NUM_THREADS names a number; the count."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: keep torch's default
        return torch.get_num_threads()
    threads = free_cores(cores, load)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("torch CPU threads: %d of %d cores (load average %.1f; OMP_NUM_THREADS overrides)",
                    threads, cores, load)
    return threads
