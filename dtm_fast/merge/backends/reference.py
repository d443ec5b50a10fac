"""The reference backend: every chunk operation of the merger in plain torch, fp32. It is the base
class of every backend and the specification of every operation: `CpuBackend` and `TritonBackend`
derive from it, override the operations they accelerate and inherit the rest.

Chunk inputs are 1-D tensors (a contiguous range of one tensor's elements) in their stored dtype;
`out` is a 1-D tensor in the output dtype that receives the result rounded to nearest-even.
Reductions (norms, dot products, L1 sums) accumulate in float64 so that their value does not depend
on chunking. torch is imported inside each operation, not here: the cpu backend derives from this
class, and a native merge never imports torch (seconds of start-up on small machines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from dtm_fast.merge.backends.reference_methods import MethodOps
from dtm_fast.merge.specs import NO_UPPER_KEY, GtaSpec, Sparsify  # noqa: F401 - NO_UPPER_KEY re-exported

if TYPE_CHECKING:
    import numpy
    import torch

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


class ReferenceBackend(MethodOps):
    """Capabilities are class attributes, read by the engine (never probed with getattr)."""

    name = "reference"
    reads_mapped = False  # chunks may be views of the memory-mapped inputs instead of copies in buffers
    wants_pinned_buffers = False  # the engine's buffers are page-locked (for asynchronous device copies)
    accelerated: frozenset[str] = frozenset()  # chunk operations run by this backend's own kernels

    def view(self, raw: "numpy.ndarray", dtype: str):
        """A chunk's bytes as the array this backend computes on (shares the memory)."""
        from dtm_fast.merge.host_array import HostArray

        return HostArray(raw, dtype).torch()

    def workspace_bytes_per_element(self, num_inputs: int) -> int:
        # fp32 copies of every input, the stacked deltas and masks, plus Philox's int64 temporaries
        return 4 * (2 * num_inputs + 6) + 80

    # -- combines ------------------------------------------------------------------------------------
    def linear(self, out: "torch.Tensor", models: Sequence["torch.Tensor"], coefficients: Sequence[float]) -> None:
        """out = sum_i coefficients[i] * models[i]"""
        import torch

        accumulator = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for model, coefficient in zip(models, coefficients):
            accumulator += model.float() * coefficient
        out.copy_(accumulator)

    def gta(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"], spec: GtaSpec,
            start: int) -> None:
        """Generalised task arithmetic (methods/gta.py): y = b + lambda * combine_i(w_i sparsify_i(x_i - b))."""
        import torch

        base32 = base.float()
        weighted = []
        for model, weight, rule in zip(models, spec.weights, spec.sparsify):
            delta = model.float() - base32
            mask = keep_mask(delta, rule, start)
            if mask is not None:
                delta = torch.where(mask, delta * rule.scale, torch.zeros_like(delta))
            weighted.append(delta * weight)
        stacked = torch.stack(weighted)  # (models, elements)
        weights = torch.tensor(spec.weights, dtype=torch.float32, device=out.device).unsqueeze(1)
        if spec.consensus is not None:
            positive, negative = stacked > 0, stacked < 0
            if spec.consensus == "sum":
                majority_positive = stacked.sum(0) >= 0
            else:
                majority_positive = (positive.sum(0) - negative.sum(0)) >= 0
            agree = torch.where(majority_positive, positive, negative)
            mixed = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
            divisor = torch.where(agree, weights.expand_as(stacked), torch.zeros_like(stacked)).sum(0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = stacked.sum(0)
            total = float(sum(spec.weights))
            divisor = torch.full_like(mixed, 1.0 if abs(total) < 1e-8 else total)
        if spec.normalize:
            mixed = mixed / divisor
        out.copy_(base32 + mixed * spec.lambda_)

    def model_stock_combine(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"],
                            ratio: float) -> None:
        """y = ratio * mean_i(x_i) + (1 - ratio) * b."""
        import torch

        average = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for model in models:
            average += model.float()
        average /= len(models)
        out.copy_(average * ratio + base.float() * (1 - ratio))

    def fisher(self, out: "torch.Tensor", models: Sequence["torch.Tensor"], fishers: Sequence["torch.Tensor"],
               weights: Sequence[float], epsilon: float) -> None:
        """y = sum_i w_i (F_i + eps) x_i / sum_i w_i (F_i + eps)."""
        import torch

        numerator = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        denominator = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for model, fisher, weight in zip(models, fishers, weights):
            importance = (fisher.float() + epsilon) * weight
            numerator += importance * model.float()
            denominator += importance
        out.copy_(numerator / denominator)

    # -- per-row operations --------------------------------------------------------------------------
    def model_stock_rows(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"],
                         row_length: int) -> None:
        """Model stock with one interpolation ratio per row of `row_length` elements (filter_wise)."""
        import torch

        rows = out.numel() // row_length
        base_rows = base.float().reshape(rows, row_length)
        deltas = torch.stack([model.float().reshape(rows, row_length) - base_rows for model in models]).double()
        ratio = model_stock_ratio(torch.einsum("irc,jrc->rij", deltas, deltas))  # (rows,)
        average = torch.stack([model.float().reshape(rows, row_length) for model in models]).mean(0)
        ratio32 = ratio.float().unsqueeze(1)
        out.copy_((average * ratio32 + base_rows * (1 - ratio32)).reshape(-1))

    def slerp_rows(self, out: "torch.Tensor", first: "torch.Tensor", second: "torch.Tensor", row_length: int,
                   t: float) -> None:
        """Per-row SLERP from `first` (t = 0) to `second` (t = 1)."""
        rows = out.numel() // row_length
        a = first.float().reshape(rows, row_length)
        b = second.float().reshape(rows, row_length)
        coef_a, coef_b = slerp_coefficients(a.double(), b.double(), t)
        out.copy_((a * coef_a.float().unsqueeze(1) + b * coef_b.float().unsqueeze(1)).reshape(-1))

    def empty(self, count: int, dtype: str):
        """A scratch chunk of `count` elements of safetensors dtype `dtype`, as this backend computes on."""
        import numpy

        from dtm_fast.io.dtypes import DTYPE_SIZES

        return self.view(numpy.empty(count * DTYPE_SIZES[dtype], dtype=numpy.uint8), dtype)

    def scratch(self, purpose: str, count: int, dtype: str):
        """As `empty`, but the same memory on every call with the same `purpose` (grown when more is
        asked for). A large buffer allocated afresh for each tensor is faulted in page by page every
        time, which cost arcee_fusion ~1.5 s of its 8 s; a statistics method's buffers are sized for
        the budget's chunk, so keeping them between tensors holds no more than one tensor does. A
        purpose names one live buffer: its user is done with it before asking again."""
        import numpy

        from dtm_fast.io.dtypes import DTYPE_SIZES

        held = self.__dict__.setdefault("_scratch", {})
        nbytes = count * DTYPE_SIZES[dtype]
        raw = held.get(purpose)
        if raw is None or raw.size < nbytes:
            held.pop(purpose, None)  # the smaller one is freed before the larger one is taken
            raw = held[purpose] = numpy.empty(max(nbytes, 1), dtype=numpy.uint8)
        return self.view(raw[:nbytes], dtype)

    # -- statistics ----------------------------------------------------------------------------------
    def abs_delta_histogram(self, base: "torch.Tensor", model: "torch.Tensor", histogram, bucket: int | None) -> None:
        """Adds to `histogram` (int64[65536]) the high 16 bits of every |x - b| key, or, with
        `bucket`, the low 16 bits of the keys whose high bits equal it."""
        import torch

        from dtm_fast.merge.magnitude import BINS, magnitude_keys

        keys = magnitude_keys(model.float() - base.float())
        histogram = torch.as_tensor(histogram)  # numpy histograms are updated in place too
        if bucket is None:
            histogram += torch.bincount(keys >> 16, minlength=BINS).to(histogram.device)
        else:
            selected = keys[(keys >> 16) == bucket]
            histogram += torch.bincount(selected & 0xFFFF, minlength=BINS).to(histogram.device)

    def abs_delta_select(self, base: "torch.Tensor", models: Sequence["torch.Tensor"],
                         ranges: Sequence[tuple[int, int]], collected: Sequence["numpy.ndarray"]) -> list[tuple[int, int]]:
        """For each search i over models[i]: (how many |x - b| keys lie above ranges[i]'s high key,
        how many within ranges[i], bounds included); the keys within go into collected[i] (uint32,
        in any order), as many as fit."""
        from dtm_fast.merge.magnitude import magnitude_keys

        results = []
        for model, (low, high), target in zip(models, ranges, collected):
            keys = magnitude_keys(model.float() - base.float())
            selected = keys[(keys >= low) & (keys <= high)]
            room = min(len(target), selected.numel())
            target[:room] = selected[:room].cpu().numpy()
            results.append((int((keys > high).sum()), selected.numel()))
        return results

    def masked_l1(self, base: "torch.Tensor", model: "torch.Tensor", rule: Sparsify, start: int) -> tuple[float, float]:
        """(sum |d|, sum of |d| over kept elements) for mergekit's L1 rescale."""
        import torch

        delta = (model.float() - base.float()).abs().double()
        mask = keep_mask(delta, rule, start)
        kept = delta if mask is None else torch.where(mask, delta, torch.zeros_like(delta))
        return float(delta.sum()), float(kept.sum())

    def delta_gram(self, base: "torch.Tensor | None", models: Sequence["torch.Tensor"]) -> "numpy.ndarray":
        """(models, models) float64 numpy matrix of dot products of the deltas x_i - b (of the
        inputs x_i themselves when `base` is None)."""
        import torch

        deltas = torch.stack([(model.float() if base is None else model.float() - base.float()).double()
                              for model in models])
        return (deltas @ deltas.T).cpu().numpy()

    def abs_delta_key_position(self, base: "torch.Tensor", model: "torch.Tensor", key: int,
                               nth: int) -> tuple[int, int]:
        """(how many |x - b| keys equal `key`, the chunk index of the nth of them (1-based) in element
        order, or -1 when there are fewer): where an exactly-k threshold stops keeping its ties."""
        from dtm_fast.merge.magnitude import magnitude_keys

        positions = (magnitude_keys(model.float() - base.float()) == key).nonzero().reshape(-1)
        return positions.numel(), int(positions[nth - 1]) if 1 <= nth <= positions.numel() else -1

    def count_nonfinite(self, data: "torch.Tensor") -> int:
        """How many elements are NaN or +-inf (an input's bad values, reported by the merge)."""
        import torch

        if not data.dtype.is_floating_point:
            return 0
        return int(data.numel() - torch.isfinite(data).sum())


def keep_mask(delta: "torch.Tensor", rule: Sparsify, start: int) -> "torch.Tensor | None":
    """Boolean mask of kept deltas, or None when everything is kept."""
    from dtm_fast.merge import rng
    from dtm_fast.merge.magnitude import magnitude_keys

    if rule.kind == "none":
        return None
    if rule.kind == "band":
        import torch

        return rule.band_keeps(magnitude_keys(delta), torch.arange(start, start + delta.numel(), device=delta.device))
    if rule.kind == "random":
        return rng.keep_mask(rule.philox_key, start, delta.numel(), rule.threshold).to(delta.device)
    raise ValueError(f"unknown sparsification {rule.kind!r}")


def slerp_coefficients(a: "torch.Tensor", b: "torch.Tensor", t: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row SLERP coefficients for rows of a and b (float64)."""
    return slerp_coefficients_from_products((a * a).sum(1), (b * b).sum(1), (a * b).sum(1), t)


def slerp_coefficients_from_products(norm_sq_a: "torch.Tensor", norm_sq_b: "torch.Tensor", dot_ab: "torch.Tensor",
                                     t: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row SLERP coefficients from each row's float64 |a|^2, |b|^2 and a.b (what kernels reduce):
    nearly collinear rows interpolate linearly, as mergekit does."""
    import torch

    norm_a = torch.sqrt(norm_sq_a)
    norm_b = torch.sqrt(norm_sq_b)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, torch.ones_like(norm_b))
    dot = (dot_ab / (norm_a * norm_b)).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    safe_sin = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    coef_a = torch.where(linear, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    coef_b = torch.where(linear, torch.full_like(dot, t), torch.sin(t * theta) / safe_sin)
    return coef_a, coef_b


def model_stock_ratio(gram):
    """Model Stock's interpolation ratio t = K cos / (1 + (K-1) cos), cos = mean pairwise cosine of
    the deltas, from their Gram matrix (..., K, K); 0 where the denominator vanishes. `gram` is a
    torch tensor (rows of the reference and Triton backends) or a float64 numpy array (the
    per-tensor ratio, which so needs no torch import on the cpu backend)."""
    import numpy as np

    if isinstance(gram, np.ndarray):
        clamp, stack, where, sqrt = np.clip, np.stack, np.where, np.sqrt
    else:
        import torch

        clamp, stack, where, sqrt = torch.clamp, torch.stack, torch.where, torch.sqrt
    count = gram.shape[-1]
    norms = [sqrt(clamp(gram[..., i, i], 0, None)) for i in range(count)]
    cosines = [clamp(gram[..., i, j] / clamp(norms[i] * norms[j], 1e-6, None), -1, 1)
               for i in range(count) for j in range(i + 1, count)]
    cos = stack(cosines).mean(0)
    denominator = 1 + (count - 1) * cos
    singular = abs(denominator) < 1e-6
    return where(singular, 0.0, count * cos / where(singular, 1.0, denominator))
