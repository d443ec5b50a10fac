"""NuSLERP (mergekit's nuslerp): SLERP between exactly two models with t = w_2 / (w_1 + w_2) (0.5
when the weights sum to ~0), of their task vectors when a base is given (y = b + slerp(d_1, d_2)),
else of the models. Each tensor is one vector (`nuslerp_flatten`, mergekit's default): cos theta =
u_1.u_2 with u = v / max(|v|, 1e-7), linear where 1 - cos^2 <= 1e-16, else
(sin((1-t) theta) v_1 + sin(t theta) v_2) / sin theta. A Gram statistics pass and one combine pass.
Per-row nuslerp (`nuslerp_flatten: false`) is not supported yet and is refused."""

import math

from dtm_fast.errors import DtmError
from dtm_fast.merge.methods.base import Param
from dtm_fast.merge.methods.gram import (
    GramMethod, arc_coefficients, delta_gram, has_base, input_gram, write_base_plus, write_combination,
)

NORM_FLOOR = 1e-7  # mergekit's _normalize clamp
COLINEAR_EPS = 1e-8


def nuslerp_coefficients(gram, t: float) -> tuple[float, float]:
    norms = [max(math.sqrt(max(float(gram[i, i]), 0.0)), NORM_FLOOR) for i in range(2)]
    cos = min(1.0, max(-1.0, float(gram[0, 1]) / (norms[0] * norms[1])))
    if 1 - cos * cos <= COLINEAR_EPS ** 2:
        return 1 - t, t
    return arc_coefficients(cos, t)


class Nuslerp(GramMethod):
    name = "nuslerp"
    summary = "SLERP of two models (or their task vectors) with weight-set t"
    needs_base = False
    base_role = "optional"
    min_models = 2
    max_models = 2
    params = (
        Param("weight", "model", float, help="relative weight of each model (t = w_2 / (w_1 + w_2))"),
        Param("nuslerp_flatten", "global", bool, True, help="each tensor one vector (false: per row, not supported)"),
        Param("nuslerp_row_wise", "global", bool, False, help="per-row SLERP along rows, with nuslerp_flatten false"),
    )

    def check_params(self, params, where):
        if not params["nuslerp_flatten"]:
            raise DtmError(f"{where}: nuslerp_flatten: false (per-row nuslerp) is not supported by dtm merge yet; "
                           "use nuslerp_flatten: true or slerp with per_row: true")

    def merge(self, params, stream):
        first, second = (float(w) for w in params.model("weight"))
        total = first + second
        t = 0.5 if abs(total) < 1e-6 else second / total
        if has_base(stream):
            write_base_plus(stream, nuslerp_coefficients(delta_gram(stream), t))
        else:
            write_combination(stream, nuslerp_coefficients(input_gram(stream, with_base=False), t), with_base=False)
