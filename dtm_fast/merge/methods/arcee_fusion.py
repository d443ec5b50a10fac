"""Arcee Fusion, as mergekit (0.1.5) defines it, for one model and its base: each element's
importance is s = |x - b| * KL(p || q) with p = softmax(x) + 1e-8 and q = softmax(b) + 1e-8 over
its last-axis row (a vector is one row); the delta is kept where s >= median + 1.5 * (q3 - q1), the
quartiles of s over the whole tensor, y = b + (x - b) * [kept]. A quantile q is the element at
position floor(q * (n - 1)) of the ascending sort (the median its lower middle), the threshold is
computed in fp32 as mergekit does.

Where dtm differs: mergekit takes the quartiles of a random sample of 10^6 elements (drawn with
replacement, unseeded) when a tensor has more, so its result on such tensors is random; dtm always
takes the exact quantiles of every element (merge/order_statistics.py), which is mergekit's result
for tensors of at most 10^6 elements. Streamed: each row's divergence is computed once (a float per
row, kept for the tensor), the importance |x - b| * divergence per chunk of whole rows in each pass;
two radix-select passes find the three quartiles, a third pass writes the output."""

import numpy as np

from dtm_fast.merge.backends.reference_methods import FUSION_BLOCK_ELEMENTS, FUSION_BLOCK_TEMPORARIES
from dtm_fast.merge.methods.base import MergeMethod
from dtm_fast.merge.order_statistics import Statistic, ascending_values

QUARTILES = (1, 2, 3)  # quarters: q1, the median, q3
IQR_FACTOR = np.float32(1.5)
SOFTMAX_BLOCKS_PER_CHUNK = 4  # a softmax block is at most this fraction of the chunk (and one row at least)


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
    uses_torch = True  # the rows' softmaxes (backends/reference_methods.fusion_divergence)

    def row_length(self, context):
        # mergekit's softmax runs over the last axis, which for a matrix is the leading axis' rows
        return context.shape[-1] if len(context.shape) >= 2 else super().row_length(context)

    def has_statistics_pass(self, params):
        return True

    def statistics_bytes_per_element(self, num_models):
        # the fp32 importance of a chunk, its rows' divergences (at most one per element) and the
        # softmaxes' temporaries on blocks of at most a quarter chunk; the reference backend's other
        # torch temporaries are in its own workspace
        return 4 + 4 + 4 * FUSION_BLOCK_TEMPORARIES / SOFTMAX_BLOCKS_PER_CHUNK

    def merge(self, params, stream):
        if stream.context.numel == 0:
            return
        backend = stream.backend
        row_length = self.row_length(stream.context)

        # every row's KL divergence computed once (the softmaxes) for all the passes, into one buffer
        # taken before them (small long-lived allocations between the softmaxes' temporaries pinned
        # the heap: it grew by a chunk per chunk); recomputed per pass only where a tensor has more
        # rows than its budgeted share holds (rows of one or two elements)
        total_rows = stream.context.numel // row_length
        cached = total_rows <= stream.chunk_elements
        divergence = backend.scratch("arcee_fusion.divergence", total_rows if cached else stream.chunk_elements, "F32")
        computed = set()
        block_elements = min(FUSION_BLOCK_ELEMENTS, stream.chunk_elements // SOFTMAX_BLOCKS_PER_CHUNK)

        def importance(chunk, values):
            first = chunk.start // row_length if cached else 0
            rows = divergence[first:first + chunk.count // row_length]
            if chunk.start not in computed:
                backend.fusion_divergence(rows, chunk.base, chunk.models[0], row_length, block_elements)
                if cached:
                    computed.add(chunk.start)
            backend.fusion_importance(values, chunk.base, chunk.models[0], rows, row_length)

        statistic = Statistic(stream, importance)
        q1, median, q3 = ascending_values(statistic, quartile_positions(stream.context.numel))
        threshold = float(fusion_threshold(q1, median, q3))
        for chunk, values in statistic.chunks(write=True):
            backend.fusion_combine(chunk.out, chunk.base, chunk.models[0], values, threshold)
