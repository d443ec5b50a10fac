"""The `cpu` backend: the reference backend's chunk operations run by libdtm_kernels (kernels/, C++
with OpenMP; loaded and declared by native.py).

Every native operation whose C parameters follow native.py's conventions is bound onto this class
by name, with the reference operation's parameters; the few below that pass rule structs, numpy
buffers or an optional bucket are written out by hand. Results are bit-identical to the reference on
bf16/fp16/fp32 inputs (the backend tests check every operation); reductions in double may differ
from torch's summation order in the last bits. Dtypes the kernels lack (float64, integers, fp8),
and any operation without a kernel, run the inherited reference operation.
"""

from __future__ import annotations

import ctypes
import inspect
import logging

import numpy as np

from dtm_fast.merge.backends import native
from dtm_fast.merge.backends.native import (  # noqa: F401 - the library's state, re-exported for callers and tests
    ABI_VERSION, LIBRARY_NAME, KernelInputs, KernelOutput, SparsifyStruct, as_torch, check, floats, set_kernels_isa,
    supported, unavailable_reason,
)
from dtm_fast.merge.backends.reference import ReferenceBackend
from dtm_fast.merge.host_array import HostArray
from dtm_fast.merge.magnitude import BINS
from dtm_fast.merge.magprune import packed_size
from dtm_fast.merge.specs import GtaSpec, Sparsify

log = logging.getLogger(__name__)

SPARSIFY_KINDS = {"none": 0, "band": 1, "random": 2}
CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}
kernels_isa = native.kernels_isa


def _lib() -> ctypes.CDLL:
    return native.library()


def _sparsify(rule: Sparsify) -> SparsifyStruct:
    if rule.kind not in SPARSIFY_KINDS:
        raise ValueError(f"unknown sparsification {rule.kind!r}")
    return SparsifyStruct(SPARSIFY_KINDS[rule.kind], rule.threshold, rule.low_key, rule.high_key,
                          rule.philox_key[0], rule.philox_key[1], rule.scale, 0,
                          rule.low_from, rule.low_to, rule.high_from, rule.high_to)


def _histogram_address(histogram) -> int | None:
    """Address of a contiguous int64[65536] numpy array or torch tensor, else None."""
    if isinstance(histogram, np.ndarray):
        ok = histogram.dtype == np.int64 and histogram.flags.c_contiguous and histogram.size == BINS
        return histogram.ctypes.data if ok else None
    ok = str(histogram.dtype) == "torch.int64" and histogram.is_contiguous() and histogram.numel() == BINS
    return histogram.data_ptr() if ok else None


def _keep_bits_address(keep_bits, count: int, operation: str) -> int:
    """Address of the packed keep bits of `count` elements (magprune.pack_bits' layout)."""
    if keep_bits.numel() != packed_size(count):
        raise ValueError(f"{operation}: {keep_bits.numel()} bytes of bits for {count} elements")
    return native.address(keep_bits)


def _top_rule(variance, rule, count: int, operation: str) -> tuple[int, int, int]:
    """(address of the chunk's fp32 variance or 0, the rule's key, its tie stop) for the sce kernels."""
    if rule is None:
        return 0, 0, 0
    if native.dtype_name(variance) != "F32" or variance.numel() != count:
        raise ValueError(f"{operation}: the variance must be fp32 of the chunk's {count} elements")
    return native.address(variance), int(rule.key), int(rule.tie_stop)


def _reference(operation: str):
    """The inherited reference operation, called with HostArrays turned into torch views."""
    function = getattr(ReferenceBackend, operation)

    def call(self, *args):
        return function(self, *(as_torch(a) for a in args))

    call.runs_reference = True  # not counted among the accelerated operations
    return call


