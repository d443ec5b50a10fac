"""Model Stock (Jang et al. 2024): interpolate between the base and the models' average by
t = K cos / (1 + (K-1) cos), cos the mean pairwise cosine of the task vectors, over each whole
tensor (a statistics pass) or per row (`filter_wise`, computed within each chunk). With
`filter_wise` a vector is one row, as in mergekit (which unsqueezes it), not one row per element."""

from dtm_fast.merge.methods.base import MergeMethod, Param


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "base-to-average interpolation set by the angle between task vectors"
    min_models = 2
    vector_is_one_row = True  # filter_wise: mergekit's rows are the last axis', a vector is one of them
    params = (Param("filter_wise", "global", bool, False, help="one ratio per output row instead of per tensor"),)

    def merge(self, params, stream):
        backend = stream.backend
        if params["filter_wise"]:
            for chunk in stream.chunks(write=True):
                backend.model_stock_rows(chunk.out, chunk.base, chunk.models, self.row_length(stream.context))
            return
        from dtm_fast.merge.backends.reference import model_stock_ratio

        gram = None
        for chunk in stream.chunks():
            part = backend.delta_gram(chunk.base, chunk.models)  # (K, K) float64 numpy
            gram = part if gram is None else gram + part
        ratio = float(model_stock_ratio(gram))  # numpy: no torch import
        for chunk in stream.chunks(write=True):
            backend.model_stock_combine(chunk.out, chunk.base, chunk.models, ratio)

    def has_statistics_pass(self, params):
        return not params["filter_wise"]

    def needs_whole_rows(self, params):
        return bool(params["filter_wise"])
