"""Arcee Fusion, as mergekit (0.1.5) defines it, for one model and its base: each element's
importance is s = |x - b| * KL(p || q) with p = softmax(x) + 1e-8 and q = softmax(b) + 1e-8 over
its last-axis row (a vector is one row); the delta is kept where s >= median + 1.5 * (q3 - q1), the
quartiles of s over the whole tensor, y = b + (x - b) * [kept]. A quantile q is the element at
position floor(q * (n - 1)) of the ascending sort (the median its lower middle), the threshold is
computed in fp32 as mergekit does.

Where dtm differs: mergekit takes the quartiles of a random sample of 10^6 elements (drawn with
replacement, unseeded) when a tensor has more, so its result on such tensors is random; dtm always
takes the exact quantiles of every element (merge/order_statistics.py), which is mergekit's result
for tensors of at most 10^6 elements. Streamed: the importance is computed per chunk of whole rows,
two radix-select passes find the three quartiles, a third pass writes the output."""

import numpy as np

from dtm_fast.merge.methods.base import MergeMethod
from dtm_fast.merge.order_statistics import Statistic, ascending_values

QUARTILES = (1, 2, 3)  # quarters: q1, the median, q3
IQR_FACTOR = np.float32(1.5)


def quartile_positions(numel: int) -> list[int]:
    """mergekit's positions (q * (n - 1)) of q = 0.25, 0.5, 0.75 in the ascending sort, truncated:
    in exact integers, which equal its fp32 products wherever it sorts every element (n <= 10^6)."""
    return [quarter * (numel - 1) // 4 for quarter in QUARTILES]


def fusion_threshold(q1: np.float32, median: np.float32, q3: np.float32) -> np.float32:
    """median + 1.5 * (q3 - q1), each step rounded to fp32 as mergekit's fp32 tensors are."""
    with np.errstate(all="ignore"):  # infinite importances give inf - inf = NaN, as in torch
        return np.float32(median + IQR_FACTOR * np.float32(q3 - q1))


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "keep the deltas whose |delta| x row KL divergence is an upper outlier (median + 1.5 IQR)"
    min_models = 1
    max_models = 1
    row_wise = True  # the softmax and its KL divergence are per last-axis row: chunks hold whole rows
    vector_is_one_row = True

    def row_length(self, context):
        # mergekit's softmax runs over the last axis, which for a matrix is the leading axis' rows
        return context.shape[-1] if len(context.shape) >= 2 else super().row_length(context)

    def has_statistics_pass(self, params):
        return True

    def statistics_bytes_per_element(self, num_models):
        # the fp32 importance of a chunk, plus the torch reference's temporaries: the widened inputs,
        # both softmaxes and the KL terms, then the int64 order keys and their histogram indices
        return 4 + 4 * 8 + 8 * 3

    def merge(self, params, stream):
        if stream.context.numel == 0:
            return
        backend = stream.backend
        row_length = self.row_length(stream.context)

        def importance(chunk, values):
            backend.fusion_importance(values, chunk.base, chunk.models[0], row_length)

        statistic = Statistic(stream, importance)
        q1, median, q3 = ascending_values(statistic, quartile_positions(stream.context.numel))
        threshold = float(fusion_threshold(q1, median, q3))
        for chunk, values in statistic.chunks(write=True):
            backend.fusion_combine(chunk.out, chunk.base, chunk.models[0], values, threshold)
