"""TIES (Yadav et al. 2023): keep each task vector's top-density magnitudes (exactly k = density * n
elements; ties at the threshold by flat index, merge/bands.py), elect a sign per element by the
weighted sum, average what agrees."""

from dtm_fast.merge.methods.gta import GeneralizedTaskArithmetic


class Ties(GeneralizedTaskArithmetic):
    name = "ties"
    summary = "trim to top-density magnitudes, elect sign, disjoint mean"
    sparsification = "magnitude"
    consensus = "sum"
    default_normalize = True
