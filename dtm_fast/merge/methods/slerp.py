"""SLERP between the base and one model, as mergekit defines it: the whole tensor is one vector, and
the output follows the great circle between the two (linearly where they are nearly collinear,
|cos| > 0.9995). `t` = 0 gives the base, 1 the model. With `per_row: true` (a dtm option, not
mergekit's) each leading-axis row is interpolated on its own circle instead.

Whole-tensor: a statistics pass sums |b|^2, |x|^2 and b.x over the chunks in float64 (methods/gram.py),
then out = c_b b + c_x x in fp32. mergekit computes the coefficients in fp32 (its dot product summed
in torch's order), so its coefficients are a few fp32 roundings off these: outputs agree within
2 ulp of the inputs' magnitude (tests/merge/test_methods_mergekit.py)."""

import math

from dtm_fast.merge.methods.base import MergeMethod, Param, in_unit
from dtm_fast.merge.methods.gram import GRAM_BYTES_PER_ELEMENT, arc_coefficients, input_gram, write_combination

DOT_THRESHOLD = 0.9995  # mergekit's: nearly collinear vectors interpolate linearly
EPS = 1e-8  # norms below it count as 1 (a zero tensor), as in mergekit


def slerp_coefficients(norm_sq_a: float, norm_sq_b: float, dot_ab: float, t: float) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b; t) = c_a a + c_b b, from |a|^2, |b|^2 and a.b (float64)."""
    norm_a, norm_b = math.sqrt(max(norm_sq_a, 0.0)), math.sqrt(max(norm_sq_b, 0.0))
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, dot_ab / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    return arc_coefficients(dot, t)


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between base and one model (whole tensor; per_row optional)"
    min_models = 1
    max_models = 1
    params = (Param("t", "global", float, 0.5, in_unit, help="interpolation factor (0 = base, 1 = model)"),
              Param("per_row", "global", bool, False, help="one great circle per leading-axis row (not mergekit's)"))

    def has_statistics_pass(self, params):
        return not params["per_row"]

    def statistics_bytes_per_element(self, num_models):
        return GRAM_BYTES_PER_ELEMENT

    def needs_whole_rows(self, params):
        return bool(params["per_row"])

    def merge(self, params, stream):
        t = float(params["t"])
        if params["per_row"]:
            for chunk in stream.chunks(write=True):
                stream.backend.slerp_rows(chunk.out, chunk.base, chunk.models[0], self.row_length(stream.context), t)
            return
        gram = input_gram(stream, with_base=True)
        write_combination(stream, slerp_coefficients(gram[0, 0], gram[1, 1], gram[0, 1], t), with_base=True)
