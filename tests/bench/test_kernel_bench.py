"""`dtm bench kernels`: every operation runs on every instruction set this CPU has, and the compared
ones (their outputs checked against the reference before timing) agree, or the command fails."""

from __future__ import annotations

import pytest

from dtm_fast.cli import main as dtm


@pytest.mark.parametrize("elements", [8192, 6000])  # rows of 2048 for DELLA, or one row of all
def test_kernel_bench_checks_and_times_every_operation(capsys, elements):
    from dtm_fast.merge.backends import native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    assert dtm(["bench", "kernels", "--elements", str(elements), "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    for operation in ("linear", "ties combine", "della prune (1 model)", "della keep bits (1)"):
        assert any(line.startswith(operation) for line in printed.splitlines()), operation
