"""Fisher merging (Matena & Raffel 2022): y = sum_i w_i (F_i + eps) x_i / sum_i w_i (F_i + eps),
with F_i the diagonal Fisher estimate in each model's fisher.safetensors. eps keeps elements whose
Fisher is zero in every model at the weighted average instead of 0/0."""

from dtm_fast.errors import DtmError
from dtm_fast.merge.methods.base import MergeMethod, Param, positive


class Fisher(MergeMethod):
    name = "fisher"
    summary = "Fisher-weighted average (needs fisher.safetensors per model)"
    needs_base = False
    needs_fisher = True
    params = (
        Param("weight", "model", float, 1.0, help="weight of each model"),
        Param("epsilon", "global", float, 1e-8, positive, help="added to every Fisher value"),
    )

    def check_params(self, params, where):
        if any(w <= 0 for w in params.model("weight")):
            raise DtmError(f"{where}: fisher weights must be > 0 (got {list(params.model('weight'))})")

    def merge(self, params, stream):
        weights = [float(w) for w in params.model("weight")]
        for chunk in stream.chunks(write=True):
            stream.backend.fisher(chunk.out, chunk.models, chunk.fishers, weights, float(params["epsilon"]))
