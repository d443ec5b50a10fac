"""What the merge driver (engine.py) streams: a source lays out the output and says, for every planned
tensor, how it is filled. Full checkpoints are the source here; LoRA sub-models applied on the fly
(merge/lora/materialize.py) and LoRA adapter output (merge/lora/adapter_out.py) are sources too, so
every merge goes through the one loop: plan -> buffers -> stream -> combine -> write -> publish.

A source is built from the config and the opened inputs, and gives the driver:
    plan                    the output shards and tensors (header-only work, done at construction)
    check()                 refuse bad parameters before any output exists
    chunk_needs(backend)    what a chunk element costs (for the budget)
    work(shards, ...)       one TensorWork per planned tensor of those shards, in order
    side_files(partial)     config, tokenizer or adapter config beside the weights
    fingerprint_fields(), provenance_fields()   what else identifies and describes the merge
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dtm_fast.io.dtypes import torch_name
from dtm_fast.io.safetensors_format import DTYPE_SIZES, TensorEntry
from dtm_fast.merge.budget import ChunkNeeds, streaming_chunk, whole_rows
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.chunk import TensorContext
from dtm_fast.merge.methods.base import TensorParams
from dtm_fast.merge.plan import OutputPlan, PlannedShard, PlannedTensor, plan_output

if TYPE_CHECKING:
    from dtm_fast.merge.inputs import Inputs



@dataclass
class TensorWork:
    """Fills one planned tensor of a shard: run(fd) writes its bytes at the planned offset of the
    open shard file `fd` (through the driver's ChunkIO where it streams)."""

    tensor: PlannedTensor
    run: Callable[[int], None]


class MergeSource(ABC):
    needs_backend = True  # adapter output computes small factors in torch and needs no chunk backend

    reads_mapped_inputs = True  # input chunks may be views of the mapped files (when the backend reads so)
    budget_subject = "this merge"

    def __init__(self, config: MergeConfig, inputs: "Inputs", plan: OutputPlan):
        self.config = config
        self.inputs = inputs
        self.plan = plan
        self.params: dict[str, TensorParams] = {}

    def check(self) -> None:
        """Every tensor's resolved parameters are valid before any output exists."""
        method = self.config.method_impl
        for name, params in self.params.items():
            method.check_params(params, f"{self.config.source}: tensor {name!r}")

    def fingerprint_fields(self) -> dict:
        tokenizer = self.config.tokenizer  # the vocabulary changes the embedding rows (merge/vocab.py)
        return {"tokenizer": repr(tokenizer)} if tokenizer is not None else {}

    def provenance_fields(self) -> dict:
        return {}

    def side_files(self, partial: Path) -> list[str]:
        """Config, generation config and tokenizer files from the base (or first model), and the
        merge config in mergekit's schema (merge/side_files.py)."""
        from dtm_fast.merge.side_files import write_side_files

        config = self.config
        return write_side_files(config, partial, torch_name(config.dtype) if config.dtype else None,
                                self.config_updates())

    def config_updates(self) -> dict:
        """Changes to the copied config.json (slices change the layer count)."""
        return {}

    @abstractmethod
    def stage_label(self, backend_name: str) -> str:
        """What the progress line calls this merge."""

    @abstractmethod
    def chunk_needs(self, backend, mapped: bool) -> ChunkNeeds:
        """What one chunk element costs with `backend` (mapped: inputs read as mapped pages)."""

    @abstractmethod
    def budget_description(self, backend) -> str:
        """Why the budget is what it is, for the error when it is too small."""

    @abstractmethod
    def chunk_sizes(self, shards: list[PlannedShard], needs: ChunkNeeds, budget: int) -> dict[str, int]:
        """Chunk length of every tensor of `shards`, none above the `budget` chunk unless a row needs it."""

    @abstractmethod
    def work(self, shards: list[PlannedShard], backend, io, chunks: dict[str, int]) -> list[list[TensorWork]]:
        """For each shard, the TensorWork of each of its tensors, in merge order."""


def resolve_params(config: MergeConfig, plan: OutputPlan) -> dict[str, TensorParams]:
    """Every merged tensor's parameters, resolved once: the budget, the chunking and the merge read them."""
    return {t.name: config.tensor_params(t.name, t.layer_index, plan.num_layers)
            for s in plan.shards for t in s.tensors if t.merged}


@dataclass(frozen=True)
class TensorInputs:
    """The entries one output tensor is made from (a copied tensor: `models` holds its one source)."""

    base: TensorEntry | None
    models: tuple[TensorEntry, ...]
    fishers: tuple[TensorEntry, ...] = ()

    @property
    def count(self) -> int:
        return int(self.base is not None) + len(self.models) + len(self.fishers)


class CheckpointSource(MergeSource):
    """Full checkpoints: every float tensor merged by the method, the rest copied from the base.
    Subclasses (slices.py) give other tables of which entries make which output tensor."""

    def __init__(self, config: MergeConfig, inputs: "Inputs", plan: OutputPlan | None = None,
                 table: dict[str, TensorInputs] | None = None, params: dict[str, TensorParams] | None = None):
        super().__init__(config, inputs, plan or plan_output(inputs.reference, config.dtype, config.max_shard_size,
                                                             config.max_shard_parameters))
        self.params = params if params is not None else resolve_params(config, self.plan)
        self.table = table if table is not None else self._same_names()

    def _same_names(self) -> dict[str, TensorInputs]:
        """Every output tensor from the tensors of the same name (full checkpoints that agree)."""
        inputs, method = self.inputs, self.config.method_impl
        table = {}
        for shard in self.plan.shards:
            for tensor in shard.tensors:
                base = inputs.base.tensors[tensor.name] if inputs.base is not None else None
                models = tuple(m.tensors[tensor.name] for m in inputs.models)
                if tensor.merged:
                    table[tensor.name] = TensorInputs(base if method.reads_base else None, models,
                                                      tuple(f.tensors[tensor.name] for f in inputs.fishers))
                else:  # copied unchanged from the base (or the first model)
                    table[tensor.name] = TensorInputs(None, (base if base is not None else models[0],))
        return table

    def stage_label(self, backend_name: str) -> str:
        return f"merge ({self.config.method}, {backend_name})"

    def _input_count(self) -> int:
        return max(entries.count for entries in self.table.values())

    def chunk_needs(self, backend, mapped: bool) -> ChunkNeeds:
        inputs, method = self.inputs, self.config.method_impl
        # every slot is sized for the widest dtype of any input, so any input can use any slot
        itemsize = max(DTYPE_SIZES[e.dtype] for c in inputs.all() for e in c.tensors.values())
        count = self._input_count()
        out_size = max(DTYPE_SIZES[t.out_dtype] for s in self.plan.shards for t in s.tensors)
        longest_row = 0
        for shard in self.plan.shards:
            for tensor in shard.tensors:
                if tensor.merged and method.needs_whole_rows(self.params[tensor.name]):
                    longest_row = max(longest_row, method.row_length(self._context(tensor)))
        return ChunkNeeds((itemsize,) * count, out_size,
                          backend.workspace_bytes_per_element(count)
                          + method.statistics_bytes_per_element(max(len(e.models) for e in self.table.values())),
                          min_elements=max(longest_row, 4096), mapped=mapped)

    def budget_description(self, backend) -> str:
        return f"{self._input_count()} inputs, {backend.name} backend"

    def chunk_sizes(self, shards: list[PlannedShard], needs: ChunkNeeds, budget: int) -> dict[str, int]:
        """A tensor with statistics passes takes the largest chunk the budget allows, so that it is
        read once for all its passes when it fits; a one-pass tensor streams in cache-sized chunks.
        Row-wise methods get whole rows."""
        method = self.config.method_impl
        streaming = min(budget, streaming_chunk(needs))
        sizes = {}
        for shard in shards:
            for tensor in shard.tensors:
                params = self.params.get(tensor.name)
                chunk = budget if params is not None and method.has_statistics_pass(params) else streaming
                if params is not None and method.needs_whole_rows(params):
                    row_length = method.row_length(self._context(tensor))
                    if row_length > 1:
                        chunk = whole_rows(chunk, row_length)  # the budget holds a row
                sizes[tensor.name] = chunk
        return sizes

    def _context(self, tensor: PlannedTensor) -> TensorContext:
        return TensorContext(tensor.name, tensor.shape, self.config.seed)

    def work(self, shards: list[PlannedShard], backend, io, chunks: dict[str, int]) -> list[list[TensorWork]]:
        """One stream per tensor, each knowing the one after it so its first chunk is read while the
        current tensor computes."""
        from dtm_fast.merge.stream import TensorStream

        method = self.config.method_impl
        result, previous = [], None
        for shard in shards:
            shard_work = []
            for tensor in shard.tensors:
                entries = self.table[tensor.name]
                stream = TensorStream(self._context(tensor), backend, entries.base, entries.models, entries.fishers,
                                      io, chunks[tensor.name], tensor.out_dtype, None, tensor.offset)
                run = _merging(method, self.params[tensor.name], stream) if tensor.merged else _copying(stream)
                if previous is not None:
                    previous.following = stream
                previous = stream
                shard_work.append(TensorWork(tensor, run))
            result.append(shard_work)
        return result


def _merging(method, params: TensorParams, stream) -> Callable[[int], None]:
    def run(fd: int) -> None:
        stream.out_fd = fd
        method.merge(params, stream)

    return run


def _copying(stream) -> Callable[[int], None]:
    def run(fd: int) -> None:
        stream.out_fd = fd
        stream.copy_first_input()

    return run
