"""libdtm_kernels from Python: finding and loading the library, and calling its operations.

The library describes its own operations (`dtm_kernels_signatures`, generated from kernels/ops_list.h),
so the ctypes declarations are built from that text and never written by hand. Most operations are
also *bound* automatically onto the cpu backend: `bind(name)` returns a function with the reference
operation's parameters that converts each argument by the C parameter it feeds, by name:

    out / a `void*` named like a Python argument   -> its address (contiguous output, copied back if not)
    a `const void*` / `const void* const*` argument -> the input's address / an array of addresses
    `X_dtype`                                       -> the dtype code of argument X (X a list: its common code)
    `dtype`                                         -> the common dtype code of every other input array
    `num_X`                                         -> len(X)
    `n`                                             -> the element count (equal across every array)
    `const float*` / `const double*` of a sequence  -> a C array of its values
    a scalar named like an argument                 -> that value
    `int64_t*` / `double*` not among the arguments  -> a result, returned (a tuple when several)

Inputs of dtypes the kernels lack (float64, integers) make the bound function return NotImplemented,
and the backend then runs the reference operation. Loading happens on first use, never at import.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dtm_fast.io.dtypes import tag_of
from dtm_fast.merge.host_array import HostArray

log = logging.getLogger(__name__)

ABI_VERSION = 8  # must equal DTM_KERNELS_ABI_VERSION in kernels/dtm_kernels.h
LIBRARY_NAME = "libdtm_kernels.so"
ENV_PATH = "DTM_FAST_KERNELS"
DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}  # safetensors tag -> the kernels' DTM_F32 / DTM_F16 / DTM_BF16
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512"}


class SparsifyStruct(ctypes.Structure):
    """Mirror of `dtm_sparsify` in kernels/dtm_kernels.h (72 bytes)."""

    _fields_ = [
        ("kind", ctypes.c_int32), ("threshold", ctypes.c_int32),
        ("low_key", ctypes.c_int64), ("high_key", ctypes.c_int64),
        ("key_low", ctypes.c_uint32), ("key_high", ctypes.c_uint32),
        ("scale", ctypes.c_float), ("reserved", ctypes.c_int32),
        ("low_from", ctypes.c_int64), ("low_to", ctypes.c_int64),
        ("high_from", ctypes.c_int64), ("high_to", ctypes.c_int64),
    ]


# Every pointer is passed as void* (ctypes then accepts addresses, arrays and byref() alike); the
# parameter's C type still decides how `bind` converts the Python argument.
SCALAR_TYPES: dict[str, Any] = {
    "int": ctypes.c_int, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64,
    "float": ctypes.c_float, "double": ctypes.c_double,
}
POINTER_TYPES = ("void*", "const void*", "uint8_t*", "const uint8_t*", "const void* const*", "uint32_t* const*",
                 "const float*", "const double*", "const int32_t*", "const int64_t*", "int64_t*", "double*",
                 "const dtm_sparsify*")


def c_type(name: str):
    return ctypes.c_void_p if name in POINTER_TYPES else SCALAR_TYPES[name]


@dataclass(frozen=True)
class CParam:
    ctype: str
    name: str


def parse_signatures(text: str) -> dict[str, list[CParam]]:
    """'name(type a, type b)' lines -> {name: [CParam, ...]}."""
    signatures = {}
    for line in text.strip().splitlines():
        match = re.fullmatch(r"(\w+)\((.*)\)", line.strip())
        if match is None:
            raise ValueError(f"unreadable kernel signature {line!r}")
        params = []
        for part in filter(None, (p.strip() for p in match.group(2).split(","))):
            ctype, name = part.rsplit(None, 1)
            while name.startswith("*"):  # 'int64_t *x' spelled with the star on the name
                ctype, name = ctype + "*", name[1:]
            params.append(CParam(" ".join(ctype.replace("*", "* ").split()).replace("* *", "**").replace(" *", "*"),
                                 name))
        signatures[match.group(1)] = params
    return signatures


_library: ctypes.CDLL | None = None  # with .signatures: its operations and their C parameters
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
    library.dtm_kernels_signatures.restype = ctypes.c_char_p
    library.dtm_kernels_signatures.argtypes = []
    signatures = parse_signatures(library.dtm_kernels_signatures().decode())
    for name, params in signatures.items():
        function = getattr(library, f"dtm_{name}")
        unknown = [p.ctype for p in params if p.ctype not in POINTER_TYPES and p.ctype not in SCALAR_TYPES]
        if unknown:
            raise AttributeError(f"dtm_{name} has parameter types {unknown} that native.py does not know")
        function.argtypes = [c_type(p.ctype) for p in params]
        function.restype = ctypes.c_int
    for name, argtypes in (("dtm_kernels_isa", []), ("dtm_kernels_set_isa", [ctypes.c_int])):
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = ctypes.c_int
    library.signatures = signatures


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
        except (AttributeError, ValueError) as error:
            return None, f"{path} lacks a kernel or describes it oddly ({error}); rebuild it with `pip install -e .`"
        log.debug("native kernels loaded from %s", path)
        return library, None
    return None, f"{LIBRARY_NAME} not found (looked in {', '.join(tried)}); build it with `pip install -e .`"


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None. Loads the library once and caches the answer."""
    global _library, _problem, _looked
    if not _looked:
        _library, _problem = _load()
        _looked = True
    return _problem


