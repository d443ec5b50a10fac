"""RAM, Reinforced Agent Merging (arXiv 2601.13572), as mergekit defines it: task-vector elements
with |d| > epsilon count as contributed; an element one model alone contributes is kept whole, one
several contribute is their mean; y = b + the sum. ramplus_tl (tensor-local RAM+) scales each
model's unique elements by lambda = 1 + r * clamp(shared / max(unique, epsilon), 0, alpha), from
that model's counts of shared and unique elements over the whole tensor (a statistics pass)."""

import numpy as np

from dtm_fast.merge.methods.base import MergeMethod, Param, non_negative


class Ram(MergeMethod):
    name = "ram"
    summary = "keep uniquely contributed task-vector elements, average shared ones"
    params = (Param("epsilon", "global", float, 1e-5, non_negative, help="|delta| above it counts as contributed"),)

    def statistics_bytes_per_element(self, num_models):
        # the reference and Triton backends run the torch chunk operation (backends/reference_methods.py),
        # whose fp32 deltas, masks and products of every model live at once; the cpu kernel needs none
        return 4 * (3 * num_models + 4)

    def unique_scales(self, params, stream) -> list[float]:
        return [1.0] * len(stream.models)

    def merge(self, params, stream):
        epsilon = float(params["epsilon"])
        scales = self.unique_scales(params, stream)
        for chunk in stream.chunks(write=True):
            stream.backend.ram(chunk.out, chunk.base, chunk.models, epsilon, scales)


class RamPlusTensorLocal(Ram):
    name = "ramplus_tl"
    summary = "RAM with unique elements rescaled by each model's shared/unique ratio in the tensor"
    params = Ram.params + (
        Param("r", "global", float, 0.1, help="how strongly the shared/unique ratio raises lambda"),
        Param("alpha", "global", float, 0.2, help="the ratio's upper clamp"),
    )

    def has_statistics_pass(self, params):
        return True

    def unique_scales(self, params, stream) -> list[float]:
        epsilon = float(params["epsilon"])
        totals = np.zeros((len(stream.models), 2), dtype=np.int64)
        for chunk in stream.chunks():
            totals += np.array(stream.backend.ram_counts(chunk.base, chunk.models, epsilon), dtype=np.int64)
        # mergekit's arithmetic: fp32 counts and ratio (torch promotes the integer counts to fp32)
        f32 = np.float32
        shared, unique = totals[:, 0].astype(f32), totals[:, 1].astype(f32)
        rho = shared / np.maximum(unique, f32(epsilon))
        lambdas = f32(1) + f32(params["r"]) * np.clip(rho, f32(0), f32(params["alpha"]))
        return [float(v) for v in lambdas]
