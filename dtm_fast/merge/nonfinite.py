"""NaN and infinity in the inputs: counted in every input chunk as it is read (once per chunk, on
the reader thread, off the merge's critical path), reported per tensor and input file after the
merge and recorded in dtm_merge.json; with --strict the first one stops the merge.

A non-finite weight poisons every output element it reaches, and a merge that publishes such a
model without saying so is a silently wrong result. Counting compares exponent bits (all ones), so
it needs no widening: the native kernel when the library loads, numpy otherwise (never torch).
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np

from dtm_fast.errors import DtmError

EXPONENT_BITS = {"F32": (np.uint32, 0x7F800000), "BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00),
                 "F64": (np.uint64, 0x7FF0000000000000)}
REPORTED_TENSORS = 8  # named in the warning; dtm_merge.json has every count


def _numpy_count(raw: np.ndarray, dtype: str) -> int:
    width, exponent = EXPONENT_BITS[dtype]
    bits = raw.view(width)
    return int(np.count_nonzero((bits & width(exponent)) == width(exponent)))


class NonFiniteCounts:
    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: dict[tuple[str, str], int] = defaultdict(int)  # (tensor, file) -> elements
        self._counted: set[tuple[int, str, int]] = set()  # (stream, file, chunk start): passes re-read chunks
        self._lock = threading.Lock()
        self._native = None
        try:
            from dtm_fast.merge.backends import native

            if native.unavailable_reason() is None:
                self._native = native.bind("count_nonfinite", ["data"])
        except (OSError, ValueError):
            self._native = None

    def count(self, raw: np.ndarray, dtype: str) -> int:
        if dtype not in EXPONENT_BITS or raw.nbytes == 0:
            return 0
        if self._native is not None and dtype != "F64":
            from dtm_fast.merge.host_array import HostArray

            return int(self._native(HostArray(raw, dtype)))
        return _numpy_count(raw, dtype)

    def check(self, stream_id: int, tensor: str, file: str, start: int, raw: np.ndarray, dtype: str) -> None:
        """Count one input chunk's non-finite elements (the first time this chunk is read)."""
        key = (stream_id, file, start)
        with self._lock:
            if key in self._counted:
                return
            self._counted.add(key)
        found = self.count(raw, dtype)
        if not found:
            return
        with self._lock:
            self.counts[(tensor, file)] += found
        if self.strict:
            raise DtmError(f"tensor {tensor!r} in {file} holds {found} NaN or infinite value(s) (from element "
                           f"{start}); --strict refuses non-finite inputs. Without --strict they are merged and "
                           "reported")

    def check_factors(self, tensor: str, file: str, factors) -> None:
        """LoRA factors (fp32 torch tensors) of one module: they reach every element of the tensor."""
        import torch

        found = sum(int(f.numel() - torch.isfinite(f).sum()) for f in factors)
        if found:
            with self._lock:
                self.counts[(tensor, file)] += found
            if self.strict:
                raise DtmError(f"the LoRA factors of {tensor!r} in {file} hold {found} NaN or infinite value(s); "
                               "--strict refuses non-finite inputs")

    def records(self) -> list[dict]:
        return [{"tensor": tensor, "file": file, "count": count}
                for (tensor, file), count in sorted(self.counts.items())]

    def summary(self) -> str | None:
        """One warning line naming the worst tensors, or None when every input was finite."""
        if not self.counts:
            return None
        worst = sorted(self.counts.items(), key=lambda item: -item[1])
        named = "; ".join(f"{tensor} in {file}: {count}" for (tensor, file), count in worst[:REPORTED_TENSORS])
        more = f" (and {len(worst) - REPORTED_TENSORS} more)" if len(worst) > REPORTED_TENSORS else ""
        total = sum(self.counts.values())
        return (f"the inputs hold {total} NaN or infinite value(s), merged as they are: {named}{more}; every count "
                "is in dtm_merge.json (nonfinite_inputs); --strict refuses such inputs")