def library() -> ctypes.CDLL:
    problem = unavailable_reason()
    if problem is not None:
        raise RuntimeError(f"the cpu backend cannot run: {problem}")
    return _library


def operations() -> dict[str, list[CParam]]:
    """Every native operation and its C parameters."""
    return dict(library().signatures)


def kernels_isa() -> str:
    """The instruction set the kernels run with on this CPU (generic, avx2 or avx512)."""
    return ISA_NAMES[library().dtm_kernels_isa()]


def set_kernels_isa(name: str) -> None:
    """Force an instruction set (tests compare them); ValueError when the CPU lacks it."""
    code = {v: k for k, v in ISA_NAMES.items()}[name]
    if library().dtm_kernels_set_isa(code) != 0:
        raise ValueError(f"this CPU cannot run the {name} kernels")


def check(status: int, operation: str) -> None:
    if status != 0:
        raise ValueError(f"libdtm_kernels {operation} rejected its arguments (status {status})")


# -- arrays as the kernels take them -------------------------------------------------------------------
def dtype_name(array) -> str:
    """The safetensors dtype name of a HostArray or torch tensor ("?" for dtypes kernels never see)."""
    if isinstance(array, HostArray):
        return array.dtype
    return tag_of(getattr(array, "dtype", "")) or "?"


def supported(arrays: Sequence) -> bool:
    return all(dtype_name(a) in DTYPE_CODES for a in arrays)


def address(array) -> int:
    return array.address if isinstance(array, HostArray) else array.data_ptr()


def as_torch(value):
    """HostArrays (also inside lists) as torch tensors sharing their bytes, for the reference."""
    if isinstance(value, HostArray):
        return value.torch()
    if isinstance(value, (list, tuple)) and any(isinstance(v, HostArray) for v in value):
        return [as_torch(v) for v in value]
    return value


class KernelInputs:
    """Chunk inputs as the kernels read them: addresses and one dtype code. Mixed bf16/fp16/fp32
    inputs are widened to fp32 copies (exact) and non-contiguous tensors copied; the copies are
    kept alive here for the duration of the call."""

    def __init__(self, arrays: Sequence):
        for array in arrays:
            if not isinstance(array, HostArray) and array.device.type != "cpu":
                raise ValueError("the cpu backend takes CPU tensors")
        names = {dtype_name(a) for a in arrays}
        if len(names) > 1:
            arrays = [as_torch(a).float() for a in arrays]
            names = {"F32"}
        self.arrays = [a if isinstance(a, HostArray) or a.is_contiguous() else a.contiguous() for a in arrays]
        self.code = DTYPE_CODES[names.pop()] if names else 0
        self.addresses = [address(a) for a in self.arrays]

    def pointers(self, first: int = 0, stop: int | None = None):
        addresses = self.addresses[first:stop]
        return (ctypes.c_void_p * max(1, len(addresses)))(*addresses)

    def count(self, out, operation: str) -> int:
        count = out.numel() if out is not None else (self.arrays[0].numel() if self.arrays else 0)
        for array in self.arrays:
            if array.numel() != count:
                raise ValueError(f"{operation}: chunk inputs have {array.numel()} and {count} elements")
        return count


class KernelOutput:
    """A contiguous output the kernels can write (a temporary when a torch `out` is not), copied back."""

    def __init__(self, out):
        self.out = out
        self.target = out if isinstance(out, HostArray) or out.is_contiguous() else out.new_empty(out.shape)
        self.address = address(self.target)
        self.code = DTYPE_CODES[dtype_name(out)]

    def finish(self) -> None:
        if self.target is not self.out:
            self.out.copy_(self.target)


def floats(values: Sequence[float], ctype=ctypes.c_float):
    return (ctype * max(1, len(values)))(*[float(v) for v in values])


