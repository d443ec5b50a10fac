"""mergekit's `model+lora`: a LoRA adapter applied to its model on the fly, as the model it makes
(W + s B A), never written out as a full copy. Tensors the adapters target are streamed in whole
row blocks like --lora-mode materialize (lora/materialize.py), each model's chunk read from the model
itself and its low-rank product added in fp32; every other tensor streams as in any merge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtm_fast.merge.budget import MIN_CHUNK_ELEMENTS, ChunkNeeds
from dtm_fast.merge.lora.adapters import read_adapter, read_factor
from dtm_fast.merge.lora.materialize import FACTOR_ITEMSIZE, ROW_BLOCK, LoraTensorStream, factor_bytes
from dtm_fast.merge.plan import PlannedShard
from dtm_fast.merge.sources import CheckpointSource, TensorWork

if TYPE_CHECKING:
    from dtm_fast.merge.config import MergeConfig
    from dtm_fast.merge.inputs import Inputs


class AdaptedSource(CheckpointSource):
    reads_mapped_inputs = False  # adapted models are computed into buffers

    def __init__(self, config: "MergeConfig", inputs: "Inputs"):
        super().__init__(config, inputs)
        self.adapters = [read_adapter(adapter, model, "materialize") if adapter is not None else None
                         for model, adapter in zip(inputs.models, inputs.model_adapters)]
        self.targeted = {name for adapter in self.adapters if adapter is not None for name in adapter.modules}

    def stage_label(self, backend_name: str) -> str:
        return f"merge ({self.config.method} of models with LoRA adapters, {backend_name})"

    def chunk_needs(self, backend, mapped: bool) -> ChunkNeeds:
        needs = super().chunk_needs(backend, False)
        present = [a for a in self.adapters if a is not None]
        widest = max(needs.input_itemsizes)
        rows = [ROW_BLOCK * self.inputs.reference.tensors[name].shape[1] for name in self.targeted]
        return ChunkNeeds(tuple(max(size, FACTOR_ITEMSIZE) for size in needs.input_itemsizes), needs.out_itemsize,
                          needs.extra_per_element + FACTOR_ITEMSIZE + widest,  # the widened base, one raw read
                          resident_bytes=max(factor_bytes(present, name) for name in self.targeted),
                          min_elements=max([needs.min_elements, MIN_CHUNK_ELEMENTS, *rows]))

    def chunk_sizes(self, shards: list[PlannedShard], needs: ChunkNeeds, budget: int) -> dict[str, int]:
        sizes = super().chunk_sizes(shards, needs, budget)
        for shard in shards:
            for tensor in shard.tensors:
                if tensor.name in self.targeted:  # whole row blocks: the products do not depend on the budget
                    block = ROW_BLOCK * (tensor.numel // tensor.shape[0])
                    sizes[tensor.name] = max(block, budget // block * block)
        return sizes

    def work(self, shards: list[PlannedShard], backend, io, chunks: dict[str, int]) -> list[list[TensorWork]]:
        plain = super().work(shards, backend, io, chunks)
        return [[TensorWork(item.tensor, self._adapted(item.tensor, backend, io, chunks[item.tensor.name]))
                 if item.tensor.name in self.targeted and item.tensor.merged else item for item in shard_work]
                for shard_work in plain]

    def _adapted(self, tensor, backend, io, chunk: int):
        method = self.config.method_impl
        entries = self.table[tensor.name]
        modules = [a.modules.get(tensor.name) if a is not None else None for a in self.adapters]

        def run(fd: int) -> None:
            deltas = [None if m is None else (m.scale, read_factor(m.b), read_factor(m.a)) for m in modules]
            for module, delta in zip(modules, deltas):
                if delta is not None:
                    io.nonfinite.check_factors(tensor.name, str(module.a.path), delta[1:])
            stream = LoraTensorStream(self._context(tensor), backend, entries.base, entries.models, [], io, chunk,
                                      tensor.out_dtype, fd, tensor.offset, deltas=deltas, sources=entries.models)
            method.merge(self.params[tensor.name], stream)

        return run

    def provenance_fields(self) -> dict:
        return {"model_adapters": [str(m.adapter) if m.adapter else None for m in self.config.models]}

    def fingerprint_fields(self) -> dict:
        return self.provenance_fields()
