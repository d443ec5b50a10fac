"""DARE (Yu et al. 2024): drop each delta element with probability 1 - density and rescale the
survivors by 1 / density. Masks come from the counter-based generator (merge/rng.py), so the same
seed gives the same mask on every backend and chunking. dare_ties adds TIES' sign election."""

from dtm_fast.merge.methods.gta import GeneralizedTaskArithmetic


class DareLinear(GeneralizedTaskArithmetic):
    name = "dare_linear"
    summary = "random drop + rescale, weighted sum of task vectors"
    sparsification = "random"
    default_rescale = "inverse_density"


class DareTies(GeneralizedTaskArithmetic):
    name = "dare_ties"
    summary = "random drop + rescale, then TIES sign election"
    sparsification = "random"
    consensus = "sum"
    default_rescale = "inverse_density"
