"""DELLA (Deep et al. 2024, arXiv 2406.11617), as mergekit defines it: each task vector is pruned by
MagPrune, which keeps a delta with a probability that rises with its magnitude rank within its row
(from density - epsilon for the smallest to density + epsilon for the largest; a vector is one row),
rescaled so its L1 norm is the unpruned one's (`rescale`), then merged like TIES (della: sign
election, normalised) or summed (della_linear). The random draws are DARE's counter-based Philox
stream keyed by (seed, tensor, model), so the masks are the same on every backend and chunking;
mergekit draws with torch.bernoulli, so the two agree in distribution, not element by element.
Passes: with L1 rescale, one to prune and sum, then the combine. A tensor of one chunk keeps its
pruned deltas in memory, which the combine only scales; one of up to KEEP_BITS_CHUNKS chunks keeps
its keep decisions, one bit per element and model, which the combine applies instead of ranking
every row again (the budget holds them: statistics_bytes_per_element); a larger one is pruned again.
Without rescale, one pass."""

from __future__ import annotations

from typing import ClassVar

from dtm_fast.errors import DtmError
from dtm_fast.merge import rng
from dtm_fast.merge.magprune import packed_size
from dtm_fast.merge.methods.base import MergeMethod, Param, TensorParams, in_open_closed_unit
from dtm_fast.merge.specs import GtaSpec, Sparsify

L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance
# Tensors of up to this many chunks keep their keep decisions between the passes: 16 chunks' bits
# cost each model 2 bytes per chunk element of the budget (an eighth of its fp32 deltas buffer),
# and cover the embeddings of the default bench preset (65.5M elements at a 512 MiB budget)
KEEP_BITS_CHUNKS = 16
RESCALE_CHOICES = ("l1", "none")


def _rescale_choice(value: object) -> str | None:
    return None if value in RESCALE_CHOICES else "must be true/false (or l1/none)"


def della_parameters(default_normalize: bool) -> tuple[Param, ...]:
    return (
        Param("weight", "model", float, 1.0, help="weight of each model's task vector"),
        Param("density", "model", float, 1.0, in_open_closed_unit, help="mean fraction of each task vector kept"),
        Param("epsilon", "model", float, 0.15, help="keep probabilities span density +- epsilon"),
        Param("lambda", "global", float, 1.0, help="scale of the merged task vector"),
        Param("normalize", "global", bool, default_normalize, help="divide by the sum of the (agreeing) weights"),
        Param("rescale", "global", str, "l1", _rescale_choice, help="l1: pruned deltas keep their L1 norm"),
    )


class Della(MergeMethod):
    name = "della"
    summary = "MagPrune (rank-scaled random drop, L1 rescale), then TIES sign election"
    consensus: ClassVar[str | None] = "sum"
    row_wise = True
    vector_is_one_row = True
    min_models = 1
    params = della_parameters(default_normalize=True)

    def check_params(self, params: TensorParams, where: str) -> None:
        for index, (density, epsilon) in enumerate(zip(params.model("density"), params.model("epsilon"))):
            if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                raise DtmError(f"{where}: model {index}: epsilon {epsilon} must keep density +- epsilon inside (0, 1) "
                               f"(density {density})")

    def has_statistics_pass(self, params: TensorParams) -> bool:
        return params["rescale"] == "l1" and any(d < 1 for d in params.model("density"))

    def statistics_bytes_per_element(self, num_models: int) -> float:
        # fp32 pruned deltas of every model, zeros, the base widened, the mix; every model's keep bits
        return 4 * (num_models + 3) + num_models * KEEP_BITS_CHUNKS / 8

    def merge(self, params, stream):
        backend, context = stream.backend, stream.context
        count = len(stream.models)
        row_length = self.row_length(context)
        # a model kept whole (density 1) is pruned with probability 1 everywhere: the same path
        pruning = [(d, e) if d < 1 else (1.0, 0.0) for d, e in zip(params.model("density"), params.model("epsilon"))]
        keys = [rng.philox_key(context.seed, context.name, index) for index in range(count)]
        size = stream.chunk_elements
        deltas = [backend.scratch(f"della.deltas.{index}", size, "F32") for index in range(count)]
        scales = [1.0] * count
        ranges = stream.ranges()
        pruned_once = False  # the statistics pass left every pruned delta of the tensor in `deltas`
        keep_bits: list | None = None  # or each model's keep decisions, a byte-aligned segment per chunk
        segments: dict[int, slice] = {}  # chunk start -> its segment
        if self.has_statistics_pass(params):
            pruned_once = len(ranges) == 1
            if not pruned_once and stream.context.numel <= KEEP_BITS_CHUNKS * stream.chunk_elements:
                offset = 0
                for start, stop in ranges:
                    segments[start] = slice(offset, offset + packed_size(stop - start))
                    offset = segments[start].stop
                keep_bits = [backend.scratch(f"della.keep_bits.{index}", offset, "U8") for index in range(count)]
            sums = [[0.0, 0.0] for _ in range(count)]
            for chunk in stream.chunks():
                for index, model in enumerate(chunk.models):
                    if keep_bits is not None:
                        total, kept = backend.della_keep_bits(keep_bits[index][segments[chunk.start]], chunk.base,
                                                              model, row_length, *pruning[index], *keys[index],
                                                              chunk.start)
                    else:
                        total, kept = backend.della_deltas(deltas[index][:chunk.count], chunk.base, model,
                                                           row_length, *pruning[index], *keys[index], 1.0,
                                                           chunk.start)
                    sums[index][0] += total
                    sums[index][1] += kept
            scales = [total / kept if total >= L1_EPS and kept >= L1_EPS else 1.0 for total, kept in sums]
        spec = GtaSpec(tuple(float(w) for w in params.model("weight")), (Sparsify(),) * count, self.consensus,
                       bool(params["normalize"]), float(params["lambda"]))
        zeros, base32, mixed = (backend.scratch(f"della.{name}", size, "F32") for name in ("zeros", "base32", "mixed"))
        backend.linear(zeros, [], [])  # an empty sum: zeros
        for chunk in stream.chunks(write=True):
            n = chunk.count
            pruned = [deltas[index][:n] for index in range(count)]
            for index, model in enumerate(chunk.models):
                if pruned_once:
                    # kept ? (delta * 1) * scale : +0, the very fp32 products della_deltas would write
                    # (and a kept -0 turning +0 cannot reach the output, whose sum starts from +0)
                    backend.linear(pruned[index], [pruned[index]], [scales[index]])
                elif keep_bits is not None:
                    backend.della_apply(pruned[index], chunk.base, model, keep_bits[index][segments[chunk.start]],
                                        scales[index])
                else:
                    backend.della_deltas(pruned[index], chunk.base, model, row_length, *pruning[index],
                                         *keys[index], scales[index], chunk.start)
            # the pruned deltas combined as task vectors of a zero base, then added to the base: the
            # same fp32 operations as a task-arithmetic combine of them
            backend.gta(mixed[:n], zeros[:n], pruned, spec, chunk.start)
            backend.linear(base32[:n], [chunk.base], [1.0])
            backend.linear(chunk.out, [base32[:n], mixed[:n]], [1.0, 1.0])


class DellaLinear(Della):
    name = "della_linear"
    summary = "MagPrune (rank-scaled random drop, L1 rescale), weighted sum of task vectors"
    consensus = None
    params = della_parameters(default_normalize=False)
