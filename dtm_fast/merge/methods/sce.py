"""SCE (Wan et al. 2024, arXiv 2408.07990), as mergekit defines it, on task vectors d_i = x_i - b:
1. select (`select_topk` < 1): per element, the variance of the d_i across the models (population
   variance); k = int(nonzero * select_topk) in fp32, nonzero the count of non-zero variances over
   the tensor; only the k elements of largest variance keep their deltas (every model's), the
   others' are zero; select_topk <= 0 keeps none, >= 1 all (no selection);
2. weigh: w_i = mean(d_i^2) / sum_j mean(d_j^2) over the selected deltas (1/K when that sum is
   below 1e-6);
3. erase: a delta is erased unless its sign agrees with the sign of the deltas' plain sum;
   y = b + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6), m_i the agreement masks.

Ties at the k-th largest variance: dtm keeps the tied elements of lowest flat index. mergekit's
torch.topk keeps whichever its selection algorithm leaves in place, which may be other elements of
the same variance (tests/merge/test_methods_mergekit.py compares the two).

Passes: without selection, each model's sum of d^2 (float64), then the combine; with it, two
radix-select passes over the variance (merge/order_statistics.py), a third where the k-th variance's
ties are split, the weights' pass and the combine. A tensor held in one chunk is read once."""

import numpy as np

from dtm_fast.merge.methods.base import MergeMethod, Param
from dtm_fast.merge.methods.gram import delta_gram
from dtm_fast.merge.order_statistics import Statistic, TopRule, top_rule


def selected_count(nonzero: int, select_topk: float) -> int:
    """mergekit's k = int(count_nonzero(var) * select_topk): an int64 count times a Python float is
    an fp32 product in torch."""
    return int(np.float32(nonzero) * np.float32(select_topk))


def sce_weights(squares: np.ndarray) -> np.ndarray:
    """w_i from each model's mean square (fp32, as mergekit): ratios to their sum, 1/K when it is ~0."""
    total = float(squares.sum())
    count = len(squares)
    return np.full(count, 1 / count, dtype=np.float32) if abs(total) < 1e-6 else squares / np.float32(total)


class Sce(MergeMethod):
    name = "sce"
    summary = "top-variance selection, task vectors weighted by their mean square, TIES-style sign agreement"
    params = (
        Param("select_topk", "global", float, 1.0,
              help="fraction of the non-zero-variance elements kept, by largest variance (>= 1: all)"),
        Param("int8_mask", "global", bool, False, help="mergekit's memory option; no effect on the result"),
    )

    def statistics_bytes_per_element(self, num_models):
        # with select_topk, the fp32 variance of a chunk (the reference backend's torch temporaries
        # are in its own workspace)
        return 4

    def has_statistics_pass(self, params):
        return True

    def merge(self, params, stream):
        backend = stream.backend
        numel = np.float32(max(1, stream.context.numel))
        select_topk = float(params["select_topk"])
        if select_topk >= 1:
            squares = np.diagonal(delta_gram(stream)).astype(np.float32) / numel
            weights = [float(w) for w in sce_weights(squares)]
            for chunk in stream.chunks(write=True):
                backend.sce(chunk.out, chunk.base, chunk.models, weights)
            return

        def variance(chunk, values):
            backend.sce_variance(values, chunk.base, chunk.models)

        statistic = Statistic(stream, variance)
        if select_topk > 0:
            rule = top_rule(statistic, lambda nonzero: selected_count(nonzero, select_topk))
        else:
            rule = TopRule()  # mergekit's select_topk <= 0: no element selected, y = b
        sums = np.zeros(len(stream.models), dtype=np.float64)
        for chunk, values in statistic.chunks():
            sums += backend.sce_squares(chunk.base, chunk.models, values, rule, chunk.start)
        weights = [float(w) for w in sce_weights(sums.astype(np.float32) / numel)]
        for chunk, values in statistic.chunks(write=True):
            backend.sce(chunk.out, chunk.base, chunk.models, weights, values, rule, chunk.start)
