"""The CPU thread count dtm takes when OMP_NUM_THREADS is not set: the cores the load leaves free."""

from __future__ import annotations

import pytest

from dtm_fast.threads import configure_cpu_threads, free_cores


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 6.5, 1),
                                                         (16, 3.2, 13), (16, 40.0, 1), (1, 0.0, 1)])
def test_free_cores(cores, load, expected):
    assert free_cores(cores, load) == expected


def test_omp_num_threads_is_left_to_the_user(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr("os.getloadavg", lambda: (100.0, 100.0, 100.0))
    assert configure_cpu_threads() == before == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        assert configure_cpu_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
