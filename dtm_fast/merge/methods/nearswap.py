"""NearSwap (mergekit's): interpolate from the base toward the model only where they are close:
w = clamp(t / max(|b - x|, 1e-6), 0, 1), y = w x + (1 - w) b, element by element. Elements that
differ by at most t take the model's value; the farther apart, the more of the base is kept."""

from dtm_fast.merge.methods.base import MergeMethod, Param


class Nearswap(MergeMethod):
    name = "nearswap"
    summary = "take the model where it is within t of the base, blend toward the base elsewhere"
    max_models = 1
    params = (Param("t", "global", float, help="distance below which the model's value is taken"),)

    def merge(self, params, stream):
        t = float(params["t"])
        for chunk in stream.chunks(write=True):
            stream.backend.nearswap(chunk.out, chunk.base, chunk.models[0], t)
