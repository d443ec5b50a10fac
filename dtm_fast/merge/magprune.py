"""DELLA's MagPrune, as the reference backend defines it: which deltas a row keeps (by magnitude rank
and a Philox draw), their L1 sums, and the keep decisions packed one bit per element, the form in
which a tensor of several chunks keeps them between its statistics pass and its combine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

def magprune_keep(base: "torch.Tensor", model: "torch.Tensor", row_length: int, density: float, epsilon: float,
                  key_low: int, key_high: int, start: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """(delta, keep) of flat elements start .. start+n-1: within each row, the delta of ascending
    magnitude rank r (0-based, ties by position) is kept with probability p = (density - epsilon)
    + r / (row_length - 1) * 2 * epsilon, decided by the Philox draw of its flat index (DARE's
    generator, per-element threshold round(p * 2^24))."""
    import torch

    from dtm_fast.merge import rng
    from dtm_fast.merge.magnitude import magnitude_keys

    delta = model.float() - base.float()
    rows = delta.reshape(-1, row_length)  # (rows, row_length)
    order = torch.argsort(magnitude_keys(rows), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(row_length, device=order.device).expand_as(order).contiguous())
    rank_norm = ranks.double() / (row_length - 1) if row_length > 1 else torch.zeros_like(ranks, dtype=torch.float64)
    probability = (density - epsilon) + rank_norm * 2.0 * epsilon
    threshold = torch.floor(probability * rng.DRAW_RANGE + 0.5).clamp(0, rng.DRAW_RANGE).to(torch.int64)
    keep = rng.keep_mask((key_low, key_high), start, delta.numel(), threshold.reshape(-1).cpu())
    return delta, keep.to(delta.device)


def l1_sums(delta: "torch.Tensor", keep: "torch.Tensor") -> tuple[float, float]:
    """(sum |delta|, sum |delta| over kept elements), in double."""
    magnitude = delta.abs().double()
    return float(magnitude.sum()), float(magnitude[keep].sum())


def packed_size(count: int) -> int:
    """Bytes of `count` keep bits."""
    return (count + 7) // 8


def pack_bits(keep: "torch.Tensor") -> "torch.Tensor":
    """Bool flags as uint8 bytes, element i in bit i % 8 of byte i // 8; the last byte's unused bits 0."""
    import torch

    flags = keep.reshape(-1).to(torch.uint8)
    padded = torch.zeros(packed_size(flags.numel()) * 8, dtype=torch.uint8, device=flags.device)
    padded[:flags.numel()] = flags
    weights = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=flags.device)
    return (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(keep_bits: "torch.Tensor", count: int) -> "torch.Tensor":
    """The first `count` flags of `pack_bits`' bytes, as bool."""
    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=keep_bits.device)
    flags = (keep_bits.reshape(-1, 1) >> shifts) & 1
    return flags.reshape(-1)[:count].bool()
