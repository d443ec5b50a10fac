"""Whole-tensor statistics for the methods whose result is a linear combination of their inputs,
with coefficients set by the inputs' norms and angles (slerp, nuslerp, multislerp, karcher): one
statistics pass sums the inputs' Gram matrix over the chunks in float64, the coefficients follow in
plain Python, and one combine pass writes the combination. So a tensor is interpolated as one
vector (mergekit's definition) within the memory budget, whatever its size."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dtm_fast.merge.methods.base import MergeMethod

def arc_coefficients(cos: float, t: float) -> tuple[float, float]:
    """(c_a, c_b) of the great-circle point at t between unit directions whose cosine is `cos`:
    sin((1 - t) theta) / sin theta, sin(t theta) / sin theta (each method decides first when the
    directions are too close to parallel for this, and interpolates linearly then)."""
    import math

    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


# what the statistics pass holds per chunk element: nothing (the Gram matrix is K x K)
GRAM_BYTES_PER_ELEMENT = 0


class GramMethod(MergeMethod):
    """A method that reads each tensor twice: the Gram pass, then the combine."""

    def has_statistics_pass(self, params):
        return True

    def statistics_bytes_per_element(self, num_models):
        return GRAM_BYTES_PER_ELEMENT


def has_base(stream) -> bool:
    """Whether the tensor is merged with a base (an optional base given): the engine's streams
    name its entry, the whole-tensor stream of the reference holds the tensor itself."""
    return (stream.base_entry if hasattr(stream, "base_entry") else stream.base) is not None


def input_gram(stream, with_base: bool) -> np.ndarray:
    """(K, K) float64 dot products of the inputs themselves (the base first when `with_base`, then
    the models), summed over the tensor's chunks: the backend's Gram matrix without a base."""
    gram = None
    for chunk in stream.chunks():
        tensors = ([chunk.base] if with_base else []) + list(chunk.models)
        part = stream.backend.delta_gram(None, tensors)
        gram = part if gram is None else gram + part
    return gram


def delta_gram(stream) -> np.ndarray:
    """(K, K) float64 dot products of the task vectors x_i - b over the whole tensor."""
    gram = None
    for chunk in stream.chunks():
        part = stream.backend.delta_gram(chunk.base, chunk.models)
        gram = part if gram is None else gram + part
    return gram


def write_combination(stream, coefficients: Sequence[float], with_base: bool) -> None:
    """out = sum_i c_i x_i over the inputs (base first when `with_base`), in fp32."""
    for chunk in stream.chunks(write=True):
        inputs = ([chunk.base] if with_base else []) + list(chunk.models)
        stream.backend.linear(chunk.out, inputs, [float(c) for c in coefficients])


def write_base_plus(stream, coefficients: Sequence[float]) -> None:
    """out = b + sum_i c_i (x_i - b) in fp32, as a task-arithmetic combine (mergekit adds the base last)."""
    from dtm_fast.merge.specs import GtaSpec, Sparsify

    spec = GtaSpec(tuple(float(c) for c in coefficients), (Sparsify(),) * len(coefficients), None, False, 1.0)
    for chunk in stream.chunks(write=True):
        stream.backend.gta(chunk.out, chunk.base, chunk.models, spec, chunk.start)
