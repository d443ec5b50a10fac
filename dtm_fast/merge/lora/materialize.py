"""--lora-mode materialize: merge the LoRA sub-models W_i = W + s_i B_i A_i as full models, with any
merge method, into a full Hugging Face checkpoint, under the same guarantees as a merge of full
models (memory budget, atomic output, --resume, --shard-index).

No sub-model is ever written or held whole. A LoRA-targeted tensor is streamed in row chunks: the
reader thread reads the base rows and computes each model's chunk in fp32 as
base[rows] + s_i * B_i[rows] @ A_i into that model's input buffer, so every method sees ordinary
model chunks. The product is computed in fixed blocks of ROW_BLOCK rows at absolute row positions,
and chunks hold whole blocks: each block's GEMM then has the same operands whatever the budget,
so the output bytes do not depend on --max-memory. Tensors no adapter touches are the base's,
copied (converted only when --dtype asks).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

from dtm_fast.errors import DtmError
from dtm_fast.io.safetensors_format import DTYPE_SIZES, read_exact
from dtm_fast.merge.budget import MIN_CHUNK_ELEMENTS, ChunkNeeds
from dtm_fast.merge.chunk import Chunk, TensorContext
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.host_array import torch_dtype
from dtm_fast.merge.lora.adapters import LoraAdapter, LoraModule, read_factor
from dtm_fast.merge.plan import PlannedShard, plan_output
from dtm_fast.merge.sources import MergeSource, TensorWork, resolve_params
from dtm_fast.merge.stream import TensorStream

if TYPE_CHECKING:
    from dtm_fast.merge.inputs import Inputs

log = logging.getLogger(__name__)
ROW_BLOCK = 16  # rows per low-rank product; chunks of LoRA-targeted tensors hold whole blocks
FACTOR_ITEMSIZE = 4  # factors and virtual sub-model chunks are fp32


class TorchViewStream(TensorStream):
    """Chunks as torch tensors whatever the backend (the cpu backend takes them too): the LoRA
    path computes on them with torch."""

    def view(self, raw, dtype: str) -> torch.Tensor:
        return torch.from_numpy(raw).view(torch_dtype(dtype))


class LoraTensorStream(TorchViewStream):
    """A tensor's chunks where model i is the virtual sub-model base + s_i B_i A_i (fp32).

    `deltas[i]` is (s_i, B_i (out x r), A_i (r x in)) in fp32, or None for an adapter that does not
    touch this tensor (its sub-model equals the base here). Input slot 0 holds the base chunk,
    slot 1 + i model i's chunk."""

    def __init__(self, *args, deltas: Sequence[tuple[float, torch.Tensor, torch.Tensor] | None], **kwargs):
        super().__init__(*args, **kwargs)
        self.deltas = list(deltas)
        if self.chunk_elements % (ROW_BLOCK * self.context.row_length):
            raise ValueError("chunks of a LoRA-targeted tensor must hold whole row blocks")

    def read(self, slot: int, start: int, stop: int) -> Chunk:
        count = stop - start
        entry = self.base_entry
        size = DTYPE_SIZES[entry.dtype]
        raw = self.buffers.inputs[slot][0][: count * size]
        read_exact(self.files.fd(entry.path), memoryview(raw), entry.offset + start * size, entry.path)
        self.io.nonfinite.check(id(self), self.context.name, str(entry.path), start, raw, entry.dtype)
        base = self.view(raw, entry.dtype)
        row_length = self.context.row_length
        first_row = start // row_length
        models = []
        for index, delta in enumerate(self.deltas):
            model = self.view(self.buffers.inputs[slot][1 + index][: count * FACTOR_ITEMSIZE], "F32")
            model.copy_(base)
            if delta is not None:
                scale, b, a = delta
                rows = model.view(-1, row_length)  # (rows in chunk, in)
                for block_start in range(0, rows.shape[0], ROW_BLOCK):
                    block = rows[block_start: block_start + ROW_BLOCK]
                    row = first_row + block_start
                    block.addmm_(b[row: row + block.shape[0]], a, alpha=scale)  # += s * B[rows] @ A
            models.append(model)
        return Chunk(start, count, base, models, [], [raw])


def factor_bytes(adapters: Sequence[LoraAdapter], weight_name: str) -> int:
    """Memory of one tensor's fp32 factors from every adapter (plus the raw read of the largest)."""
    modules = [a.modules[weight_name] for a in adapters if weight_name in a.modules]
    fp32 = sum(FACTOR_ITEMSIZE * m.rank * (m.a.shape[1] + m.b.shape[0]) for m in modules)
    return fp32 + max(max(m.a.nbytes, m.b.nbytes) for m in modules)


