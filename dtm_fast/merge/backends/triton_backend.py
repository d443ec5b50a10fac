"""The Triton backend: the reference backend's chunk operations as Triton kernels on CUDA.

The engine hands every operation 1-D CPU chunks (pinned, because `wants_pinned_buffers` is set).
Each call copies them into persistent device buffers sized to the largest chunk seen (no allocation
in the steady state), runs one kernel on the backend's own CUDA stream, copies the result back and
synchronises before returning; meanwhile the engine's reader thread reads the next chunk from disk.

Under TRITON_INTERPRET=1 the same code runs the kernels on CPU tensors through Triton's interpreter:
that is how the kernels are tested on machines without a GPU (tests/backends). Kernels live in
`triton_kernels.py`; the reference backend (`reference.py`) is their specification.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Sequence

import torch

from dtm_fast.errors import DtmError
from dtm_fast.merge.backends.devices import interpreting
from dtm_fast.merge.backends.reference import (
    GtaSpec, ReferenceBackend, Sparsify, model_stock_ratio, slerp_coefficients_from_products,
)
from dtm_fast.merge.magnitude import BINS

if TYPE_CHECKING:
    import numpy

log = logging.getLogger(__name__)

BLOCK = 1024  # elements per program of the elementwise kernels
GRAM_SEGMENT = 1 << 16  # elements per program of delta_gram's partial Gram matrices
CAPACITY_STEP = 1 << 16  # device buffers grow in these steps, so a short last chunk never regrows them
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # index = the kernels' dtype code
SPARSIFY_CODES = {"none": 0, "band": 1, "random": 2}
CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}


def unavailable_reason() -> str | None:
    """Why the Triton backend cannot run here, or None when it can."""
    if not interpreting() and not torch.cuda.is_available():  # checked first: importing triton takes a while
        return "CUDA is not available (this torch build or machine has no usable GPU)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'dtm_fast[triton]')"
    try:
        import triton  # noqa: F401  (a broken installation fails here)
    except Exception as error:  # any import failure means the backend cannot run
        return f"triton does not import: {error}"
    return None


def dtype_code(dtype: torch.dtype) -> int | None:
    return KERNEL_DTYPES.index(dtype) if dtype in KERNEL_DTYPES else None


def kernel_view(tensor: torch.Tensor) -> torch.Tensor:
    """What a kernel pointer receives: bf16 as its int16 bits (see triton_kernels)."""
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


class _DeviceBuffers:
    """Persistent device tensors by role; a role's tensor only grows (to the largest chunk)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, role: str, rows: int, elements: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, >= elements) tensor of `dtype`, contents undefined."""
        current = self._tensors.get(role)
        if current is None or current.dtype != dtype or current.shape[0] < rows or current.shape[1] < elements:
            capacity = -(-max(elements, 1) // CAPACITY_STEP) * CAPACITY_STEP
            if current is not None and current.dtype == dtype:
                capacity = max(capacity, current.shape[1])
                rows = max(rows, current.shape[0])
            self._tensors.pop(role, None)
            del current  # release before allocating the larger one
            try:
                self._tensors[role] = torch.empty((rows, capacity), dtype=dtype, device=self.device)
            except torch.OutOfMemoryError as error:
                raise DtmError(f"the GPU has no room for a {rows} x {capacity} {dtype} chunk buffer; "
                               "lower --max-memory so chunks are smaller") from error
        return self._tensors[role]


class TritonBackend(ReferenceBackend):
    """Chunks arrive as torch views of the (pinned) host buffers: the inherited `view`."""

    name = "triton"
    wants_pinned_buffers = True  # cleared under the interpreter, where nothing is copied to a GPU
    accelerated = frozenset({"linear", "gta", "model_stock_combine", "model_stock_rows", "slerp_rows", "fisher",
                             "abs_delta_histogram", "abs_delta_select", "masked_l1", "delta_gram"})

    def __init__(self, device: str | torch.device | None = None):
        from dtm_fast.merge.backends import triton_kernels  # imports triton: only once the backend is used

        self.kernels = triton_kernels
        self.device = torch.device(device if device is not None else ("cpu" if interpreting() else "cuda"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.on_cuda = self.device.type == "cuda"
        if not self.on_cuda:
            self.wants_pinned_buffers = False
        self.buffers = _DeviceBuffers(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._parameters: dict[tuple, torch.Tensor] = {}  # small per-spec parameter tensors on the device
        self._host_histogram = torch.empty(BINS, dtype=torch.int64, pin_memory=self.on_cuda)

    def workspace_bytes_per_element(self, num_inputs: int) -> int:
        # On CUDA every buffer is on the device: no host memory beyond the engine's chunks. The
        # interpreter stages copies of the inputs and the output on the host (at most 4 bytes each),
        # plus per-row float64 Gram matrices, M x M per row, worst case rows of one element.
        return 0 if self.on_cuda else 4 * (num_inputs + 1) + 8 * num_inputs ** 2

    # -- plumbing ------------------------------------------------------------------------------------
    def _launch(self, kernel, grid: tuple[int, ...], *args, **constexprs) -> None:
        # FMA contraction off: the reference rounds every product and sum separately
        kernel[grid](*args, enable_fp_fusion=False, **constexprs)

    def _run_elementwise(self, out: torch.Tensor, work) -> None:
        """Run work(count) for an operation that fills `out` (nothing to do for an empty chunk)."""
        count = out.numel()
        if count:
            self._run(lambda: work(count))

    def _run(self, work):
        """Run `work()` (copies in, kernels, copies out) on the backend's stream and wait for it."""
        if not self.on_cuda:
            return work()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            result = work()
        self.stream.synchronize()
        return result

    def _stage(self, role: str, tensors: Sequence[torch.Tensor], count: int) -> tuple[torch.Tensor, int]:
        """Copy 1-D host chunks into rows of a device buffer; returns (buffer, dtype code). Inputs
        of differing or non-kernel dtypes are converted to fp32 on the way."""
        dtypes = {tensor.dtype for tensor in tensors}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if dtype_code(dtype) is None:
            dtype = torch.float32
        buffer = self.buffers.get(role, len(tensors), count, dtype)
        for row, tensor in enumerate(tensors):
            if tensor.numel() != count:
                raise ValueError(f"chunk inputs differ in length: {tensor.numel()} != {count}")
            buffer[row, :count].copy_(tensor, non_blocking=True)
        return kernel_view(buffer), dtype_code(dtype)

    def _stage_base_models(self, base: torch.Tensor, models: Sequence[torch.Tensor], count: int):
        """(base buffer, its dtype code, models buffer, their dtype code) on the device."""
        staged_base, base_kind = self._stage("base", [base], count)
        staged, model_kind = self._stage("models", models, count)
        return staged_base, base_kind, staged, model_kind

    def _output(self, out: torch.Tensor) -> tuple[torch.Tensor, int]:
        dtype = out.dtype if dtype_code(out.dtype) is not None else torch.float32
        return self.buffers.get("out", 1, out.numel(), dtype), dtype_code(dtype)

    def _finish(self, out: torch.Tensor, result: torch.Tensor) -> None:
        # a non-contiguous destination goes through a host temporary that torch fills after the
        # asynchronous copy would return: copy synchronously then
        out.copy_(result[0, :out.numel()], non_blocking=out.is_contiguous())

    def _parameter_tensor(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        """Device tensor of `values` (converted as torch converts Python scalars), cached by value."""
        key = (dtype, tuple(values))
        tensor = self._parameters.get(key)
        if tensor is None:
            if len(self._parameters) > 256:  # one entry per distinct spec; bound the cache anyway
                self._parameters.clear()
            tensor = torch.tensor(list(values), dtype=dtype).to(self.device)
            self._parameters[key] = tensor
        return tensor

    @staticmethod
    def _grid(count: int, block: int = BLOCK) -> tuple[int]:
        return (-(-count // block),)

    # -- combines --------------------------------------------------------------------------------------
    def linear(self, out: torch.Tensor, models: Sequence[torch.Tensor], coefficients: Sequence[float]) -> None:

        def work(count: int) -> None:
            staged, model_kind = self._stage("models", models, count)
            result, out_kind = self._output(out)
            coefficient_tensor = self._parameter_tensor([float(c) for c in coefficients], torch.float32)
            self._launch(self.kernels.linear_kernel, self._grid(count), kernel_view(result), staged,
                         staged.stride(0), coefficient_tensor, count,
                         K=len(models), MODEL_KIND=model_kind, OUT_KIND=out_kind, BLOCK=BLOCK)
            self._finish(out, result)

        self._run_elementwise(out, work)

    def gta(self, out: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor], spec: GtaSpec,
            start: int) -> None:
        if spec.consensus not in CONSENSUS_CODES:
            raise ValueError(f"unknown consensus {spec.consensus!r}")
        kinds = 0
        for index, rule in enumerate(spec.sparsify):
            if rule.kind not in SPARSIFY_CODES:
                raise ValueError(f"unknown sparsification {rule.kind!r}")
            kinds |= SPARSIFY_CODES[rule.kind] << (2 * index)
        total = float(sum(spec.weights))
        divisor = 1.0 if abs(total) < 1e-8 else total
        float_params = [*spec.weights, *(rule.scale for rule in spec.sparsify), spec.lambda_, divisor]

        def work(count: int) -> None:
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, models, count)
            result, out_kind = self._output(out)
            self._launch(self.kernels.gta_kernel, self._grid(count), kernel_view(result), staged_base, staged,
                         staged.stride(0), self._rule_parameters(spec.sparsify),
                         self._parameter_tensor(float_params, torch.float32), start, count,
                         K=len(models), SPARSIFY_KINDS=kinds, CONSENSUS=CONSENSUS_CODES[spec.consensus],
                         NORMALIZE=bool(spec.normalize), BASE_KIND=base_kind, MODEL_KIND=model_kind,
                         OUT_KIND=out_kind, BLOCK=BLOCK)
            self._finish(out, result)

        self._run_elementwise(out, work)

    def _rule_parameters(self, rules: Sequence[Sparsify]) -> torch.Tensor:
        values = []
        for rule in rules:  # triton_kernels.RULE_INTS of them, in this order
            values += [rule.low_key, rule.high_key, rule.philox_key[0], rule.philox_key[1], rule.threshold,
                       rule.low_from, rule.low_to, rule.high_from, rule.high_to]
        return self._parameter_tensor(values, torch.int64)

    def model_stock_combine(self, out: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor],
                            ratio: float) -> None:

        def work(count: int) -> None:
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, models, count)
            # fp32 t, and fp32 (1 - t) rounded from float64 as torch rounds the Python scalar
            self._model_stock(out, staged_base, base_kind, staged, model_kind, len(models),
                              self._parameter_tensor([ratio], torch.float32), float(1 - ratio), row_length=0)

        self._run_elementwise(out, work)

    def model_stock_rows(self, out: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor],
                         row_length: int) -> None:

        def work(count: int) -> None:
            rows = count // row_length
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, models, count)
            gram = self._row_gram(staged, model_kind, len(models), staged_base, base_kind, count, row_length)
            ratios = model_stock_ratio(gram[:rows]).float()  # (rows,)
            self._model_stock(out, staged_base, base_kind, staged, model_kind, len(models), ratios, 0.0,
                              row_length=row_length)

        self._run_elementwise(out, work)

    def _model_stock(self, out, staged_base, base_kind, staged, model_kind, model_count, ratios, complement,
                     row_length):
        """row_length 0: one ratio for the chunk and `complement` = 1 - t; else one ratio per row."""
        count = out.numel()
        result, out_kind = self._output(out)
        self._launch(self.kernels.model_stock_kernel, self._grid(count), kernel_view(result), staged_base, staged,
                     staged.stride(0), ratios, complement, count, max(row_length, 1),
                     K=model_count,
                     PER_ROW=row_length > 0, BASE_KIND=base_kind, MODEL_KIND=model_kind,
                     OUT_KIND=out_kind, BLOCK=BLOCK)
        self._finish(out, result)

    def slerp_rows(self, out: torch.Tensor, first: torch.Tensor, second: torch.Tensor, row_length: int,
                   t: float) -> None:

        def work(count: int) -> None:
            rows = count // row_length
            staged, kind = self._stage("models", [first, second], count)
            gram = self._row_gram(staged, kind, 2, None, 0, count, row_length)[:rows]  # (rows, 2, 2)
            coef_a, coef_b = slerp_coefficients_from_products(gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1], t)
            coefficients = torch.stack([coef_a, coef_b], dim=1).float().contiguous()  # (rows, 2)
            result, out_kind = self._output(out)
            self._launch(self.kernels.slerp_kernel, self._grid(count), kernel_view(result), staged[0], staged[1],
                         coefficients, count, row_length, FIRST_KIND=kind, SECOND_KIND=kind, OUT_KIND=out_kind,
                         BLOCK=BLOCK)
            self._finish(out, result)

        self._run_elementwise(out, work)

    def fisher(self, out: torch.Tensor, models: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
               weights: Sequence[float], epsilon: float) -> None:

        def work(count: int) -> None:
            staged, model_kind = self._stage("models", models, count)
            staged_fishers, fisher_kind = self._stage("fishers", fishers, count)
            result, out_kind = self._output(out)
            parameters = self._parameter_tensor([*(float(w) for w in weights), float(epsilon)], torch.float32)
            self._launch(self.kernels.fisher_kernel, self._grid(count), kernel_view(result), staged, staged.stride(0),
                         staged_fishers, staged_fishers.stride(0), parameters, count, K=len(models),
                         MODEL_KIND=model_kind, FISHER_KIND=fisher_kind, OUT_KIND=out_kind, BLOCK=BLOCK)
            self._finish(out, result)

        self._run_elementwise(out, work)

    # -- statistics ------------------------------------------------------------------------------------
    def abs_delta_histogram(self, base: torch.Tensor, model: torch.Tensor, histogram: torch.Tensor,
                            bucket: int | None) -> None:
        count = base.numel()
        if count == 0:
            return

        def work():
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, [model], count)
            counts = self.buffers.get("histogram", 1, BINS, torch.int64)[0, :BINS]
            counts.zero_()
            self._launch(self.kernels.abs_delta_histogram_kernel, self._grid(count), counts, staged_base, staged,
                         count, -1 if bucket is None else int(bucket), SELECT_BUCKET=bucket is not None,
                         BASE_KIND=base_kind, MODEL_KIND=model_kind, BLOCK=BLOCK)
            self._host_histogram.copy_(counts, non_blocking=True)

        self._run(work)
        torch.as_tensor(histogram).add_(self._host_histogram)  # numpy histograms are updated in place too

    def abs_delta_select(self, base: torch.Tensor, models: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int]],
                         collected: Sequence["numpy.ndarray"]) -> list[tuple[int, int]]:
        """As ReferenceBackend.abs_delta_select: a kernel writes each model's keys on the device,
        torch counts and compacts them there, and only the collected keys come back to the host."""
        count = base.numel()
        if count == 0:
            return [(0, 0)] * len(models)

        def work():
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, models, count)
            keys = self.buffers.get("keys", 1, count, torch.int32)[0, :count]
            results = []
            for row, ((low, high), target) in enumerate(zip(ranges, collected)):
                self._launch(self.kernels.abs_delta_keys_kernel, self._grid(count), keys, staged_base, staged[row],
                             count, BASE_KIND=base_kind, MODEL_KIND=model_kind, BLOCK=BLOCK)
                inside = keys[(keys >= low) & (keys <= high)]
                room = min(len(target), inside.numel())
                target[:room] = inside[:room].cpu().numpy().view(target.dtype)  # keys are >= 0: same bits
                results.append((int((keys > high).sum()), inside.numel()))
            return results

        return self._run(work)

    def masked_l1(self, base: torch.Tensor, model: torch.Tensor, rule: Sparsify, start: int) -> tuple[float, float]:
        count = base.numel()
        if count == 0:
            return 0.0, 0.0
        if rule.kind not in SPARSIFY_CODES:
            raise ValueError(f"unknown sparsification {rule.kind!r}")

        def work():
            staged_base, base_kind, staged, model_kind = self._stage_base_models(base, [model], count)
            programs = self._grid(count)[0]
            partials = self.buffers.get("partials", 1, 2 * programs, torch.float64)[0, :2 * programs]
            self._launch(self.kernels.masked_l1_kernel, (programs,), partials, staged_base, staged,
                         self._rule_parameters([rule]), start, count, SPARSIFY_KIND=SPARSIFY_CODES[rule.kind],
                         BASE_KIND=base_kind, MODEL_KIND=model_kind, BLOCK=BLOCK)
            return partials.view(programs, 2).sum(0).tolist()

        total, kept = self._run(work)
        return float(total), float(kept)

    def delta_gram(self, base: torch.Tensor | None, models: Sequence[torch.Tensor]) -> "numpy.ndarray":
        count = (models[0] if base is None else base).numel()
        if count == 0:
            return torch.zeros((len(models), len(models)), dtype=torch.float64).numpy()

        def work():
            if base is None:  # the inputs' own Gram matrix
                staged, model_kind = self._stage("models", models, count)
                staged_base, base_kind = None, model_kind
            else:
                staged_base, base_kind, staged, model_kind = self._stage_base_models(base, models, count)
            partial = self._row_gram(staged, model_kind, len(models), staged_base, base_kind, count, GRAM_SEGMENT)
            return partial.sum(0).cpu()

        return self._run(work).numpy()

    def _row_gram(self, staged, kind, count_inputs, staged_base, base_kind, count, row_length) -> torch.Tensor:
        """(rows, M, M) float64 Gram matrices of the inputs' rows of `row_length` (deltas from the base
        when one is given); the last row may be short."""
        rows = -(-count // row_length)
        padded = max(2, triton_next_power_of_2(count_inputs))
        block = max(16, min(1024, 4096 // (padded * padded)))  # bounds the (M, M, BLOCK) products' registers
        gram = self.buffers.get("gram", 1, rows * count_inputs * count_inputs, torch.float64)
        gram = gram[0, :rows * count_inputs * count_inputs]
        self._launch(self.kernels.row_gram_kernel, (rows,), gram, staged if staged_base is None else staged_base,
                     staged, staged.stride(0), count, row_length, M=count_inputs, M_PAD=padded,
                     SUBTRACT_BASE=staged_base is not None, BASE_KIND=base_kind, INPUT_KIND=kind, BLOCK=block)
        return gram.view(rows, count_inputs, count_inputs)


def triton_next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())
