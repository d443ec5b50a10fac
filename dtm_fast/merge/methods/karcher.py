"""Karcher mean (mergekit's karcher): the weighted Riemannian mean of the models' directions on the
unit hypersphere, each tensor one vector, times the mean of their norms. From units u_i = x_i/|x_i|
(inputs with |x_i| <= tol left out of the mean), equal weights a_i: start at the normalised
weighted sum, then up to `max_iter` steps m <- exp_m(sum a_i theta_i/sin theta_i (u_i - cos theta_i m)),
cos theta_i = m.u_i (terms with theta_i < tol skipped), stopping when the step is below `tol`;
y = (sum_i |x_i| / K) m. Every iterate is a linear combination of the u_i, so the iteration runs on
the models' Gram matrix (one statistics pass, float64) and one combine pass writes y. The base is an
ordinary input, as in mergekit."""

import math

import numpy as np

from dtm_fast.merge.methods.base import Param, non_negative, positive
from dtm_fast.merge.methods.gram import GramMethod, input_gram, write_combination


def _norm(coefficients: np.ndarray, units: np.ndarray) -> float:
    return math.sqrt(max(float(coefficients @ units @ coefficients), 0.0))


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """c with y = sum c_i x_i."""
    count = len(gram)
    norms = np.sqrt(np.clip(np.diagonal(gram), 0, None))
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return np.zeros(count)
    safe = np.where(norms > 0, norms, 1.0)
    units = gram / np.outer(safe, safe)
    alphas = np.zeros(count)
    alphas[valid] = 1.0 / len(valid)  # equal weights, renormalised over the valid inputs
    mean_norm = _norm(alphas, units)
    mean = np.eye(count)[valid[0]] if mean_norm < tol else alphas / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros(count)
        for i in valid:
            dot = min(1.0, max(-1.0, float(units[i] @ mean)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alphas[i] * (theta / math.sin(theta)) * (np.eye(count)[i] - dot * mean)
        tangent_norm = _norm(tangent, units)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = _norm(mean, units)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(norms.sum()) / count  # every input's norm, with mergekit's equal weights 1/K
    return scale * mean / safe


class Karcher(GramMethod):
    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models' directions, times their mean norm"
    needs_base = False
    base_role = "ignored"
    params = (
        Param("max_iter", "global", int, 10, non_negative, help="iterations of the mean at most"),
        Param("tol", "global", float, 1e-5, positive, help="step size at which the iteration stops"),
    )

    def merge(self, params, stream):
        if len(stream.models) == 1:
            write_combination(stream, [1.0], with_base=False)
            return
        gram = input_gram(stream, with_base=False)
        write_combination(stream, karcher_coefficients(gram, int(params["max_iter"]), float(params["tol"])),
                          with_base=False)
