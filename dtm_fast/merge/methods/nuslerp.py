"""NuSLERP (mergekit's nuslerp): SLERP between exactly two models with t = w_2 / (w_1 + w_2) (0.5
when the weights sum to ~0), of their task vectors when a base is given (y = b + slerp(d_1, d_2)),
else of the models. For each vector v_1, v_2: cos theta = u_1.u_2 with u = v / max(|v|, 1e-7),
linear where 1 - cos^2 <= 1e-16, else (sin((1-t) theta) v_1 + sin(t theta) v_2) / sin theta.

Which vectors, as mergekit's options choose them:
- `nuslerp_flatten: true` (the default): the whole tensor is one vector. A Gram statistics pass
  (float64) gives the two coefficients, one combine pass writes them.
- `nuslerp_flatten: false`: each last-axis row is a vector (a matrix's rows; a 1-D tensor is one
  vector). Chunks hold whole rows, one pass in mergekit's fp32 operations row by row.
- `nuslerp_flatten: false, nuslerp_row_wise: true`: each vector runs along the leading axis (a
  matrix's columns; mergekit transposes the first and last axes). Each column spans every chunk: a
  statistics pass sums each column's |v_1|^2, |v_2|^2 and v_1.v_2 in float64, one combine pass
  writes c_1 v_1 + c_2 v_2 per column. mergekit sums them in fp32, so the two differ by a few ulps
  (tests/merge/test_methods_mergekit.py)."""

import numpy as np

from dtm_fast.merge.backends.reference_methods import NUSLERP_COLINEAR_EPS as COLINEAR_EPS
from dtm_fast.merge.backends.reference_methods import NUSLERP_NORM_FLOOR as NORM_FLOOR
from dtm_fast.merge.budget import whole_rows
from dtm_fast.merge.methods.base import Param
from dtm_fast.merge.methods.gram import GramMethod, delta_gram, has_base, input_gram, write_base_plus, write_combination

# The per-vector operations run on blocks of whole rows of about this many elements: their torch
# temporaries (some 40 bytes per element) then fit the budget's fixed overhead, and the chunks
# stay as large as the Gram pass's (GramMethod's statistics bytes) allow.
BLOCK_ELEMENTS = 1 << 16


def nuslerp_coefficients(norm_sq_a, norm_sq_b, dot, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_a, c_b) per vector, nuslerp = c_a v_a + c_b v_b, from float64 |v_a|^2, |v_b|^2 and v_a.v_b."""
    norm_a = np.maximum(np.sqrt(np.maximum(norm_sq_a, 0.0)), NORM_FLOOR)
    norm_b = np.maximum(np.sqrt(np.maximum(norm_sq_b, 0.0)), NORM_FLOOR)
    cos = np.clip(np.asarray(dot, dtype=np.float64) / (norm_a * norm_b), -1.0, 1.0)
    colinear = 1 - cos * cos <= COLINEAR_EPS ** 2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin_theta = np.where(colinear, 1.0, np.sin(theta))
    return (np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin_theta),
            np.where(colinear, t, np.sin(t * theta) / sin_theta))


def blocks(count: int, row_length: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of a chunk in blocks of whole rows of about BLOCK_ELEMENTS."""
    step = whole_rows(BLOCK_ELEMENTS, row_length)
    return [(start, min(count, start + step)) for start in range(0, count, step)]


class Nuslerp(GramMethod):
    name = "nuslerp"
    summary = "SLERP of two models (or their task vectors) with weight-set t, per tensor, row or column"
    needs_base = False
    base_role = "optional"
    min_models = 2
    max_models = 2
    vector_is_one_row = True  # per-row nuslerp: a 1-D tensor is one vector, held by one chunk
    params = (
        Param("weight", "model", float, help="relative weight of each model (t = w_2 / (w_1 + w_2))"),
        Param("nuslerp_flatten", "global", bool, True, help="each tensor one vector (false: per row or column)"),
        Param("nuslerp_row_wise", "global", bool, False,
              help="with nuslerp_flatten false: vectors along the leading axis (columns) instead of rows"),
    )

    def has_statistics_pass(self, params):
        return bool(params["nuslerp_flatten"] or params["nuslerp_row_wise"])

    def needs_whole_rows(self, params):
        return not params["nuslerp_flatten"]

    def merge(self, params, stream):
        first, second = (float(w) for w in params.model("weight"))
        total = first + second
        t = 0.5 if abs(total) < 1e-6 else second / total
        if not params["nuslerp_flatten"]:
            if params["nuslerp_row_wise"]:
                self._per_column(stream, t)
            else:
                self._per_row(stream, t)
        elif has_base(stream):
            gram = delta_gram(stream)
            write_base_plus(stream, [float(c) for c in nuslerp_coefficients(gram[0, 0], gram[1, 1], gram[0, 1], t)])
        else:
            gram = input_gram(stream, with_base=False)
            coefficients = nuslerp_coefficients(gram[0, 0], gram[1, 1], gram[0, 1], t)
            write_combination(stream, [float(c) for c in coefficients], with_base=False)

    def _per_row(self, stream, t: float) -> None:
        shape = stream.context.shape
        vector = shape[-1] if len(shape) >= 2 else max(1, stream.context.numel)  # mergekit's last axis
        for chunk in stream.chunks(write=True):
            for start, stop in blocks(chunk.count, vector):
                stream.backend.nuslerp_rows(chunk.out[start:stop], _part(chunk.base, start, stop),
                                            chunk.models[0][start:stop], chunk.models[1][start:stop], vector, t)

    def _per_column(self, stream, t: float) -> None:
        backend, context = stream.backend, stream.context
        columns = context.row_length if len(context.shape) >= 2 else 1  # a vector is one column
        products = np.zeros((3, columns), dtype=np.float64)
        for chunk in stream.chunks():
            for start, stop in blocks(chunk.count, columns):
                products += backend.column_products(_part(chunk.base, start, stop), chunk.models[0][start:stop],
                                                    chunk.models[1][start:stop], columns)
        coefficients = np.stack(nuslerp_coefficients(products[0], products[1], products[2], t))  # (2, columns)
        for chunk in stream.chunks(write=True):
            for start, stop in blocks(chunk.count, columns):
                backend.column_combine(chunk.out[start:stop], _part(chunk.base, start, stop),
                                       chunk.models[0][start:stop], chunk.models[1][start:stop], coefficients)


def _part(array, start: int, stop: int):
    """Elements start:stop of a chunk input that may be absent (nuslerp's optional base)."""
    return array[start:stop] if array is not None else None
