"""Typed views of the merge's host byte buffers without torch.

The native (cpu) backend only needs an address, a dtype and a length, so chunks handed to it are
`HostArray`s over numpy byte buffers and a native merge never imports torch (about 2 s of start-up
on a small machine, more than a whole 1 GB merge takes). Backends that compute with torch get
zero-copy torch views of the same bytes instead (`torch_dtype`, `HostArray.torch`).
"""

from __future__ import annotations

import numpy as np

from dtm_fast.io.dtypes import DTYPE_SIZES, torch_dtype  # noqa: F401 - torch_dtype re-exported


class HostArray:
    """A 1-D array of safetensors dtype `dtype` stored in the numpy byte buffer `raw` (contiguous)."""

    __slots__ = ("raw", "dtype")

    def __init__(self, raw: np.ndarray, dtype: str):
        if raw.dtype != np.uint8 or raw.ndim != 1 or not raw.flags.c_contiguous:
            raise ValueError("HostArray takes a contiguous 1-D uint8 buffer")
        if raw.nbytes % DTYPE_SIZES[dtype]:
            raise ValueError(f"{raw.nbytes} bytes are not whole {dtype} elements")
        self.raw = raw
        self.dtype = dtype

    def __getitem__(self, index: slice) -> "HostArray":
        """Elements start:stop (step 1), sharing the bytes."""
        start, stop, step = index.indices(self.numel())
        if step != 1:
            raise ValueError("HostArray slices take step 1")
        size = DTYPE_SIZES[self.dtype]
        return HostArray(self.raw[start * size: max(start, stop) * size], self.dtype)

    def numel(self) -> int:
        return self.raw.nbytes // DTYPE_SIZES[self.dtype]

    @property
    def address(self) -> int:
        return self.raw.__array_interface__["data"][0]

    def torch(self):
        """A torch tensor sharing these bytes. Mapped input chunks are read-only; torch warns about
        such arrays, but the torch backends never write their inputs, so the warning is silenced."""
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.raw).view(torch_dtype(self.dtype))