# -- automatic binding -----------------------------------------------------------------------------------
INPUT_TYPES = ("const void*", "const void* const*")
RESULT_TYPES = {"int64_t*": ctypes.c_int64, "double*": ctypes.c_double}


def bind(name: str, python_params: Sequence[str]) -> Callable[..., Any] | None:
    """A function taking the reference operation's arguments (by `python_params` order) that runs
    native operation `name`, or None when its C parameters do not follow the conventions above."""
    params = operations().get(name)
    if params is None:
        return None
    names = set(python_params)
    plan = []  # how each C parameter gets its value
    for param in params:
        base_name = param.name[:-len("_dtype")] if param.name.endswith("_dtype") else None
        if param.name in names and param.ctype in INPUT_TYPES + ("void*",):
            plan.append(("array", param))
        elif base_name is not None and base_name in names:
            plan.append(("dtype_of", param))
        elif param.name == "dtype":
            plan.append(("common_dtype", param))
        elif param.name.startswith("num_") and param.name[4:] in names:
            plan.append(("length", param))
        elif param.name == "n":
            plan.append(("count", param))
        elif param.name in names and param.ctype in ("const float*", "const double*"):
            plan.append(("values", param))
        elif param.name in names and param.ctype in SCALAR_TYPES:
            plan.append(("scalar", param))
        elif param.name not in names and param.ctype in RESULT_TYPES:
            plan.append(("result", param))
        else:
            return None
    function = getattr(library(), f"dtm_{name}")
    own_dtype = {p.name[:-len("_dtype")] for kind, p in plan if kind == "dtype_of"}
    inputs = [p for kind, p in plan if kind == "array" and p.ctype in INPUT_TYPES]
    output_name = next((p.name for kind, p in plan if kind == "array" and p.ctype == "void*"), None)

    def call(*args, **kwargs):
        values = dict(zip(python_params, args))
        values.update(kwargs)
        group_arrays = {p.name: list(values[p.name]) if p.ctype == "const void* const*" else [values[p.name]]
                        for p in inputs}
        everything = [a for arrays in group_arrays.values() for a in arrays]
        output = values[output_name] if output_name is not None else None
        if not supported(everything + ([output] if output is not None else [])):
            return NotImplemented
        # inputs without a dtype parameter of their own share `dtype`: read as one group (widened to
        # fp32 together when their dtypes differ), then split back into their parameters
        groups: dict[str, KernelInputs] = {}
        shared_names = [p.name for p in inputs if p.name not in own_dtype]
        shared = KernelInputs([a for key in shared_names for a in group_arrays[key]])
        position = 0
        for key in shared_names:
            groups[key] = shared
            group_arrays[key] = (position, position + len(group_arrays[key]))
            position = group_arrays[key][1]
        for key in own_dtype - {output_name}:
            groups[key] = KernelInputs(group_arrays[key])
            group_arrays[key] = (0, len(group_arrays[key]))
        target = KernelOutput(output) if output is not None else None
        counts = {a.numel() for group in {id(g): g for g in groups.values()}.values() for a in group.arrays}
        if output is not None:
            counts.add(output.numel())
        if len(counts) > 1:
            raise ValueError(f"{name}: chunk arrays have {sorted(counts)} elements; they must be equal")
        c_args, results = [], []
        for kind, param in plan:
            if kind == "array" and param.ctype == "void*":
                c_args.append(target.address)
            elif kind == "array":
                first, stop = group_arrays[param.name]
                pointers = groups[param.name].pointers(first, stop)
                c_args.append(pointers[0] if param.ctype == "const void*" else pointers)
            elif kind == "dtype_of":
                key = param.name[:-len("_dtype")]
                c_args.append(target.code if key == output_name else groups[key].code)
            elif kind == "common_dtype":
                c_args.append(shared.code)
            elif kind == "length":
                c_args.append(len(values[param.name[4:]]))
            elif kind == "count":
                c_args.append(counts.pop() if counts else 0)
            elif kind == "values":
                c_args.append(floats(values[param.name], ctypes.c_double if param.ctype == "const double*"
                                     else ctypes.c_float))
            elif kind == "scalar":
                c_args.append(values[param.name])
            else:
                results.append(RESULT_TYPES[param.ctype]())
                c_args.append(ctypes.byref(results[-1]))
        check(function(*c_args), name)
        if target is not None:
            target.finish()
        if not results:
            return None
        return results[0].value if len(results) == 1 else tuple(r.value for r in results)

    return call
