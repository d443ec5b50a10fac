"""SLERP between the base and one model, per leading-axis row as mergekit 0.1.5 does: each output
row follows the great circle between the two rows (linear where they are nearly collinear, and
for vectors, whose rows are single elements). `t` = 0 gives the base, 1 the model."""

from dtm_fast.merge.methods.base import MergeMethod, Param, in_unit


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between base and one model, per row"
    min_models = 1
    max_models = 1
    row_wise = True
    params = (Param("t", "global", float, 0.5, in_unit, help="interpolation factor (0 = base, 1 = model)"),)

    def merge(self, params, stream):
        for chunk in stream.chunks(write=True):
            stream.backend.slerp_rows(chunk.out, chunk.base, chunk.models[0], self.row_length(stream.context),
                                      float(params["t"]))
