"""`dtm bench kernels`: the chunk operations alone, on in-memory chunks, per backend and per
instruction set of the native kernels, after checking each result against the reference.

    dtm bench kernels                                  # 4 Mi elements, bf16, base + 4 fine-tunes
    OMP_NUM_THREADS=1 dtm bench kernels --repeats 10 --with-reference

Prints, per operation, the best time of `repeats` calls and the GB/s of bytes read + written. The
inputs come from the generator the backend tests use (dtm_fast.bench.chunk_inputs).
"""

from __future__ import annotations

import argparse
import time

MODELS = 4
ROW_LENGTH = 2048  # DELLA ranks within rows of this length (one row when --elements is no multiple)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--elements", type=int, default=4 << 20, help="elements per chunk (default 4 Mi)")
    parser.add_argument("--repeats", type=int, default=20, help="calls timed per operation; the best is reported")
    parser.add_argument("--with-reference", action="store_true", help="also time the reference backend")
    parser.add_argument("--triton", action="store_true", help="also time the Triton backend (needs CUDA)")


def best_of(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def operations(count: int):
    """name -> (call(backend), arrays of `count` bf16 elements it reads + writes, compared?)."""
    import numpy as np
    import torch

    from dtm_fast.bench.chunk_inputs import chunk_inputs
    from dtm_fast.merge import rng
    from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, Sparsify
    from dtm_fast.merge.magnitude import magnitude_keys

    base, models = chunk_inputs(count, torch.bfloat16, MODELS, seed=0)
    out = torch.empty(count, dtype=torch.bfloat16)
    sample = slice(0, min(count, 1 << 20))
    medians = [int(torch.quantile(magnitude_keys(m[sample].float() - base[sample].float()).double(), 0.5))
               for m in models]
    ties = GtaSpec((1.0,) * MODELS, tuple(Sparsify("band", k, NO_UPPER_KEY) for k in medians), "sum", True, 1.0)
    dare = GtaSpec((1.0,) * MODELS, tuple(Sparsify("random", philox_key=rng.philox_key(0, "w", i),
                                                   threshold=rng.keep_threshold(0.5), scale=2.0)
                                          for i in range(MODELS)), "sum", True, 1.0)
    task = GtaSpec((1.0,) * MODELS, (Sparsify(),) * MODELS, None, False, 1.0)
    # the bracketed threshold pass of TIES, every model at once, each bracket holding ~5% of the keys
    brackets = [(int(k * 0.98), int(k * 1.02)) for k in medians]
    collected = [np.empty(count // 4, dtype=np.uint32) for _ in models]
    histogram = torch.zeros(1 << 16, dtype=torch.int64)
    magprune = (ROW_LENGTH if count % ROW_LENGTH == 0 else count, 0.5, 0.1, *rng.philox_key(0, "w", 0))
    keep_bits = torch.empty((count + 7) // 8, dtype=torch.uint8)
    return out, {
        "linear": (lambda b: b.linear(out, models, [1 / MODELS] * MODELS), MODELS + 1, True),
        "task_arithmetic": (lambda b: b.gta(out, base, models, task, 0), MODELS + 2, True),
        "ties combine": (lambda b: b.gta(out, base, models, ties, 0), MODELS + 2, True),
        "dare_ties combine": (lambda b: b.gta(out, base, models, dare, 0), MODELS + 2, True),
        "histogram (1 model)": (lambda b: b.abs_delta_histogram(base, models[0], histogram, None), 2, False),
        f"select ({MODELS} models)": (lambda b: b.abs_delta_select(base, models, brackets, collected), MODELS + 1,
                                      False),
        "della prune (1 model)": (lambda b: b.della_deltas(out, base, models[0], *magprune, 1.0, 0), 3, True),
        "della keep bits (1)": (lambda b: b.della_keep_bits(keep_bits, base, models[0], *magprune, 0), 2, False),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from dtm_fast.errors import DtmError
    from dtm_fast.merge.backends import cpu
    from dtm_fast.merge.backends.reference import ReferenceBackend

    problem = cpu.unavailable_reason()
    if problem:
        raise DtmError(f"the native kernels are unavailable: {problem}; build them with `pip install -e .`")
    count = args.elements
    out, table = operations(count)
    reference, native = ReferenceBackend(), cpu.CpuBackend()
    columns = {}
    for isa in ("generic", "avx2", "avx512"):
        try:
            cpu.set_kernels_isa(isa)
            columns[f"cpu {isa}"] = native
        except ValueError:
            pass
    if args.triton:
        from dtm_fast.merge.backends import select_backend

        columns["triton"] = select_backend("triton")
    if args.with_reference:
        columns["reference"] = reference
    for name, (call, _, compared) in table.items():
        if compared:
            call(reference)
            expected = out.clone()
            for label in (label for label in columns if label.startswith("cpu")):  # the GPU may differ by 1 ulp
                cpu.set_kernels_isa(label.split()[1])
                call(native)
                if not torch.equal(out, expected):
                    raise DtmError(f"{name}: the {label} backend differs from the reference; this is a bug")
    print(f"{count} elements, bf16, base + {MODELS} fine-tunes; best of {args.repeats}; ms (GB/s)")
    print(f"{'operation':<22}" + "".join(f"{label:>22}" for label in columns))
    for name, (call, arrays, _) in table.items():
        cells = []
        for label, backend in columns.items():
            if label.startswith("cpu"):
                cpu.set_kernels_isa(label.split()[1])
            repeats = max(1, args.repeats // 5) if label == "reference" else args.repeats
            seconds = best_of(lambda: call(backend), repeats)
            cells.append(f"{seconds * 1e3:9.2f} ({arrays * 2 * count / seconds / 1e9:6.1f})")
        print(f"{name:<22}" + "".join(f"{cell:>22}" for cell in cells))
    cpu.set_kernels_isa(next((label.split()[1] for label in reversed(columns) if label.startswith("cpu")), "generic"))
    return 0
