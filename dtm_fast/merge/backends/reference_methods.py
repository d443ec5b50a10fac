"""Reference chunk operations of the methods added for mergekit parity (DELLA, nearswap, RAM / RAM+,
SCE, arcee_fusion, per-row nuslerp) and of the order statistics some of them need: plain torch, fp32
in mergekit's order of operations, so that on fp32 inputs they give mergekit's values bit for bit
(per-row softmaxes and norms are torch's row reductions on a chunk's rows, as on mergekit's whole
matrix). A base class of ReferenceBackend (reference.py), kept apart by concept; the cpu backend runs
them through torch views until a kernel pays for itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy
    import torch

    from dtm_fast.merge.order_statistics import TopRule

FUSION_EPS = 1e-8  # mergekit's arcee_fusion: added to both softmax distributions
# arcee_fusion's softmax blocks: fp32 temporaries just under glibc's mmap threshold as the merge sets
# it (engine.release_large_allocations_promptly, 1 MiB), so they are reused from the heap, not faulted
# in anew, and each torch operation still has enough elements to keep its threads busy
FUSION_BLOCK_ELEMENTS = (1 << 18) - 1
FUSION_BLOCK_TEMPORARIES = 12  # fp32 block-sized arrays alive at once, at most: inputs, softmaxes, terms
NUSLERP_NORM_FLOOR = 1e-7  # mergekit's nuslerp _normalize clamp
NUSLERP_COLINEAR_EPS = 1e-8


class MethodOps:
    def della_deltas(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor", row_length: int,
                     density: float, epsilon: float, key_low: int, key_high: int, scale: float,
                     start: int) -> tuple[float, float]:
        """DELLA's MagPrune (magprune.magprune_keep decides what each row keeps): out = kept ? delta
        * scale : 0. Returns (sum |delta|, sum |delta| over kept elements), in double."""
        import torch

        from dtm_fast.merge.magprune import l1_sums, magprune_keep

        delta, keep = magprune_keep(base, model, row_length, density, epsilon, key_low, key_high, start)
        out.copy_(torch.where(keep, delta * scale, torch.zeros_like(delta)))
        return l1_sums(delta, keep)

    def della_keep_bits(self, keep_bits: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor",
                        row_length: int, density: float, epsilon: float, key_low: int, key_high: int,
                        start: int) -> tuple[float, float]:
        """della_deltas' keep decisions instead of its values: element i is kept iff bit i % 8 of
        keep_bits[i // 8] (uint8, ceil(n / 8) bytes, the last one's unused bits 0) is set. Returns the
        same sums."""
        from dtm_fast.merge.magprune import l1_sums, magprune_keep, pack_bits

        delta, keep = magprune_keep(base, model, row_length, density, epsilon, key_low, key_high, start)
        keep_bits.copy_(pack_bits(keep))
        return l1_sums(delta, keep)

    def della_apply(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor",
                    keep_bits: "torch.Tensor", scale: float) -> None:
        """out = kept ? (x - b) * scale : 0, kept as della_keep_bits decided: della_deltas' values."""
        import torch

        from dtm_fast.merge.magprune import unpack_bits

        delta = model.float() - base.float()
        keep = unpack_bits(keep_bits, delta.numel())
        out.copy_(torch.where(keep, delta * scale, torch.zeros_like(delta)))

    def nearswap(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor", t: float) -> None:
        """w = clamp(t / max(|b - x|, 1e-6), 0, 1); out = w x + (1 - w) b."""
        a, b = base.float(), model.float()
        weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        out.copy_(weight * b + (1 - weight) * a)

    def ram_counts(self, base: "torch.Tensor", models: Sequence["torch.Tensor"], epsilon: float) -> list[tuple[int, int]]:
        """Per model: (its deltas with |d| > epsilon where another model's also is, those where it
        is the only one): RAM+'s shared and unique counts."""
        nonzero, counts = _ram_masks(base, models, epsilon)
        return [(int((mask & (counts > 1)).sum()), int((mask & (counts == 1)).sum())) for mask in nonzero]

    def ram(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"], epsilon: float,
            unique_scales: Sequence[float]) -> None:
        """RAM: deltas with |d| > epsilon; where one model has one it is kept (times its unique
        scale, RAM+'s lambda), where several have one they are averaged; out = b + the sum."""
        import torch

        base32 = base.float()
        deltas = torch.stack([model.float() - base32 for model in models])
        nonzero, counts = _ram_masks(base, models, epsilon, deltas)
        kept = deltas * nonzero
        scales = torch.tensor(list(unique_scales), dtype=torch.float32, device=out.device).unsqueeze(1)
        merged = (kept * (counts == 1) * scales + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
        out.copy_(base32 + merged)

    def sce(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"],
            weights: Sequence[float], variance: "torch.Tensor | None" = None, rule: "TopRule | None" = None,
            start: int = 0) -> None:
        """SCE's combine: the deltas whose sign agrees with the sign of their (unweighted) sum,
        averaged with weights w_i (a zero delta never agrees); out = b + that average. With `rule`
        (select_topk), only the elements it keeps by their variance take part: the others' deltas
        are zero in every model before the signs are elected."""
        import torch

        deltas = _sce_deltas(base, models, variance, rule, start)
        majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        agree = (deltas.sign() == majority).float()
        erased = torch.tensor(list(weights), dtype=torch.float32, device=out.device).unsqueeze(1) * agree
        out.copy_(base.float() + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6))

    def sce_variance(self, out: "torch.Tensor", base: "torch.Tensor", models: Sequence["torch.Tensor"]) -> None:
        """Per element, the variance of the models' deltas (torch.var over the models, unbiased=False)."""
        import torch

        base32 = base.float()
        out.copy_(torch.var(torch.stack([model.float() - base32 for model in models]), dim=0, unbiased=False))

    def sce_squares(self, base: "torch.Tensor", models: Sequence["torch.Tensor"], variance: "torch.Tensor",
                    rule: "TopRule", start: int) -> list[float]:
        """Each model's float64 sum of its squared deltas over the elements `rule` keeps (SCE's weights)."""
        deltas = _sce_deltas(base, models, variance, rule, start).double()
        return [float(value) for value in (deltas * deltas).sum(dim=1)]

    # -- arcee_fusion ------------------------------------------------------------------------------
    def fusion_divergence(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor",
                          row_length: int, block_elements: int = FUSION_BLOCK_ELEMENTS) -> None:
        """out (fp32, one per row) = KL(p || q) of each row of `row_length` elements, p = softmax(x)
        + 1e-8 and q = softmax(b) + 1e-8 over the row. Rows are independent, so they are taken in
        blocks of at most `block_elements` (at least one row): the temporaries stay in cache (a
        whole chunk at once was 25x slower) and within the memory budget."""
        import torch

        x_rows = model.reshape(-1, row_length)
        b_rows = base.reshape(-1, row_length)
        block = max(1, block_elements // row_length)
        # the block's temporaries are taken once and reused: in-place operations give the same
        # values as the expressions they replace (p / q into q, then log, then times p)
        shape = (min(block, x_rows.shape[0]), row_length)
        x, b, p, q = (torch.empty(shape, dtype=torch.float32, device=out.device) for _ in range(4))
        for first in range(0, x_rows.shape[0], block):
            rows = min(block, x_rows.shape[0] - first)
            x_block, b_block, p_block, q_block = x[:rows], b[:rows], p[:rows], q[:rows]
            x_block.copy_(x_rows[first:first + rows])
            b_block.copy_(b_rows[first:first + rows])
            torch.softmax(x_block, dim=-1, out=p_block).add_(FUSION_EPS)
            torch.softmax(b_block, dim=-1, out=q_block).add_(FUSION_EPS)
            torch.div(p_block, q_block, out=q_block).log_().mul_(p_block)
            torch.sum(q_block, dim=-1, out=out[first:first + rows])

    def fusion_importance(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor",
                          divergence: "torch.Tensor", row_length: int) -> None:
        """Per element: |x - b| times its row's `divergence` (fusion_divergence of the same chunk)."""
        import torch

        rows = torch.as_tensor(divergence, device=out.device).reshape(-1, 1)
        delta = (model.float() - base.float()).abs().reshape(-1, row_length)
        out.copy_((delta * rows).reshape(-1))

    def fusion_combine(self, out: "torch.Tensor", base: "torch.Tensor", model: "torch.Tensor",
                       importance: "torch.Tensor", threshold: float) -> None:
        """y = b + (x - b) * [importance >= threshold]."""
        b = base.float()
        out.copy_(b + (model.float() - b) * (importance >= threshold).float())

    # -- per-vector nuslerp (nuslerp_flatten: false) -------------------------------------------------
    def nuslerp_rows(self, out: "torch.Tensor", base: "torch.Tensor | None", first: "torch.Tensor",
                     second: "torch.Tensor", row_length: int, t: float) -> None:
        """mergekit's nuslerp of each row of `row_length` elements from `first` (t = 0) to `second`,
        of their deltas from `base` when given (then added back to it): u = v / max(|v|, 1e-7),
        cos = u_1.u_2, linear where 1 - cos^2 <= 1e-16, else (sin((1-t) theta) v_1 + sin(t theta)
        v_2) / sin theta."""
        import torch

        a, b = _pair(base, first, second, row_length)  # (rows, row_length)
        unit_a = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
        unit_b = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
        cos = torch.sum(unit_a * unit_b, dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS ** 2
        theta = torch.acos(torch.where(colinear, 0, cos))
        result = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
        result = torch.where(colinear, (1 - t) * a + t * b, result)
        out.copy_((result if base is None else base.float().reshape(-1, row_length) + result).reshape(-1))

    def column_products(self, base: "torch.Tensor | None", first: "torch.Tensor", second: "torch.Tensor",
                        row_length: int) -> "numpy.ndarray":
        """(3, row_length) float64 numpy: per column of the chunk's rows, |a|^2, |b|^2 and a.b of
        the two inputs (of their deltas from `base` when given)."""
        import torch

        a, b = (v.double() for v in _pair(base, first, second, row_length))
        return torch.stack([(a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]).cpu().numpy()

    def column_combine(self, out: "torch.Tensor", base: "torch.Tensor | None", first: "torch.Tensor",
                       second: "torch.Tensor", coefficients: "numpy.ndarray") -> None:
        """out = [b +] c_a a + c_b b per column, `coefficients` (2, row_length) float64 numpy; a, b
        the inputs (their deltas from `base` when given)."""
        import torch

        row_length = coefficients.shape[1]
        a, b = _pair(base, first, second, row_length)
        c = torch.from_numpy(coefficients).float().to(out.device)  # (2, row_length)
        result = a * c[0] + b * c[1]
        out.copy_((result if base is None else base.float().reshape(-1, row_length) + result).reshape(-1))

    # -- order statistics of a per-element fp32 statistic (merge/order_statistics.py) -----------------
    def order_key_histogram(self, values: "torch.Tensor", histogram, bucket: int | None) -> None:
        """Adds to `histogram` (int64[65536]) the high 16 bits of every order key of `values`, or,
        with `bucket`, the low 16 bits of the keys whose high bits equal it."""
        import torch

        from dtm_fast.merge.order_statistics import order_keys

        keys = order_keys(values)
        histogram = torch.as_tensor(histogram)  # numpy histograms are updated in place too
        if bucket is not None:
            keys = keys[(keys >> 16) == bucket] & 0xFFFF
        else:
            keys = keys >> 16
        histogram += torch.bincount(keys, minlength=1 << 16).to(histogram.device)

    def order_key_position(self, values: "torch.Tensor", key: int, nth: int) -> tuple[int, int]:
        """(how many order keys of `values` equal `key`, the chunk index of the nth of them (1-based)
        in element order, or -1 when there are fewer or nth < 1)."""
        from dtm_fast.merge.order_statistics import order_keys

        matches = order_keys(values) == key
        count = int(matches.sum())
        if not 1 <= nth <= count:
            return count, -1
        return count, int(matches.nonzero()[nth - 1])

def _ram_masks(base, models, epsilon: float, deltas=None):
    import torch

    if deltas is None:
        base32 = base.float()
        deltas = torch.stack([model.float() - base32 for model in models])
    nonzero = deltas.abs() > epsilon
    return nonzero, nonzero.sum(dim=0)


def _sce_deltas(base, models, variance, rule, start: int):
    """(models, elements) fp32 deltas, zero where `rule` (when given) does not keep the variance."""
    import torch

    base32 = base.float()
    deltas = torch.stack([model.float() - base32 for model in models])
    if rule is None:
        return deltas
    from dtm_fast.merge.order_statistics import order_keys

    index = torch.arange(start, start + deltas.shape[1], device=deltas.device)
    return deltas * rule.keeps(order_keys(variance), index)  # as mergekit multiplies by its mask


def _pair(base, first, second, row_length: int):
    """The two inputs as (rows, row_length) fp32, their deltas from `base` when given."""
    a = first.float().reshape(-1, row_length)
    b = second.float().reshape(-1, row_length)
    if base is None:
        return a, b
    origin = base.float().reshape(-1, row_length)
    return a - origin, b - origin
