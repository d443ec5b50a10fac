"""The counter-based generator behind DARE's random masks: Philox4x32-10 (Salmon et al., SC'11).

A mask element depends only on (seed, tensor name, model index) -> the 64-bit key, and the element's
flat index -> its counter and word. So the mask is the same whatever the chunking, thread count or
backend: the C++ and Triton kernels implement the same function and are tested against this one.

All four output words of every counter are used: elements come in blocks of 64, and element
i = 64 b + 16 w + j draws word w of counter 16 b + j (a block is 16 counters, one SIMD register of
them on AVX-512, and needs no shuffling there). Element i of model m in tensor `name` is kept iff
(draw(i) >> 8) < keep_threshold(density): a 24-bit integer comparison, so no backend's float
rounding can flip it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10


def philox_key(seed: int, tensor_name: str, model_index: int) -> tuple[int, int]:
    """64-bit Philox key as (low 32 bits, high 32 bits)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{model_index}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    return key & MASK32, key >> 32


DRAW_RANGE = 1 << 24  # a keep decision compares a 24-bit draw (the word >> 8) with its threshold


def keep_threshold(density: float) -> int:
    """24-bit threshold: an element is kept with probability threshold / 2**24 ~= density."""
    return min(DRAW_RANGE, max(0, int(round(density * DRAW_RANGE))))


def _mulhilo(multiplier: int, value: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """(high, low) 32-bit halves of multiplier * value for uint32 values held in int64, without
    overflowing int64: split value into 16-bit halves."""
    value_high = value >> 16
    value_low = value & 0xFFFF
    product_low = multiplier * value_low  # < 2**48
    product_high = multiplier * value_high  # < 2**48
    high = (product_high + (product_low >> 16)) >> 16
    low = (((product_high & 0xFFFF) << 16) + product_low) & MASK32
    return high, low


def philox4x32(counter: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
               key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> "tuple[torch.Tensor, ...]":
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        high0, low0 = _mulhilo(PHILOX_M0, c0)
        high1, low1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_counter_and_word(index: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """(counter, word) that element `index` (int64) draws from: blocks of 64 elements per 16 counters."""
    return (index >> 6) * 16 + (index & 15), (index >> 4) & 3


def keep_mask(key: tuple[int, int], start: int, count: int, threshold: int) -> "torch.Tensor":
    """Boolean keep-mask for elements start .. start+count-1 of one (tensor, model)."""
    import torch

    index = torch.arange(start, start + count, dtype=torch.int64)
    counter, word = philox_counter_and_word(index)
    zeros = torch.zeros_like(counter)
    words = torch.stack(philox4x32((counter & MASK32, counter >> 32, zeros, zeros), key))  # (4, count)
    draw = words.gather(0, word.unsqueeze(0)).squeeze(0)
    return (draw >> 8) < threshold
