"""The one generator of in-memory chunks that the backend tests and the kernel benchmark feed every
backend: a base and fine-tunes of it, shaped like real fine-tuning deltas.

Deltas have mixed signs and magnitudes spread over four decades (so magnitude thresholds fall
between many distinct keys), and 10% of them are exactly zero (sign ties in TIES' election,
ties at a threshold). With `special`, the inputs also hold what a damaged checkpoint holds: NaN
and +-Inf in the base and in every model, and a -0 in the first model.
"""

from __future__ import annotations

ZERO_DELTA_FRACTION = 0.1


def chunk_inputs(count: int, dtype, models: int, seed: int, special: bool = False):
    """(base, [model, ...]) as 1-D tensors of `dtype`, reproducible from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=generator)
    tensors = []
    for _ in range(models):
        scale = 10.0 ** -torch.randint(1, 5, (count,), generator=generator).float()
        delta = torch.randn(count, generator=generator) * scale
        delta[torch.rand(count, generator=generator) < ZERO_DELTA_FRACTION] = 0.0
        tensors.append((base + delta).to(dtype))
    base = base.to(dtype)
    if special and count:
        specials = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(dtype)
        for tensor in (base, *tensors):
            where = torch.randint(0, count, (max(1, count // 50),), generator=generator)
            tensor[where] = specials[torch.randint(0, 3, where.shape, generator=generator)]
        if tensors:
            tensors[0][int(torch.randint(0, count, (1,), generator=generator))] = -0.0
    return base, tensors
