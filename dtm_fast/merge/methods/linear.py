"""Linear / weighted average (model soups; the DTM paper's merge): y = sum_i c_i x_i with
c_i = w_i / sum(w) when normalised. No base model is read."""

from dtm_fast.errors import DtmError
from dtm_fast.merge.methods.base import MergeMethod, Param


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models (DTM default)"
    needs_base = False
    params = (
        Param("weight", "model", float, 1.0, help="weight of each model"),
        Param("normalize", "global", bool, True, help="divide by the sum of the weights"),
    )

    def coefficients(self, params) -> list[float]:
        weights = [float(w) for w in params.model("weight")]
        if not params["normalize"]:
            return weights
        return [w / sum(weights) for w in weights]

    def check_params(self, params, where):
        weights = params.model("weight")
        if any(w < 0 for w in weights):
            raise DtmError(f"{where}: linear weights must be >= 0 (got {list(weights)}); "
                           "use task_arithmetic for negative task vectors")
        if params["normalize"] and sum(weights) == 0:
            raise DtmError(f"{where}: linear weights sum to zero, nothing to average")

    def merge(self, params, stream):
        coefficients = self.coefficients(params)
        for chunk in stream.chunks(write=True):
            stream.backend.linear(chunk.out, chunk.models, coefficients)
