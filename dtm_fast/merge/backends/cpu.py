"""The `cpu` backend: the chunk operations of the reference backend run by libdtm_kernels (kernels/,
C++ with OpenMP, loaded with ctypes).

Each method takes and returns exactly what ReferenceBackend's does and produces bit-identical
results on bf16/fp16/fp32 inputs (tests/kernels checks every operation against it); reductions in
double may differ from torch's summation order in the last bits. Dtypes the kernels do not handle
(float64, integers, fp8) go to the reference backend, so no call is refused.

The library is looked up, lazily, in the package's `_native/` folders (where `pip install` puts it)
and first at the path in $DTM_FAST_KERNELS; a library with another ABI version is rejected.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dtm_fast.merge.host_array import HostArray
from dtm_fast.merge.magnitude import BINS
from dtm_fast.merge.specs import GtaSpec, Sparsify

log = logging.getLogger(__name__)

ABI_VERSION = 3  # must equal DTM_KERNELS_ABI_VERSION in kernels/dtm_kernels.h
LIBRARY_NAME = "libdtm_kernels.so"
ENV_PATH = "DTM_FAST_KERNELS"

DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}  # safetensors dtype name -> kernel dtype code
TORCH_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
SPARSIFY_KINDS = {"none": 0, "band": 1, "random": 2}
CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512"}


class SparsifyStruct(ctypes.Structure):
    """Mirror of `dtm_sparsify` in kernels/dtm_kernels.h (40 bytes)."""

    _fields_ = [
        ("kind", ctypes.c_int32), ("threshold", ctypes.c_int32),
        ("low_key", ctypes.c_int64), ("high_key", ctypes.c_int64),
        ("key_low", ctypes.c_uint32), ("key_high", ctypes.c_uint32),
        ("scale", ctypes.c_float), ("reserved", ctypes.c_int32),
    ]


_library: ctypes.CDLL | None = None
_problem: str | None = None
_looked = False


def _candidate_paths() -> list[Path]:
    paths = []
    if os.environ.get(ENV_PATH):
        paths.append(Path(os.environ[ENV_PATH]))
    import dtm_fast

    for entry in dtm_fast.__path__:
        paths.append(Path(entry) / "_native" / LIBRARY_NAME)
    return paths


def _declare(library: ctypes.CDLL) -> None:
    p, i32, i64, f32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_double
    pp = ctypes.POINTER(ctypes.c_void_p)
    pf = ctypes.POINTER(ctypes.c_float)
    rule = ctypes.POINTER(SparsifyStruct)
    signatures = {
        "dtm_kernels_isa": [],
        "dtm_kernels_set_isa": [i32],
        "dtm_linear": [p, i32, pp, i32, i64, pf, i64],
        "dtm_gta": [p, i32, p, pp, i32, i64, pf, rule, i32, i32, f32, f32, i64, i64],
        "dtm_abs_delta_histogram": [p, p, i32, i64, p, ctypes.c_int32],
        "dtm_abs_delta_select": [p, pp, i32, i64, i64, p, p, p, pp, p, p],
        "dtm_masked_l1": [p, p, i32, i64, rule, i64, ctypes.POINTER(ctypes.c_double)],
        "dtm_delta_gram": [p, pp, i32, i64, i64, p],
        "dtm_model_stock_combine": [p, i32, p, pp, i32, i64, f32, f32, i64],
        "dtm_model_stock_rows": [p, i32, p, pp, i32, i64, i64, i64],
        "dtm_slerp_rows": [p, i32, p, p, i32, i64, i64, f64],
        "dtm_fisher": [p, i32, pp, i32, pp, i32, i64, pf, f32, i64],
        "dtm_dare_keep_mask": [p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int32, i64, i64],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    tried = []
    for path in _candidate_paths():
        if not path.is_file():
            tried.append(str(path))
            continue
        # The merge's reader and writer threads share the cores with the kernels' OpenMP team:
        # workers that spin between kernels (libgomp's default) steal their time. Read by libgomp
        # when it loads with the library, so set before; a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            library = ctypes.CDLL(str(path))
        except OSError as error:
            return None, f"{path} does not load ({error}); rebuild with `pip install -e .`"
        version_function = getattr(library, "dtm_kernels_abi_version", None)
        if version_function is None:
            return None, f"{path} is not a dtm_fast kernel library (no dtm_kernels_abi_version)"
        version_function.restype = ctypes.c_int
        version = version_function()
        if version != ABI_VERSION:
            return None, (f"{path} has kernel ABI version {version}, this dtm_fast needs {ABI_VERSION}; "
                          "rebuild it with `pip install -e .`")
        try:
            _declare(library)
        except AttributeError as error:
            return None, f"{path} lacks a kernel ({error}); rebuild it with `pip install -e .`"
        log.debug("native kernels loaded from %s", path)
        return library, None
    return None, f"{LIBRARY_NAME} not found (looked in {', '.join(tried)}); build it with `pip install -e .`"


def unavailable_reason() -> str | None:
    """Why the cpu backend cannot run here, or None. Loads the library once and caches the answer."""
    global _library, _problem, _looked
    if not _looked:
        _library, _problem = _load()
        _looked = True
    return _problem


def _lib() -> ctypes.CDLL:
    problem = unavailable_reason()
    if problem is not None:
        raise RuntimeError(f"the cpu backend cannot run: {problem}")
    return _library


def kernels_isa() -> str:
    """The instruction set the kernels run with on this CPU (generic, avx2 or avx512)."""
    return ISA_NAMES[_lib().dtm_kernels_isa()]


def set_kernels_isa(name: str) -> None:
    """Force an instruction set (tests compare them); ValueError when the CPU lacks it."""
    code = {v: k for k, v in ISA_NAMES.items()}[name]
    if _lib().dtm_kernels_set_isa(code) != 0:
        raise ValueError(f"this CPU cannot run the {name} kernels")


def _check(status: int, operation: str) -> None:
    if status != 0:
        raise ValueError(f"libdtm_kernels {operation} rejected its arguments (status {status})")


def _dtype_name(array) -> str:
    """The safetensors dtype name of a HostArray or torch tensor ("?" for dtypes kernels never see)."""
    if isinstance(array, HostArray):
        return array.dtype
    return TORCH_NAMES.get(str(array.dtype), "?")


def _torch(array):
    """A torch tensor for the reference fallback (shares a HostArray's bytes)."""
    return array.torch() if isinstance(array, HostArray) else array


class _KernelArrays:
    """Chunk inputs as the kernels read them: addresses and one dtype code. Mixed bf16/fp16/fp32
    inputs are widened to fp32 copies (exact) and non-contiguous tensors copied; the copies are
    kept alive here for the duration of the call."""

    def __init__(self, arrays: Sequence):
        for array in arrays:
            if not isinstance(array, HostArray) and array.device.type != "cpu":
                raise ValueError("the cpu backend takes CPU tensors")
        names = {_dtype_name(a) for a in arrays}
        if len(names) > 1:
            arrays = [_torch(a).float() for a in arrays]
            names = {"F32"}
        self.arrays = [a if isinstance(a, HostArray) or a.is_contiguous() else a.contiguous() for a in arrays]
        self.code = DTYPE_CODES[names.pop()] if names else 0
        self.addresses = [_address(a) for a in self.arrays]

    @staticmethod
    def supported(arrays: Sequence) -> bool:
        return all(_dtype_name(a) in DTYPE_CODES for a in arrays)

    def pointers(self, first: int = 0):
        addresses = self.addresses[first:]
        return (ctypes.c_void_p * max(1, len(addresses)))(*addresses)

    def count(self, out, operation: str) -> int:
        count = out.numel() if out is not None else self.arrays[0].numel()
        for array in self.arrays:
            if array.numel() != count:
                raise ValueError(f"{operation}: chunk inputs have {array.numel()} and {count} elements")
        return count


def _address(array) -> int:
    return array.address if isinstance(array, HostArray) else array.data_ptr()


def _floats(values: Sequence[float]):
    return (ctypes.c_float * max(1, len(values)))(*[float(v) for v in values])


def _sparsify(rule: Sparsify) -> SparsifyStruct:
    if rule.kind not in SPARSIFY_KINDS:
        raise ValueError(f"unknown sparsification {rule.kind!r}")
    return SparsifyStruct(SPARSIFY_KINDS[rule.kind], rule.threshold, rule.low_key, rule.high_key,
                          rule.philox_key[0], rule.philox_key[1], rule.scale, 0)


class _Output:
    """A contiguous output the kernels can write (a temporary when a torch `out` is not), copied back."""

    def __init__(self, out):
        self.out = out
        self.target = out if isinstance(out, HostArray) or out.is_contiguous() else out.new_empty(out.shape)
        self.address = _address(self.target)
        self.code = DTYPE_CODES[_dtype_name(out)]

    def finish(self) -> None:
        if self.target is not self.out:
            self.out.copy_(self.target)


def _histogram_address(histogram) -> int | None:
    """Address of a contiguous int64[65536] numpy array or torch tensor, else None."""
    if isinstance(histogram, np.ndarray):
        ok = histogram.dtype == np.int64 and histogram.flags.c_contiguous and histogram.size == BINS
        return histogram.ctypes.data if ok else None
    ok = str(histogram.dtype) == "torch.int64" and histogram.is_contiguous() and histogram.numel() == BINS
    return histogram.data_ptr() if ok else None


class CpuBackend:
    name = "cpu"
    reads_mapped = True  # chunks are views of the memory-mapped inputs: the kernels read the page cache

    def __init__(self) -> None:
        self._lib = _lib()
        self._reference_backend = None

    @property
    def _reference(self):
        """The reference backend, for dtypes the kernels do not handle (imports torch)."""
        if self._reference_backend is None:
            from dtm_fast.merge.backends.reference import ReferenceBackend

            self._reference_backend = ReferenceBackend()
        return self._reference_backend

    def view(self, raw: np.ndarray, dtype: str) -> HostArray:
        """A chunk's bytes as the kernels take them (no torch)."""
        return HostArray(raw, dtype)

    def workspace_bytes_per_element(self, num_inputs: int) -> int:
        # Tiles live on the stack; reductions keep a few doubles per 2048-element block
        # (K(K+1)/2 for the Gram matrix), far below one byte per element.
        return 1

    def linear(self, out, models, coefficients) -> None:
        if not _KernelArrays.supported([out, *models]):
            return self._reference.linear(_torch(out), [_torch(m) for m in models], coefficients)
        inputs = _KernelArrays(models)
        count = inputs.count(out, "linear")
        target = _Output(out)
        _check(self._lib.dtm_linear(target.address, target.code, inputs.pointers(), inputs.code, len(models),
                                    _floats(coefficients), count), "linear")
        target.finish()

    def gta(self, out, base, models, spec: GtaSpec, start: int) -> None:
        if not _KernelArrays.supported([out, base, *models]):
            return self._reference.gta(_torch(out), _torch(base), [_torch(m) for m in models], spec, start)
        if spec.consensus not in CONSENSUS_CODES:
            raise ValueError(f"unknown consensus {spec.consensus!r}")
        inputs = _KernelArrays([base, *models])
        count = inputs.count(out, "gta")
        rules = (SparsifyStruct * max(1, len(models)))(*[_sparsify(rule) for rule in spec.sparsify])
        total = float(sum(spec.weights))
        divisor = 1.0 if abs(total) < 1e-8 else total  # as the reference, without consensus
        target = _Output(out)
        _check(self._lib.dtm_gta(target.address, target.code, inputs.addresses[0], inputs.pointers(1), inputs.code,
                                 len(models), _floats(spec.weights), rules, CONSENSUS_CODES[spec.consensus],
                                 int(spec.normalize), divisor, spec.lambda_, start, count), "gta")
        target.finish()

    def abs_delta_histogram(self, base, model, histogram, bucket) -> None:
        address = _histogram_address(histogram)
        if address is None or not _KernelArrays.supported([base, model]):
            return self._reference.abs_delta_histogram(_torch(base), _torch(model), histogram, bucket)
        inputs = _KernelArrays([base, model])
        count = inputs.count(None, "abs_delta_histogram")
        _check(self._lib.dtm_abs_delta_histogram(inputs.addresses[0], inputs.addresses[1], inputs.code, count,
                                                 address, -1 if bucket is None else int(bucket)),
               "abs_delta_histogram")

    def abs_delta_select(self, base, models, ranges, collected) -> list[tuple[int, int]]:
        """As ReferenceBackend.abs_delta_select, reading every input once for all the searches."""
        if (not all(c.dtype == np.uint32 and c.flags.c_contiguous for c in collected)
                or not _KernelArrays.supported([base, *models])):
            return self._reference.abs_delta_select(_torch(base), [_torch(m) for m in models], ranges, collected)
        inputs = _KernelArrays([base, *models])
        count = inputs.count(None, "abs_delta_select")
        searches = len(models)
        lows = (ctypes.c_int32 * max(1, searches))(*[low for low, _ in ranges])
        highs = (ctypes.c_int32 * max(1, searches))(*[high for _, high in ranges])
        above = (ctypes.c_int64 * max(1, searches))()
        in_range = (ctypes.c_int64 * max(1, searches))()
        buffers = (ctypes.c_void_p * max(1, searches))(*[c.ctypes.data for c in collected])
        capacities = (ctypes.c_int64 * max(1, searches))(*[c.size for c in collected])
        _check(self._lib.dtm_abs_delta_select(inputs.addresses[0], inputs.pointers(1), inputs.code, searches, count,
                                              lows, highs, above, buffers, capacities, in_range), "abs_delta_select")
        return [(above[s], in_range[s]) for s in range(searches)]

    def masked_l1(self, base, model, rule: Sparsify, start: int) -> tuple[float, float]:
        if not _KernelArrays.supported([base, model]):
            return self._reference.masked_l1(_torch(base), _torch(model), rule, start)
        inputs = _KernelArrays([base, model])
        count = inputs.count(None, "masked_l1")
        result = (ctypes.c_double * 2)()
        _check(self._lib.dtm_masked_l1(inputs.addresses[0], inputs.addresses[1], inputs.code, count,
                                       ctypes.byref(_sparsify(rule)), start, result), "masked_l1")
        return float(result[0]), float(result[1])

    def delta_gram(self, base, models) -> np.ndarray:
        """(K, K) float64 numpy matrix of the deltas' dot products."""
        if not _KernelArrays.supported([base, *models]):
            return self._reference.delta_gram(_torch(base), [_torch(m) for m in models])
        inputs = _KernelArrays([base, *models])
        count = inputs.count(None, "delta_gram")
        gram = np.zeros((len(models), len(models)), dtype=np.float64)
        _check(self._lib.dtm_delta_gram(inputs.addresses[0], inputs.pointers(1), inputs.code, len(models), count,
                                        gram.ctypes.data), "delta_gram")
        return gram

    def model_stock_combine(self, out, base, models, ratio: float) -> None:
        if not models or not _KernelArrays.supported([out, base, *models]):
            return self._reference.model_stock_combine(_torch(out), _torch(base), [_torch(m) for m in models], ratio)
        inputs = _KernelArrays([base, *models])
        count = inputs.count(out, "model_stock_combine")
        target = _Output(out)
        _check(self._lib.dtm_model_stock_combine(target.address, target.code, inputs.addresses[0], inputs.pointers(1),
                                                 inputs.code, len(models), ratio, 1 - ratio, count),
               "model_stock_combine")
        target.finish()

    def model_stock_rows(self, out, base, models, row_length: int) -> None:
        if len(models) < 2 or row_length <= 0 or not _KernelArrays.supported([out, base, *models]):
            return self._reference.model_stock_rows(_torch(out), _torch(base), [_torch(m) for m in models],
                                                    row_length)
        inputs = _KernelArrays([base, *models])
        count = inputs.count(out, "model_stock_rows")
        if count % row_length:
            raise ValueError(f"model_stock_rows: {count} elements are not whole rows of {row_length}")
        target = _Output(out)
        _check(self._lib.dtm_model_stock_rows(target.address, target.code, inputs.addresses[0], inputs.pointers(1),
                                              inputs.code, len(models), count // row_length, row_length),
               "model_stock_rows")
        target.finish()

    def slerp_rows(self, out, first, second, row_length: int, t: float) -> None:
        if row_length <= 0 or not _KernelArrays.supported([out, first, second]):
            return self._reference.slerp_rows(_torch(out), _torch(first), _torch(second), row_length, t)
        inputs = _KernelArrays([first, second])
        count = inputs.count(out, "slerp_rows")
        if count % row_length:
            raise ValueError(f"slerp_rows: {count} elements are not whole rows of {row_length}")
        target = _Output(out)
        _check(self._lib.dtm_slerp_rows(target.address, target.code, inputs.addresses[0], inputs.addresses[1],
                                        inputs.code, count // row_length, row_length, float(t)), "slerp_rows")
        target.finish()

    def fisher(self, out, models, fishers, weights, epsilon: float) -> None:
        if not models or not _KernelArrays.supported([out, *models, *fishers]):
            return self._reference.fisher(_torch(out), [_torch(m) for m in models], [_torch(f) for f in fishers],
                                          weights, epsilon)
        model_inputs = _KernelArrays(models)
        fisher_inputs = _KernelArrays(fishers)
        count = model_inputs.count(out, "fisher")
        fisher_inputs.count(out, "fisher")
        target = _Output(out)
        _check(self._lib.dtm_fisher(target.address, target.code, model_inputs.pointers(), model_inputs.code,
                                    fisher_inputs.pointers(), fisher_inputs.code, len(models), _floats(weights),
                                    epsilon, count), "fisher")
        target.finish()

    def keep_mask(self, key: tuple[int, int], start: int, count: int, threshold: int):
        """DARE's keep-mask for elements start .. start+count-1 (rng.keep_mask, natively), as a torch bool tensor."""
        import torch

        mask = torch.empty(count, dtype=torch.bool)
        _check(self._lib.dtm_dare_keep_mask(mask.data_ptr(), key[0], key[1], threshold, start, count),
               "dare_keep_mask")
        return mask
