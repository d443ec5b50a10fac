"""SCE (Wan et al. 2024, arXiv 2408.07990), as mergekit defines it: each task vector d_i = x_i - b
gets the weight w_i = mean(d_i^2) / sum_j mean(d_j^2) (1/K each when that sum is below 1e-6), from
a statistics pass; a delta is erased unless its sign agrees with the sign of the deltas' plain sum;
y = b + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6), m_i the agreement masks.

`select_topk` < 1 (keep only the elements of highest variance across the models) is not supported
yet: it needs an exact top-k of the variance over the tensor, and is refused with a one-line error."""

import numpy as np

from dtm_fast.errors import DtmError
from dtm_fast.merge.methods.base import MergeMethod, Param
from dtm_fast.merge.methods.gram import delta_gram


class Sce(MergeMethod):
    name = "sce"
    summary = "task vectors weighted by their mean square, TIES-style sign agreement"
    params = (
        Param("select_topk", "global", float, 1.0, help="fraction of highest-variance elements kept (1: all)"),
        Param("int8_mask", "global", bool, False, help="mergekit's memory option; no effect on the result"),
    )

    def check_params(self, params, where):
        if params["select_topk"] < 1:
            raise DtmError(f"{where}: sce select_topk {params['select_topk']} < 1 is not supported by dtm merge yet "
                           "(only 1, every element kept)")

    def statistics_bytes_per_element(self, num_models):
        # its chunk operation is the torch reference on every backend for now: fp32 deltas, masks and
        # products of every model live at once (backends/reference_methods.py)
        return 4 * (3 * num_models + 4)

    def has_statistics_pass(self, params):
        return True

    def merge(self, params, stream):
        numel = max(1, stream.context.numel)
        # mergekit's fp32: each model's mean square, their sum as a Python float, the ratios in fp32
        squares = np.diagonal(delta_gram(stream)).astype(np.float32) / np.float32(numel)
        total = float(squares.sum())
        count = len(stream.models)
        weights = np.full(count, 1 / count, dtype=np.float32) if abs(total) < 1e-6 else squares / np.float32(total)
        for chunk in stream.chunks(write=True):
            stream.backend.sce(chunk.out, chunk.base, chunk.models, [float(w) for w in weights])
