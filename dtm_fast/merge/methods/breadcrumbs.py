"""Model breadcrumbs (Davari & Belilovsky 2023): drop the largest `gamma` fraction of each task
vector as outliers and the smallest, keeping a `density` band; breadcrumbs_ties adds TIES' sign
election. Both band edges are exact thresholds; elements tied at an edge are kept by flat index, as
mergekit's ascending sort keeps them (merge/bands.py), so exactly density * n elements are kept."""

from dtm_fast.merge.methods.gta import GeneralizedTaskArithmetic


class Breadcrumbs(GeneralizedTaskArithmetic):
    name = "breadcrumbs"
    summary = "drop outliers and small deltas, weighted sum of the band"
    sparsification = "band"


class BreadcrumbsTies(GeneralizedTaskArithmetic):
    name = "breadcrumbs_ties"
    summary = "breadcrumbs band, then TIES sign election"
    sparsification = "band"
    consensus = "sum"
