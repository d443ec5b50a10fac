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

from typing import ClassVar, Sequence

from dtm_fast.errors import DtmError
from dtm_fast.merge import rng
from dtm_fast.merge.magnitude import (
    COLLECT_FRACTION, RadixSearch, bracketed_select, breadcrumbs_ranks, new_histogram, sorted_select, top_k_count,
)
from dtm_fast.merge.methods.base import (
    MergeMethod, Param, TensorContext, TensorParams, in_open_closed_unit, in_unit,
)
from dtm_fast.merge.specs import NO_UPPER_KEY, GtaSpec, Sparsify

RESCALE_CHOICES = ("none", "l1", "inverse_density")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance


def _rescale_choice(value: object) -> str | None:
    return None if value in RESCALE_CHOICES else f"must be one of {', '.join(RESCALE_CHOICES)}"


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
        return edges * num_models * 4 / COLLECT_FRACTION

    # -- which deltas are kept -------------------------------------------------------------------
    def _ranks(self, params: TensorParams, index: int, numel: int) -> tuple[int, int] | None:
        """Descending ranks (first, last) of the kept magnitude band, or None when all are kept."""
        density = params.model("density")[index]
        if density >= 1 or numel == 0:
            return None
        if self.sparsification == "magnitude":
            return 1, top_k_count(density, numel)
        return breadcrumbs_ranks(density, params.model("gamma")[index], numel)

    def _rules_from_keys(self, params: TensorParams, context: TensorContext,
                         band_keys: Sequence[tuple[int, int] | None]) -> list[Sparsify]:
        """Sparsify rules (scale 1) once the magnitude thresholds, if any, are known."""
        rules = []
        for index in range(len(band_keys)):
            density = params.model("density")[index] if self.sparsification else 1.0
            if self.sparsification is None or density >= 1:
                rules.append(Sparsify())
            elif self.sparsification == "random":
                rules.append(Sparsify(kind="random", philox_key=rng.philox_key(context.seed, context.name, index),
                                      threshold=rng.keep_threshold(density)))
            elif band_keys[index] is None:  # an empty band: nothing is kept
                rules.append(Sparsify(kind="band", low_key=NO_UPPER_KEY, high_key=-1))
            else:
                low, high = band_keys[index]
                rules.append(Sparsify(kind="band", low_key=low, high_key=high))
        return rules

    def _spec(self, params: TensorParams, rules: Sequence[Sparsify]) -> GtaSpec:
        return GtaSpec(weights=tuple(float(w) for w in params.model("weight")), sparsify=tuple(rules),
                       consensus=self.consensus, normalize=bool(params["normalize"]), lambda_=float(params["lambda"]))

    def _with_scales(self, params: TensorParams, rules: list[Sparsify], l1_sums: Sequence[tuple[float, float]] | None) -> list[Sparsify]:
        rescale = params["rescale"] if self.sparsification else "none"
        scaled = []
        for index, rule in enumerate(rules):
            scale = 1.0
            if rule.kind != "none" and rescale == "inverse_density":
                scale = 1.0 / params.model("density")[index]
            elif rule.kind != "none" and rescale == "l1" and l1_sums is not None:
                total, kept = l1_sums[index]
                scale = total / kept if total >= L1_EPS and kept >= L1_EPS else 1.0
            scaled.append(Sparsify(rule.kind, rule.low_key, rule.high_key, rule.philox_key, rule.threshold, scale))
        return scaled

    # -- the merge (also the definition: reference() runs it on whole tensors) ----------------------
    def merge(self, params, stream):
        context, backend = stream.context, stream.backend
        count = len(stream.models)
        band_keys: list[tuple[int, int] | None] = [None] * count
        if self.sparsification in ("magnitude", "band"):
            band_keys = self._stream_thresholds(params, stream)
        rules = self._rules_from_keys(params, context, band_keys)
        l1_sums = None
        if self.sparsification and params["rescale"] == "l1" and any(r.kind != "none" for r in rules):
            sums = [[0.0, 0.0] for _ in range(count)]
            for chunk in stream.chunks():
                for index, (model, rule) in enumerate(zip(chunk.models, rules)):
                    total, kept = backend.masked_l1(chunk.base, model, rule, chunk.start)
                    sums[index][0] += total
                    sums[index][1] += kept
            l1_sums = [tuple(s) for s in sums]
        spec = self._spec(params, self._with_scales(params, rules, l1_sums))
        for chunk in stream.chunks(write=True):
            backend.gta(chunk.out, chunk.base, chunk.models, spec, chunk.start)

    def _stream_thresholds(self, params: TensorParams, stream) -> list[tuple[int, int] | None]:
        """Exact band keys for every model: one bracketed pass where a sample brackets them (and the
        backend can), two radix-select passes over the stream for what remains."""
        numel = stream.context.numel
        wanted: list[list[int]] = []  # descending ranks whose keys each model's band needs
        for index in range(len(stream.models)):
            ranks = self._ranks(params, index, numel)
            if ranks is None or ranks[1] < ranks[0]:
                wanted.append([])
            else:
                first, last = ranks  # rank 1 needs no search: its band has no upper bound
                wanted.append(sorted({first, last} - {1} | {last}))
        if not any(wanted):
            return [None] * len(stream.models)
        if stream.holds_whole_tensor:
            return self._band_keys(params, numel, wanted, sorted_select(stream, wanted))
        found = bracketed_select(stream, wanted)
        missing = [[rank for rank in ranks if rank not in found[index]] for index, ranks in enumerate(wanted)]
        if any(missing):
            for index, keys in enumerate(self._radix_select(stream, missing)):
                found[index].update(keys)
        return self._band_keys(params, numel, wanted, found)

    def _band_keys(self, params: TensorParams, numel: int, wanted: list[list[int]],
                   found: list[dict[int, int]]) -> list[tuple[int, int] | None]:
        result: list[tuple[int, int] | None] = []
        for index, ranks in enumerate(wanted):
            if not ranks:
                result.append(None)
                continue
            first, last = self._ranks(params, index, numel)
            result.append((found[index][last], NO_UPPER_KEY if first == 1 else found[index][first]))
        return result

    @staticmethod
    def _radix_select(stream, ranks_per_model: list[list[int]]) -> list[dict[int, int]]:
        """Keys at descending ranks per model with two radix-select passes over the stream."""
        backend = stream.backend
        searches = [[RadixSearch(rank) for rank in ranks] for ranks in ranks_per_model]
        high = [new_histogram() for _ in searches]
        for chunk in stream.chunks():
            for index, model in enumerate(chunk.models):
                if searches[index]:
                    backend.abs_delta_histogram(chunk.base, model, high[index], None)
        buckets = {}
        for index, model_searches in enumerate(searches):
            for search in model_searches:
                search.locate_bucket(high[index])
                buckets.setdefault((index, search.bucket), new_histogram())
        for chunk in stream.chunks():
            for (index, bucket), histogram in buckets.items():
                backend.abs_delta_histogram(chunk.base, chunk.models[index], histogram, bucket)
        found = []
        for index, model_searches in enumerate(searches):
            for search in model_searches:
                search.locate_key(buckets[(index, search.bucket)])
            found.append({search.rank: search.key for search in model_searches})
        return found