def check_linear_keeps_the_base(config: MergeConfig, params: dict, adapters: Sequence[LoraAdapter]) -> None:
    """Un-normalised linear weights would scale the base itself by sum(w) in adapted tensors while
    untouched tensors stay the base's: a model nobody wants. Say what does the intended thing."""
    if config.method != "linear":
        return
    targeted = {name for adapter in adapters for name in adapter.modules}
    for name in sorted(targeted):
        total = sum(params[name].model("weight"))
        if not params[name]["normalize"] and abs(total - 1) > 1e-6:
            raise DtmError(f"{config.source}: linear without normalisation and weights summing to {total:g} (tensor "
                           f"{name!r}) would scale the base weights by {total:g}. To add the adapters' deltas with "
                           "these weights use --method task_arithmetic (W + sum w_i s_i B_i A_i), or "
                           "--lora-mode exact-concat")


class MaterializeSource(MergeSource):
    """The LoRA sub-models, materialised chunk by chunk, as the models of any merge method."""

    reads_mapped_inputs = False  # model chunks are computed into buffers, not mapped
    budget_subject = "this LoRA merge"

    def __init__(self, config: MergeConfig, inputs: "Inputs", adapters: list[LoraAdapter]):
        super().__init__(config, inputs, plan_output(inputs.base, config.dtype, config.max_shard_size))
        self.adapters = adapters
        self.params = resolve_params(config, self.plan)
        self.targeted = {name for adapter in adapters for name in adapter.modules}

    def check(self) -> None:
        super().check()
        check_linear_keeps_the_base(self.config, self.params, self.adapters)

    def stage_label(self, backend_name: str) -> str:
        return f"merge LoRA sub-models ({self.config.method}, {backend_name})"

    def fingerprint_fields(self) -> dict:
        return {"lora_mode": self.config.lora_mode}

    def provenance_fields(self) -> dict:
        return {"lora_mode": self.config.lora_mode}

    def chunk_needs(self, backend, mapped: bool) -> ChunkNeeds:
        base = self.inputs.base
        input_sizes = (max(DTYPE_SIZES[e.dtype] for e in base.tensors.values()),) + (FACTOR_ITEMSIZE,) * len(self.adapters)
        out_size = max(DTYPE_SIZES[t.out_dtype] for s in self.plan.shards for t in s.tensors)
        # backends widen the base chunk to fp32 to match the fp32 sub-models
        extra = backend.workspace_bytes_per_element(len(input_sizes)) + FACTOR_ITEMSIZE
        needed = max([MIN_CHUNK_ELEMENTS] + [ROW_BLOCK * base.tensors[name].shape[1] for name in self.targeted])
        resident = max(factor_bytes(self.adapters, name) for name in self.targeted)
        return ChunkNeeds(input_sizes, out_size, extra, resident_bytes=resident, min_elements=needed)

    def budget_description(self, backend) -> str:
        return f"{len(self.adapters)} adapters, {backend.name} backend"

    def chunk_sizes(self, shards: list[PlannedShard], needs: ChunkNeeds, budget: int) -> dict[str, int]:
        sizes = {}
        for shard in shards:
            for tensor in shard.tensors:
                block = ROW_BLOCK * (tensor.numel // tensor.shape[0] if len(tensor.shape) >= 2 and tensor.shape[0] else 1)
                sizes[tensor.name] = budget // block * block if tensor.name in self.targeted else budget
        return sizes

    def work(self, shards: list[PlannedShard], backend, io, chunks: dict[str, int]) -> list[list[TensorWork]]:
        return [[TensorWork(tensor, self._filler(tensor, backend, io, chunks[tensor.name])) for tensor in shard.tensors]
                for shard in shards]

    def _filler(self, tensor, backend, io, chunk: int):
        config = self.config
        context = TensorContext(tensor.name, tensor.shape, config.seed)
        entry = self.inputs.base.tensors[tensor.name]
        modules: list[LoraModule | None] = [a.modules.get(tensor.name) for a in self.adapters]

        def run(fd: int) -> None:
            if not tensor.merged or all(m is None for m in modules):
                stream = TorchViewStream(context, backend, entry, [], [], io, chunk, tensor.out_dtype, fd, tensor.offset)
                if tensor.merged:
                    for part in stream.chunks(write=True):
                        part.out.copy_(part.base)  # the base's value, rounded only if --dtype differs
                else:
                    stream.copy_first_input()
                return
            # the factors are read when the tensor's turn comes: one tensor's factors in memory at a time
            deltas = [None if m is None else (m.scale, read_factor(m.b), read_factor(m.a)) for m in modules]
            for module, delta in zip(modules, deltas):
                if delta is not None:
                    io.nonfinite.check_factors(tensor.name, str(module.a.path), delta[1:])
            stream = LoraTensorStream(context, backend, entry, [entry] * len(self.adapters), [], io, chunk,
                                      tensor.out_dtype, fd, tensor.offset, deltas=deltas)
            config.method_impl.merge(self.params[tensor.name], stream)

        return run
