"""Generalised task arithmetic: the family behind task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs and breadcrumbs_ties (mergekit's generalized_task_arithmetic, same parameters).

For each model i with delta d_i = x_i - b:
  1. sparsify d_i (magnitude: keep the top `density`; random: DARE's Bernoulli(density) mask from
     the counter-based generator; band: breadcrumbs' drop-outliers-then-keep-density band),
     then optionally rescale the kept deltas;
  2. weigh: w_i * d_i;
  3. consensus (TIES "sum"): keep only the weighted deltas whose sign agrees with the sign of their
     sum (zero deltas never agree); "count": with the majority sign by count;
  4. mixed = sum of what is kept; with `normalize`, divided by the sum of the weights that were kept
     (all weights without consensus); times `lambda`; y = b + mixed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Sequence

from dtm_fast.errors import DtmError
from dtm_fast.merge import rng
from dtm_fast.merge.bands import Band
from dtm_fast.merge.magnitude import COLLECT_FRACTION, breadcrumbs_ranks, top_k_count
from dtm_fast.merge.methods.base import MergeMethod, Param, TensorParams, in_open_closed_unit, in_unit
from dtm_fast.merge.specs import GtaSpec, Sparsify

RESCALE_CHOICES = ("none", "l1", "inverse_density")
TIE_CHOICES = ("index", "all")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance


def _rescale_choice(value: object) -> str | None:
    return None if value in RESCALE_CHOICES else f"must be one of {', '.join(RESCALE_CHOICES)}"


def _tie_choice(value: object) -> str | None:
    return None if value in TIE_CHOICES else f"must be one of {', '.join(TIE_CHOICES)}"


class GeneralizedTaskArithmetic(MergeMethod):
    sparsification: ClassVar[str | None] = None  # None, "magnitude", "random", "band"
    consensus: ClassVar[str | None] = None
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[str] = "none"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = [
            Param("weight", "model", float, 1.0, help="weight of each model's task vector"),
            Param("lambda", "global", float, 1.0, help="scale of the merged task vector"),
            Param("normalize", "global", bool, cls.default_normalize,
                  help="divide by the sum of the (agreeing) weights"),
        ]
        if cls.sparsification is not None:
            params.append(Param("density", "model", float, 1.0, in_open_closed_unit,
                                help="fraction of each task vector kept"))
            params.append(Param("rescale", "global", str, cls.default_rescale, _rescale_choice,
                                help="none | l1 (match each delta's L1 norm, mergekit) | inverse_density (DARE)"))
        if cls.sparsification == "band":
            params.append(Param("gamma", "model", float, 0.01, in_unit,
                                help="fraction of the largest deltas dropped as outliers"))
        if cls.sparsification in ("magnitude", "band"):
            params.append(Param("threshold_ties", "global", str, "index", _tie_choice,
                                help="index: exactly k kept, ties by flat index (mergekit) | all: every tie kept"))
        cls.params = tuple(params)

    def check_params(self, params: TensorParams, where: str) -> None:
        if self.sparsification is not None and params["rescale"] == "inverse_density" and self.sparsification != "random":
            raise DtmError(f"{where}: rescale 'inverse_density' applies to random (DARE) masks only; use l1 or none")

    def has_statistics_pass(self, params: TensorParams) -> bool:
        if self.sparsification is None:
            return False
        thins = any(density < 1 for density in params.model("density"))
        return thins and (self.sparsification in ("magnitude", "band") or params["rescale"] == "l1")

    def statistics_bytes_per_element(self, num_models: int) -> float:
        # the bracketed threshold search collects up to chunk / COLLECT_FRACTION uint32 keys per band edge
        edges = {"magnitude": 1, "band": 2}.get(self.sparsification, 0)
        if not edges:
            return 0
        from dtm_fast.merge.one_read import STATISTICS_BYTES_PER_ELEMENT  # its buffers, or those of its fallback

        return max(edges * num_models * 4 / COLLECT_FRACTION, STATISTICS_BYTES_PER_ELEMENT)

    # -- which deltas are kept -------------------------------------------------------------------
    def _band(self, params: TensorParams, index: int, numel: int) -> Band | None:
        """Descending ranks of the kept magnitude band, or None when all are kept."""
        density = params.model("density")[index]
        if density >= 1 or numel == 0:
            return None
        if self.sparsification == "magnitude":
            return Band(1, top_k_count(density, numel), "ascending")
        return Band(*breadcrumbs_ranks(density, params.model("gamma")[index], numel), "descending")

    def _random_rules(self, params: TensorParams, stream) -> list[Sparsify]:
        """DARE's draws (scale 1) for the models it thins, keep-all for the others."""
        context, rules = stream.context, []
        for index in range(len(stream.models)):
            density = params.model("density")[index] if self.sparsification else 1.0
            if self.sparsification is None or density >= 1:
                rules.append(Sparsify())
            else:
                rules.append(Sparsify(kind="random", philox_key=rng.philox_key(context.seed, context.name, index),
                                      threshold=rng.keep_threshold(density)))
        return rules

    def _spec(self, params: TensorParams, rules: Sequence[Sparsify]) -> GtaSpec:
        return GtaSpec(weights=tuple(float(w) for w in params.model("weight")), sparsify=tuple(rules),
                       consensus=self.consensus, normalize=bool(params["normalize"]), lambda_=float(params["lambda"]))

    def _scales(self, params: TensorParams, thinned: Sequence[bool],
                l1_sums: Sequence[tuple[float, float]] | None) -> list[float]:
        """Each model's scale of its kept deltas: 1/density (DARE), sum |d| / kept sum (L1), or 1."""
        rescale = params["rescale"] if self.sparsification else "none"
        scales = []
        for index, thin in enumerate(thinned):
            scale = 1.0
            if thin and rescale == "inverse_density":
                scale = 1.0 / params.model("density")[index]
            elif thin and rescale == "l1" and l1_sums is not None:
                total, kept = l1_sums[index]
                scale = total / kept if total >= L1_EPS and kept >= L1_EPS else 1.0
            scales.append(scale)
        return scales

    # -- the merge (also the definition: reference() runs it on whole tensors) ----------------------
    def merge(self, params, stream):
        if self.sparsification in ("magnitude", "band"):
            self._merge_bands(params, stream)
            return
        backend = stream.backend
        rules = self._random_rules(params, stream)
        l1_sums = None
        if self.sparsification and params["rescale"] == "l1" and any(r.kind != "none" for r in rules):
            from dtm_fast.merge.band_l1 import add_l1_sums

            sums = [[0.0, 0.0] for _ in rules]
            for chunk in stream.chunks():
                add_l1_sums(backend, chunk, rules, sums)
            l1_sums = [tuple(s) for s in sums]
        scales = self._scales(params, [r.kind != "none" for r in rules], l1_sums)
        spec = self._spec(params, [replace(rule, scale=scale) for rule, scale in zip(rules, scales)])
        for chunk in stream.chunks(write=True):
            backend.gta(chunk.out, chunk.base, chunk.models, spec, chunk.start)

    def _merge_bands(self, params, stream) -> None:
        """TIES and breadcrumbs: exact magnitude bands, in one read of each input without L1
        rescale (merge/one_read.py), in two with it (merge/band_l1.py); where those fall back, the
        thresholds by the multi-pass search, then the combine, which locates where tied bounds stop."""
        from dtm_fast.merge import band_l1, one_read
        from dtm_fast.merge.bands import ChunkRules, find_bounds

        count, keep_all_ties = len(stream.models), params["threshold_ties"] == "all"
        bands = [self._band(params, i, stream.context.numel) for i in range(count)]
        thinned = [band is not None for band in bands]
        l1 = params["rescale"] == "l1" and any(thinned)
        found = None
        if one_read.applies(stream, bands):
            if not l1 and one_read.merge_bands(stream, bands, keep_all_ties, lambda rules: self._spec(params, rules)):
                return
            found = band_l1.thresholds_and_sums(stream, bands, keep_all_ties) if l1 else None
        if found is not None:
            final_rules, l1_sums = found
            rules_for = lambda chunk: final_rules  # noqa: E731 - the tie positions are known already
        else:
            if l1:
                bounds, l1_sums = band_l1.bounds_then_sums(stream, bands, keep_all_ties)
            else:
                bounds, l1_sums = find_bounds(stream, bands), None
            rules_for = ChunkRules(stream, bands, bounds, keep_all_ties).for_chunk
        scales = self._scales(params, thinned, l1_sums)
        for chunk in stream.chunks(write=True):
            scaled = [replace(rule, scale=scale) for rule, scale in zip(rules_for(chunk), scales)]
            stream.backend.gta(chunk.out, chunk.base, chunk.models, self._spec(params, scaled), chunk.start)
