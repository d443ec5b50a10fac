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
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from dtm_fast import ui
from dtm_fast.errors import DtmError
from dtm_fast.io import output as out_io
from dtm_fast.io.safetensors_format import DTYPE_SIZES, read_exact
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.engine import (
    FIXED_OVERHEAD_BYTES, MIN_CHUNK_ELEMENTS, check_all_params, finalize, fingerprint,
    release_large_allocations_promptly, resident_bytes,
)
from dtm_fast.merge.lora import LoraAdapter, LoraModule, read_factor
from dtm_fast.merge.methods.base import TensorContext
from dtm_fast.merge.plan import OutputPlan, layer_index, plan_output
from dtm_fast.merge.host_array import torch_dtype
from dtm_fast.merge.stream import Buffers, Chunk, ChunkIO, FileCache, TensorStream

if TYPE_CHECKING:
    from dtm_fast.merge.engine import Inputs

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


def chunk_plan(config: MergeConfig, inputs: "Inputs", plan: OutputPlan, adapters: Sequence[LoraAdapter],
               backend) -> tuple[int, list[int], int]:
    """Largest chunk whose buffers, workspace and resident factors fit the budget."""
    base = inputs.base
    input_sizes = [max(DTYPE_SIZES[e.dtype] for e in base.tensors.values())] + [FACTOR_ITEMSIZE] * len(adapters)
    out_size = max(DTYPE_SIZES[t.out_dtype] for s in plan.shards for t in s.tensors)
    per_element = 2 * (sum(input_sizes) + out_size) + backend.workspace_bytes_per_element(len(input_sizes))
    per_element += FACTOR_ITEMSIZE  # backends widen the base chunk to fp32 to match the fp32 sub-models
    targeted = {name for adapter in adapters for name in adapter.modules}
    resident_factors = max(factor_bytes(adapters, name) for name in targeted)
    available = config.max_memory - FIXED_OVERHEAD_BYTES - resident_factors
    chunk = available // per_element // MIN_CHUNK_ELEMENTS * MIN_CHUNK_ELEMENTS if available > 0 else 0
    needed = MIN_CHUNK_ELEMENTS
    for name in targeted:
        needed = max(needed, ROW_BLOCK * base.tensors[name].shape[1])
    if chunk < needed:
        minimum = FIXED_OVERHEAD_BYTES + resident_factors + needed * per_element
        raise DtmError(f"--max-memory {config.max_memory / 2**20:.0f} MiB is too small for this LoRA merge: it needs "
                       f"at least {minimum / 2**20:.0f} MiB ({len(adapters)} adapters, {backend.name} backend)")
    return chunk, input_sizes, out_size


def check_linear_keeps_the_base(config: MergeConfig, plan: OutputPlan, adapters: Sequence[LoraAdapter]) -> None:
    """Un-normalised linear weights would scale the base itself by sum(w) in adapted tensors while
    untouched tensors stay the base's: a model nobody wants. Say what does the intended thing."""
    if config.method != "linear":
        return
    targeted = {name for adapter in adapters for name in adapter.modules}
    for name in sorted(targeted):
        params = config.tensor_params(name, layer_index(name), plan.num_layers)
        total = sum(params.model("weight"))
        if not params["normalize"] and abs(total - 1) > 1e-6:
            raise DtmError(f"{config.source}: linear without normalisation and weights summing to {total:g} (tensor "
                           f"{name!r}) would scale the base weights by {total:g}. To add the adapters' deltas with "
                           "these weights use --method task_arithmetic (W + sum w_i s_i B_i A_i), or "
                           "--lora-mode exact-concat")


def run_materialize(config: MergeConfig, inputs: "Inputs", adapters: list[LoraAdapter]) -> Path:
    from dtm_fast.merge.backends import select_backend

    output = Path(config.output)
    plan = plan_output(inputs.base, config.dtype, config.max_shard_size)
    check_all_params(config, plan)
    check_linear_keeps_the_base(config, plan, adapters)
    backend = select_backend(config.backend)
    chunk, input_sizes, out_size = chunk_plan(config, inputs, plan, adapters, backend)  # a budget error leaves nothing
    partial = out_io.prepare_partial(output, fingerprint(config, inputs, plan), config.resume, config.overwrite,
                                     shared=config.num_shards > 1)
    mine = [s for i, s in enumerate(plan.shards) if i % config.num_shards == config.shard_index]
    todo = [s for s in mine if not out_io.shard_is_complete(partial, s.filename, s.size, s.header)]
    out_io.check_disk_space(output, sum(s.size for s in todo))
    if len(todo) < len(mine):
        ui.info(f"resuming: {len(mine) - len(todo)} of {len(mine)} shard(s) already complete in {partial}")
    release_large_allocations_promptly()
    baseline = resident_bytes()
    buffers = Buffers(input_sizes, out_size, chunk, pinned=getattr(backend, "wants_pinned_buffers", False))
    log.info("LoRA materialize: method %s, backend %s, %d-element chunks", config.method, backend.name, chunk)
    files = FileCache()
    total = sum(t.nbytes for s in todo for t in s.tensors)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dtm-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="dtm-write") as writer, \
                ui.stage(f"merge LoRA sub-models ({config.method}, {backend.name})", total, "bytes",
                         config.max_memory) as progress:
            def written(nbytes: int) -> None:
                progress.advance(nbytes, memory=max(0, resident_bytes() - baseline))

            io = ChunkIO(buffers, files, reader, writer, written)
            try:
                for shard in todo:
                    materialize_shard(config, inputs, plan, shard, partial, adapters, backend, io, chunk)
            finally:
                io.drain()
    finally:
        files.close()
    return finalize(config, inputs, plan, partial, output, backend.name)


def materialize_shard(config: MergeConfig, inputs: "Inputs", plan: OutputPlan, shard, partial: Path,
                      adapters: Sequence[LoraAdapter], backend, io: ChunkIO, chunk: int) -> None:
    fd = out_io.create_shard(partial, shard.filename, shard.header, shard.size)
    try:
        for tensor in shard.tensors:
            context = TensorContext(tensor.name, tensor.shape, config.seed)
            entry = inputs.base.tensors[tensor.name]
            modules: list[LoraModule | None] = [a.modules.get(tensor.name) for a in adapters]
            if not tensor.merged or all(m is None for m in modules):
                stream = TorchViewStream(context, backend, entry, [], [], io, chunk, tensor.out_dtype, fd,
                                         tensor.offset)
                if tensor.merged:
                    for part in stream.chunks(write=True):
                        part.out.copy_(part.base)  # the base's value, rounded only if --dtype differs
                else:
                    stream.copy_first_input()
                continue
            block = ROW_BLOCK * context.row_length
            deltas = [None if m is None else (m.scale, read_factor(m.b), read_factor(m.a)) for m in modules]
            params = config.tensor_params(tensor.name, tensor.layer_index, plan.num_layers)
            stream = LoraTensorStream(context, backend, entry, [entry] * len(adapters), [], io, chunk // block * block,
                                      tensor.out_dtype, fd, tensor.offset, deltas=deltas)
            config.method_impl.merge(params, stream)
        io.flush()
    except BaseException:
        io.drain()
        os.close(fd)
        raise
    out_io.finish_shard(partial, shard.filename, fd, shard.size)