class CpuBackend(ReferenceBackend):
    name = "cpu"
    reads_mapped = True  # chunks are views of the memory-mapped inputs: the kernels read the page cache

    def __init__(self) -> None:
        self._lib = native.library()
        bound = set()
        for name in native.operations():
            if name in CpuBackend.__dict__ or not hasattr(ReferenceBackend, name):
                if name in CpuBackend.__dict__ and not getattr(CpuBackend.__dict__[name], "runs_reference", False):
                    bound.add(name)
                continue  # written out below, or a native helper that is no chunk operation
            call = native.bind(name, list(inspect.signature(getattr(ReferenceBackend, name)).parameters)[1:])
            if call is None:
                log.debug("native operation %s does not follow the binding conventions; using the reference", name)
                continue
            setattr(self, name, self._with_fallback(name, call))
            bound.add(name)
        self.accelerated = frozenset(bound)

    def _with_fallback(self, name: str, call):
        fallback = _reference(name)

        def operation(*args):
            result = call(*args)
            return fallback(self, *args) if result is NotImplemented else result

        operation.__name__ = name
        operation.__doc__ = getattr(ReferenceBackend, name).__doc__
        return operation

    def view(self, raw: np.ndarray, dtype: str) -> HostArray:
        """A chunk's bytes as the kernels take them (no torch)."""
        return HostArray(raw, dtype)

    def workspace_bytes_per_element(self, num_inputs: int) -> int:
        # Tiles live on the stack; reductions keep a few doubles per 2048-element block
        # (K(K+1)/2 for the Gram matrix), far below one byte per element.
        return 1

    # -- operations whose arguments need more than the binding conventions ---------------------------
    def gta(self, out, base, models, spec: GtaSpec, start: int) -> None:
        if not supported([out, base, *models]):
            return _reference("gta")(self, out, base, models, spec, start)
        if spec.consensus not in CONSENSUS_CODES:
            raise ValueError(f"unknown consensus {spec.consensus!r}")
        inputs = KernelInputs([base, *models])
        count = inputs.count(out, "gta")
        rules = (SparsifyStruct * max(1, len(models)))(*[_sparsify(rule) for rule in spec.sparsify])
        total = float(sum(spec.weights))
        divisor = 1.0 if abs(total) < 1e-8 else total  # as the reference, without consensus
        target = KernelOutput(out)
        check(self._lib.dtm_gta(target.address, target.code, inputs.addresses[0], inputs.pointers(1), inputs.code,
                                len(models), floats(spec.weights), rules, CONSENSUS_CODES[spec.consensus],
                                int(spec.normalize), divisor, spec.lambda_, start, count), "gta")
        target.finish()

    def ram_counts(self, base, models, epsilon: float) -> list[tuple[int, int]]:
        if not supported([base, *models]):
            return _reference("ram_counts")(self, base, models, epsilon)
        inputs = KernelInputs([base, *models])
        counts = np.zeros(2 * len(models), dtype=np.int64)
        check(self._lib.dtm_ram_counts(inputs.addresses[0], inputs.pointers(1), inputs.code, len(models), epsilon,
                                       inputs.count(None, "ram_counts"), counts.ctypes.data), "ram_counts")
        return [(int(counts[2 * m]), int(counts[2 * m + 1])) for m in range(len(models))]

    def abs_delta_histogram(self, base, model, histogram, bucket) -> None:
        address = _histogram_address(histogram)
        if address is None or not supported([base, model]):
            return _reference("abs_delta_histogram")(self, base, model, histogram, bucket)
        inputs = KernelInputs([base, model])
        count = inputs.count(None, "abs_delta_histogram")
        check(self._lib.dtm_abs_delta_histogram(inputs.addresses[0], inputs.addresses[1], inputs.code, count,
                                                address, -1 if bucket is None else int(bucket)),
              "abs_delta_histogram")

    def abs_delta_select(self, base, models, ranges, collected) -> list[tuple[int, int]]:
        """As ReferenceBackend.abs_delta_select, reading every input once for all the searches."""
        if (not all(c.dtype == np.uint32 and c.flags.c_contiguous for c in collected)
                or not supported([base, *models])):
            return _reference("abs_delta_select")(self, base, models, ranges, collected)
        inputs = KernelInputs([base, *models])
        count = inputs.count(None, "abs_delta_select")
        searches = max(1, len(models))
        lows = (ctypes.c_int32 * searches)(*[low for low, _ in ranges])
        highs = (ctypes.c_int32 * searches)(*[high for _, high in ranges])
        above = (ctypes.c_int64 * searches)()
        in_range = (ctypes.c_int64 * searches)()
        buffers = (ctypes.c_void_p * searches)(*[c.ctypes.data for c in collected])
        capacities = (ctypes.c_int64 * searches)(*[c.size for c in collected])
        check(self._lib.dtm_abs_delta_select(inputs.addresses[0], inputs.pointers(1), inputs.code, len(models), count,
                                             lows, highs, above, buffers, capacities, in_range), "abs_delta_select")
        return [(above[s], in_range[s]) for s in range(len(models))]

    def masked_l1(self, base, model, rule: Sparsify, start: int) -> tuple[float, float]:
        if not supported([base, model]):
            return _reference("masked_l1")(self, base, model, rule, start)
        inputs = KernelInputs([base, model])
        count = inputs.count(None, "masked_l1")
        result = (ctypes.c_double * 2)()
        check(self._lib.dtm_masked_l1(inputs.addresses[0], inputs.addresses[1], inputs.code, count,
                                      ctypes.byref(_sparsify(rule)), start, result), "masked_l1")
        return float(result[0]), float(result[1])

    def delta_gram(self, base, models) -> np.ndarray:
        """(K, K) float64 numpy matrix of the deltas' dot products (the inputs' own without a base)."""
        arrays = list(models) if base is None else [base, *models]
        if not supported(arrays):
            return _reference("delta_gram")(self, base, models)
        inputs = KernelInputs(arrays)
        count = inputs.count(None, "delta_gram")
        gram = np.zeros((len(models), len(models)), dtype=np.float64)
        base_address, first = (None, 0) if base is None else (inputs.addresses[0], 1)
        check(self._lib.dtm_delta_gram(base_address, inputs.pointers(first), inputs.code, len(models), count,
                                       gram.ctypes.data), "delta_gram")
        return gram

    def sce(self, out, base, models, weights, variance=None, rule=None, start: int = 0) -> None:
        if not supported([out, base, *models, *([variance] if rule is not None else [])]):
            return _reference("sce")(self, out, base, models, weights, variance, rule, start)
        inputs = KernelInputs([base, *models])
        count = inputs.count(out, "sce")
        statistic, rule_key, tie_stop = _top_rule(variance, rule, count, "sce")
        target = KernelOutput(out)
        check(self._lib.dtm_sce(target.address, target.code, inputs.addresses[0], inputs.pointers(1), inputs.code,
                                len(models), floats(weights), statistic, rule_key, tie_stop, start, count), "sce")
        target.finish()

    def sce_squares(self, base, models, variance, rule, start: int) -> list[float]:
        if not supported([base, *models, variance]):
            return _reference("sce_squares")(self, base, models, variance, rule, start)
        inputs = KernelInputs([base, *models])
        count = inputs.count(None, "sce_squares")
        statistic, rule_key, tie_stop = _top_rule(variance, rule, count, "sce_squares")
        sums = (ctypes.c_double * max(1, len(models)))()
        check(self._lib.dtm_sce_squares(inputs.addresses[0], inputs.pointers(1), inputs.code, len(models), statistic,
                                        rule_key, tie_stop, start, count, sums), "sce_squares")
        return [float(sums[m]) for m in range(len(models))]

    def fusion_importance(self, out, base, model, divergence, row_length: int) -> None:
        if not supported([out, base, model, divergence]) or native.dtype_name(divergence) != "F32":
            return _reference("fusion_importance")(self, out, base, model, divergence, row_length)
        inputs = KernelInputs([base, model])
        count = inputs.count(out, "fusion_importance")
        if divergence.numel() * row_length != count:
            raise ValueError(f"fusion_importance: {divergence.numel()} rows of {row_length} for {count} elements")
        target = KernelOutput(out)
        check(self._lib.dtm_fusion_importance(target.address, target.code, inputs.addresses[0], inputs.addresses[1],
                                              inputs.code, native.address(divergence), row_length, count),
              "fusion_importance")
        target.finish()

    def della_keep_bits(self, keep_bits, base, model, row_length: int, density: float, epsilon: float,
                        key_low: int, key_high: int, start: int) -> tuple[float, float]:
        if not supported([base, model]) or native.dtype_name(keep_bits) != "U8":
            return _reference("della_keep_bits")(self, keep_bits, base, model, row_length, density, epsilon,
                                                 key_low, key_high, start)
        inputs = KernelInputs([base, model])
        count = inputs.count(None, "della_keep_bits")
        total, kept = ctypes.c_double(), ctypes.c_double()
        check(self._lib.dtm_della_keep_bits(_keep_bits_address(keep_bits, count, "della_keep_bits"),
                                            inputs.addresses[0], inputs.addresses[1],
                                            inputs.code, row_length, density, epsilon, key_low, key_high, start,
                                            count, ctypes.byref(total), ctypes.byref(kept)), "della_keep_bits")
        return total.value, kept.value

    def della_apply(self, out, base, model, keep_bits, scale: float) -> None:
        if not supported([out, base, model]) or native.dtype_name(keep_bits) != "U8":
            return _reference("della_apply")(self, out, base, model, keep_bits, scale)
        inputs = KernelInputs([base, model])
        count = inputs.count(out, "della_apply")
        bits = _keep_bits_address(keep_bits, count, "della_apply")
        target = KernelOutput(out)
        check(self._lib.dtm_della_apply(target.address, target.code, inputs.addresses[0], inputs.addresses[1],
                                        inputs.code, bits, scale, count), "della_apply")
        target.finish()

    def order_key_histogram(self, values, histogram, bucket) -> None:
        address = _histogram_address(histogram)
        if address is None or native.dtype_name(values) != "F32":
            return _reference("order_key_histogram")(self, values, histogram, bucket)
        check(self._lib.dtm_order_key_histogram(native.address(values), 0, values.numel(), address,
                                                -1 if bucket is None else int(bucket)), "order_key_histogram")

    # -- operations without a kernel yet: the reference on torch views of the chunks ------------------
    fusion_divergence = _reference("fusion_divergence")  # a softmax per row, once per chunk: torch's
    nuslerp_rows = _reference("nuslerp_rows")
    column_products = _reference("column_products")
    column_combine = _reference("column_combine")

    # -- not a chunk operation: DARE's mask as the kernels draw it, for tests and tools ---------------
    def keep_mask(self, key: tuple[int, int], start: int, count: int, threshold: int):
        """DARE's keep-mask for elements start .. start+count-1 (rng.keep_mask, natively), as a torch bool tensor."""
        import torch

        mask = torch.empty(count, dtype=torch.bool)
        check(self._lib.dtm_dare_keep_mask(mask.data_ptr(), key[0], key[1], threshold, start, count),
              "dare_keep_mask")
        return mask
