"""Passthrough: one model's tensors, optionally scaled (mergekit's `scale`): y = scale * x. With
slices it is how frankenmerges stack layers; the base is an ordinary input, as in mergekit."""

from dtm_fast.merge.methods.base import MergeMethod, Param


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "one model's tensors, times an optional scale"
    needs_base = False
    base_role = "ignored"
    max_models = 1
    params = (Param("scale", "model", float, 1.0, help="factor on the model's tensor (1: unchanged)"),)

    def merge(self, params, stream):
        scale = float(params.model("scale")[0])
        for chunk in stream.chunks(write=True):
            stream.backend.linear(chunk.out, chunk.models, [scale])  # x * 1 is x, exactly
