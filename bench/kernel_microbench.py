"""Micro-benchmark of the native merge kernels on in-memory chunks, per instruction set, against the
reference backend. Run from the repository root after `pip install -e .`:

    .venv/bin/python bench/kernel_microbench.py --elements 4194304 --repeats 20

Prints, per operation, the best time of `repeats` calls and the GB/s of bytes read + written
(bf16 inputs and output, 4 fine-tunes + base). Checks every result equals the reference first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends import cpu
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, ReferenceBackend, Sparsify


def best_of(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4 << 20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--with-reference", action="store_true", help="also time the reference backend")
    args = parser.parse_args()
    problem = cpu.unavailable_reason()
    if problem:
        raise SystemExit(f"native kernels unavailable: {problem}")
    n = args.elements
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=generator) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=generator) * 1e-3).bfloat16() for _ in range(4)]
    out, expected = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    keys = [int(torch.quantile(((m.float() - base.float()).abs()[:1 << 20]).view(torch.int32).double(), 0.5))
            for m in models]
    ties = GtaSpec((1.0,) * 4, tuple(Sparsify("band", k, NO_UPPER_KEY) for k in keys), "sum", True, 1.0)
    dare = GtaSpec((1.0,) * 4, tuple(Sparsify("random", philox_key=rng.philox_key(0, "w", i),
                                              threshold=rng.keep_threshold(0.5), scale=2.0) for i in range(4)),
                   "sum", True, 1.0)
    task = GtaSpec((1.0,) * 4, (Sparsify(),) * 4, None, False, 1.0)
    operations = {
        "linear": (lambda b: b.linear(out, models, [0.25] * 4), 5),
        "task_arithmetic": (lambda b: b.gta(out, base, models, task, 0), 6),
        "ties combine": (lambda b: b.gta(out, base, models, ties, 0), 6),
        "dare_ties combine": (lambda b: b.gta(out, base, models, dare, 0), 6),
        "histogram (1 model)": (lambda b: b.abs_delta_histogram(base, models[0], torch.zeros(1 << 16, dtype=torch.int64), None), 2),
        # the bracketed threshold pass of TIES, all 4 models at once, a bracket holding ~5% of the keys
        "select (4 models)": (lambda b: b.abs_delta_select(base, models, brackets, collected), 5),
    }
    brackets = [(int(k * 0.98), int(k * 1.02)) for k in keys]
    collected = [np.empty(n // 4, dtype=np.uint32) for _ in models]
    reference = ReferenceBackend()
    native = cpu.CpuBackend()
    for name, (operation, arrays) in operations.items():
        if not name.startswith(("histogram", "select")):
            operation(native)
            result = out.clone()
            operation(reference)
            assert torch.equal(result, out), f"{name}: cpu backend differs from the reference"
    isas = []
    for isa in ("generic", "avx2", "avx512"):
        try:
            cpu.set_kernels_isa(isa)
            isas.append(isa)
        except ValueError:
            pass
    header = f"{'operation':<22}" + "".join(f"{isa:>22}" for isa in isas)
    print(f"{n} elements, bf16; best of {args.repeats}; ms (GB/s)\n{header}")
    for name, (operation, arrays) in operations.items():
        cells = []
        for isa in isas:
            cpu.set_kernels_isa(isa)
            seconds = best_of(lambda: operation(native), args.repeats)
            cells.append(f"{seconds * 1e3:9.2f} ({arrays * 2 * n / seconds / 1e9:6.1f})")
        line = f"{name:<22}" + "".join(f"{cell:>22}" for cell in cells)
        if args.with_reference:
            seconds = best_of(lambda: operation(reference), max(1, args.repeats // 5))
            line += f"   reference {seconds * 1e3:.1f} ms"
        print(line)
    cpu.set_kernels_isa(isas[-1])


if __name__ == "__main__":
    main()
