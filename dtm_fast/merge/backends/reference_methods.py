"""Reference chunk operations of the element-wise methods added for mergekit parity (nearswap,
RAM / RAM+, SCE): plain torch, fp32 in mergekit's order of operations, so that on fp32 inputs they
give mergekit's values bit for bit. A base class of ReferenceBackend (reference.py), kept apart by
concept; the cpu backend runs them through torch views until a kernel pays for itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


class MethodOps:
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
            weights: Sequence[float]) -> None:
        """SCE's combine: the deltas whose sign agrees with the sign of their (unweighted) sum,
        averaged with weights w_i (a zero delta never agrees); out = b + that average."""
        import torch

        base32 = base.float()
        deltas = torch.stack([model.float() - base32 for model in models])
        majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        agree = (deltas.sign() == majority).float()
        erased = torch.tensor(list(weights), dtype=torch.float32, device=out.device).unsqueeze(1) * agree
        out.copy_(base32 + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6))


def _ram_masks(base, models, epsilon: float, deltas=None):
    import torch

    if deltas is None:
        base32 = base.float()
        deltas = torch.stack([model.float() - base32 for model in models])
    nonzero = deltas.abs() > epsilon
    return nonzero, nonzero.sum(dim=0)
