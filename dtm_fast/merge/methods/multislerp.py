"""Multi-SLERP (mergekit's multislerp): barycentric interpolation of the models on the hypersphere,
each tensor one vector. The inputs are the task vectors d_i = x_i - b when a base is given, else the
models. With unit vectors u_i = d_i / (|d_i| + eps) and weights w (normalised to sum 1 unless
`normalize_weights` is false): m = sum w_i u_i / |sum w_i u_i|, the tangent r = sum w_i (u_i -
(u_i.m) m), y = (m cos|r|' + r sin|r|' / |r|') * sum w_i |d_i| (+ b), |r|' = |r| + eps. Every step
is a linear combination of the u_i, so a Gram statistics pass gives the coefficients exactly and
one combine pass writes y (methods/gram.py). One model: y = that model."""

import math

import numpy as np

from dtm_fast.errors import DtmError
from dtm_fast.merge.methods.base import Param, positive
from dtm_fast.merge.methods.gram import (
    GramMethod, delta_gram, has_base, input_gram, write_base_plus, write_combination,
)


def multislerp_coefficients(gram: np.ndarray, weights: np.ndarray, eps: float, where: str) -> np.ndarray | None:
    """Coefficients c with y - b = sum c_i d_i; None when the weighted mean vanishes and the
    result is the linear mix (two inputs only, as mergekit)."""
    norms = np.sqrt(np.clip(np.diagonal(gram), 0, None))
    scale = norms + eps
    units = gram / np.outer(scale, scale)  # the unit vectors' Gram matrix
    mean_norm = math.sqrt(max(float(weights @ units @ weights), 0.0))
    if mean_norm < eps:
        if len(weights) == 2:
            return None
        raise DtmError(f"{where}: multislerp's weighted mean of the unit vectors is zero (antipodal inputs with "
                       "balancing weights); use other weights")
    mean = weights / mean_norm
    dots = units @ mean
    tangent = weights - float(weights @ dots) * mean
    tangent_norm = math.sqrt(max(float(tangent @ units @ tangent), 0.0)) + eps
    result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return result * float(norms @ weights) / scale


class Multislerp(GramMethod):
    name = "multislerp"
    summary = "barycentric interpolation of any number of models on the hypersphere"
    needs_base = False
    base_role = "optional"
    params = (
        Param("weight", "model", float, help="weight of each model"),
        Param("normalize_weights", "global", bool, True, help="divide the weights by their sum"),
        Param("eps", "global", float, 1e-8, positive, help="numerical floor of norms"),
    )

    def merge(self, params, stream):
        based = has_base(stream)
        count = len(stream.models)
        if count == 1:
            write_combination(stream, [1.0], with_base=False)
            return
        weights = np.array([float(w) for w in params.model("weight")])
        if params["normalize_weights"]:
            weights = weights / weights.sum()
        gram = delta_gram(stream) if based else input_gram(stream, with_base=False)
        coefficients = multislerp_coefficients(gram, weights, float(params["eps"]), stream.context.name)
        if coefficients is None:
            coefficients = weights
        if based:
            write_base_plus(stream, coefficients)
        else:
            write_combination(stream, coefficients, with_base=False)
