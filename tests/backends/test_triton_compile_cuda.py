"""Every kernel launch the Triton backend makes, compiled for real CUDA targets on a machine without a
GPU: Triton's compiler (and the ptxas it ships) accepts what its interpreter runs, and the PTX keeps the
reference's rounding: no fused multiply-adds, no approximate division, no flushing of subnormals.

Runs in the main pytest process (TRITON_INTERPRET must be unset, or kernels are interpreted)."""

import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from dtm_fast.merge.backends.reference import GtaSpec, Sparsify  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels are interpreted under TRITON_INTERPRET=1; nothing to compile")

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.int16: "*i16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.float64: "*fp64"}


def argument_type(value):
    """(type, specialisation) as Triton's launcher derives them from a kernel argument."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # older triton: the plain mapping, without the constant-1 specialisation
        if isinstance(value, torch.Tensor):
            return POINTER_TYPES[value.dtype], None
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            return ("i32" if -(1 << 31) <= value < (1 << 31) else "i64"), None
        return "fp32", None
    return native_specialize_impl(BaseBackend, value, False, True, True)


def recorded_launches():
    """(kernel, signature, constexprs) of every distinct launch made by the operations below."""
    from dtm_fast.merge.backends.triton_backend import TritonBackend

    launches = {}

    class Recorder(TritonBackend):
        def _launch(self, kernel, grid, *args, **constexprs):
            signature, constexprs = {}, dict(constexprs)
            for name, value in zip(kernel.arg_names, args):
                kind, _ = argument_type(value)
                if kind == "constexpr":  # Triton turns an int argument equal to 1 into a constant
                    constexprs[name] = value
                signature[name] = kind
            signature.update({name: "constexpr" for name in constexprs})
            key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()))
            launches[key] = (kernel, signature, constexprs)

    backend = Recorder(device="cpu")  # records instead of launching: nothing runs
    n = 100
    bf16 = [torch.zeros(n, dtype=torch.bfloat16) for _ in range(4)]
    fp16 = [torch.zeros(n, dtype=torch.float16) for _ in range(2)]
    rules = (Sparsify("random", philox_key=(1, 2), threshold=3), Sparsify("band", low_key=1), Sparsify())
    for consensus, normalize, out_dtype in [(None, False, torch.bfloat16), ("sum", True, torch.float16),
                                            ("count", True, torch.float32)]:
        spec = GtaSpec((1.0, 1.0, 1.0), rules, consensus, normalize, 1.0)
        backend.gta(torch.empty(n, dtype=out_dtype), bf16[0], bf16[1:], spec, (1 << 40) + 3)
    backend.linear(torch.empty(n, dtype=torch.bfloat16), fp16, [0.5, 0.5])
    backend.fisher(torch.empty(n, dtype=torch.float16), bf16[:2], [torch.zeros(n)] * 2, [1.0, 1.0], 1e-8)
    backend.abs_delta_histogram(bf16[0], bf16[1], torch.zeros(1 << 16, dtype=torch.int64), None)
    backend.abs_delta_histogram(fp16[0], fp16[1], torch.zeros(1 << 16, dtype=torch.int64), 7)
    backend.abs_delta_select(bf16[0], bf16[1:3], [(0, 5), (1, 9)], [np.zeros(n, dtype=np.uint32)] * 2)
    for rule in rules:
        backend.masked_l1(bf16[0], bf16[1], rule, 5)
    backend.delta_gram(bf16[0], bf16[1:])
    backend.model_stock_combine(torch.empty(n, dtype=torch.bfloat16), bf16[0], bf16[1:], 0.5)
    backend.model_stock_rows(torch.empty(n, dtype=torch.bfloat16), bf16[0], bf16[1:], 10)
    backend.slerp_rows(torch.empty(n, dtype=torch.bfloat16), bf16[0], bf16[1], 10, 0.5)
    # single elements and rows of one element: Triton specialises those 1s into constants
    one = [tensor[:1] for tensor in bf16]
    backend.gta(torch.empty(1, dtype=torch.bfloat16), one[0], one[1:], spec, 0)
    backend.linear(torch.empty(1, dtype=torch.bfloat16), one[:1], [1.0])
    backend.abs_delta_histogram(one[0], one[1], torch.zeros(1 << 16, dtype=torch.int64), None)
    backend.masked_l1(one[0], one[1], rules[0], 1)
    backend.model_stock_rows(torch.empty(n, dtype=torch.bfloat16), bf16[0], bf16[1:], 1)
    backend.slerp_rows(torch.empty(n, dtype=torch.bfloat16), bf16[0], bf16[1], 1, 0.5)
    return list(launches.values())


def test_every_kernel_compiles_for_cuda_with_reference_rounding():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    launches = recorded_launches()
    assert {kernel.__name__ for kernel, _, _ in launches} == {
        "gta_kernel", "linear_kernel", "fisher_kernel", "abs_delta_histogram_kernel", "abs_delta_keys_kernel",
        "masked_l1_kernel", "row_gram_kernel", "model_stock_kernel", "slerp_kernel"}
    for kernel, signature, constexprs in launches:
        for capability in (80, 90):  # A100, H100
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32), options={"enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            where = f"{kernel.__name__} {constexprs} sm_{capability}"
            assert compiled.asm["cubin"], where
            assert "fma.rn.f32" not in ptx and "fma.rn.f64" not in ptx, f"{where}: fused multiply-add"
            assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, f"{where}: approximate division"
            assert ".ftz" not in ptx, f"{where}: subnormals flushed to zero"
            if kernel.__name__ in ("fisher_kernel", "model_stock_kernel") or constexprs.get("NORMALIZE"):
                assert "div.rn.f32" in ptx, where
