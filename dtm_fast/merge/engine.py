"""The merge driver: plan -> allocate buffers from the budget -> stream every tensor of every shard
through its method -> write the Hugging Face directory -> publish atomically."""

from __future__ import annotations

import ctypes
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dtm_fast import __version__, ui
from dtm_fast.errors import DtmError
from dtm_fast.io import output as out_io
from dtm_fast.io.checkpoint import Checkpoint, open_checkpoint, open_fisher
from dtm_fast.io.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.plan import OutputPlan, PlannedShard, check_agreement, check_output_path, plan_output

log = logging.getLogger(__name__)
FIXED_OVERHEAD_BYTES = 16 * 1024**2  # histograms, thread stacks, Python objects
MIN_CHUNK_ELEMENTS = 4096
# A tensor merged in one pass streams through slots of about this many bytes (all inputs and the
# output of one chunk): small enough that a chunk the reader has just brought in is still in the CPU
# cache when the kernel reads it, large enough that per-chunk overhead stays negligible. Measured on
# the 1.32 GB default bench set: with copied reads 1M-element chunks merged 30% faster than 25M ones;
# with mapped reads 10 MB and 40 MB slots were within the machine's noise of each other.
STREAMING_SLOT_BYTES = 10 * 2**20
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Inputs:
    base: Checkpoint | None
    models: tuple[Checkpoint, ...]
    fishers: tuple[Checkpoint, ...]

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + list(self.models) + list(self.fishers)


def resident_bytes() -> int:
    """Current resident set size of this process (from /proc, cheap enough to call per chunk)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_large_allocations_promptly() -> None:
    """Fix glibc's mmap threshold at 1 MiB: large temporaries (the reference backend's) are then
    returned to the OS when freed instead of growing the heap past the memory budget."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def open_inputs(config: MergeConfig, cache: Path) -> Inputs:
    base = open_checkpoint(config.base, config.allow_pickle, cache) if config.base is not None else None
    models = tuple(open_checkpoint(m.path, config.allow_pickle, cache) for m in config.models)
    if base is not None and base.is_adapter:
        raise DtmError(f"{config.base}: the base must be a full model, not a LoRA adapter")
    if any(m.is_adapter for m in models):
        return Inputs(base, models, ())  # adapters hold factors, not weights: merge/lora.py checks them
    reference = base if base is not None else models[0]
    check_agreement(reference, [m for m in models if m is not reference])
    fishers: tuple[Checkpoint, ...] = ()
    if config.method_impl.needs_fisher:
        fishers = tuple(open_fisher(m.path) for m in config.models)
        float_names = {n for n, e in reference.tensors.items() if e.dtype in FLOAT_DTYPES}
        for fisher in fishers:
            for name in sorted(float_names):
                entry = fisher.tensors.get(name)
                if entry is None or entry.shape != reference.tensors[name].shape or entry.dtype not in FLOAT_DTYPES:
                    raise DtmError(f"{fisher.label}: needs a float tensor {name!r} of shape "
                                   f"{list(reference.tensors[name].shape)} (the Fisher estimate of that weight)")
    return Inputs(base, models, fishers)


def fingerprint(config: MergeConfig, inputs: Inputs, plan: OutputPlan) -> dict:
    """What identifies this merge: same fingerprint, same output bytes."""
    return {
        "method": config.method,
        "parameters": config.parameters,
        "models": [{"path": str(m.path), "parameters": m.parameters} for m in config.models],
        "inputs": {c.label: c.header_sha256 for c in inputs.all()},
        "dtype": config.dtype,
        "seed": config.seed,
        "shards": [[s.filename, s.size] for s in plan.shards],
        "version": __version__,
        **lora_record(config, inputs),
    }


def lora_record(config: MergeConfig, inputs: Inputs) -> dict:
    """The LoRA mode, for fingerprints and provenance of merges whose models are peft adapters."""
    return {"lora_mode": config.lora_mode} if any(m.is_adapter for m in inputs.models) else {}


def chunk_elements_for(config: MergeConfig, inputs: Inputs, plan: OutputPlan, backend,
                       mapped: bool = False) -> tuple[int, list[int], int]:
    """Largest chunk whose buffers and backend workspace fit the budget. With `mapped` reads the
    budget also holds the pages the kernel maps beyond each chunk (whole page-cache folios)."""
    # every slot is sized for the widest dtype of any input, so any input can use any slot
    itemsize = max(DTYPE_SIZES[e.dtype] for c in inputs.all() for e in c.tensors.values())
    reads_base = inputs.base is not None and config.method_impl.needs_base
    input_sizes = [itemsize] * (int(reads_base) + len(inputs.models) + len(inputs.fishers))
    out_size = max(DTYPE_SIZES[t.out_dtype] for s in plan.shards for t in s.tensors)
    per_element = 2 * (sum(input_sizes) + out_size) + backend.workspace_bytes_per_element(len(input_sizes))
    per_element += math.ceil(config.method_impl.statistics_bytes_per_element(len(inputs.models)))
    overhead = FIXED_OVERHEAD_BYTES
    if mapped:
        from dtm_fast.merge.stream import FAULT_AROUND_BYTES

        overhead += 2 * len(input_sizes) * 2 * FAULT_AROUND_BYTES  # two slots, both ends of every input
    available = config.max_memory - overhead
    chunk = available // per_element // MIN_CHUNK_ELEMENTS * MIN_CHUNK_ELEMENTS if available > 0 else 0
    method = config.method_impl
    longest_row = 0
    for shard in plan.shards:
        for tensor in shard.tensors:
            params = config.tensor_params(tensor.name, tensor.layer_index, plan.num_layers)
            if tensor.merged and method.needs_whole_rows(params) and len(tensor.shape) >= 2:
                longest_row = max(longest_row, tensor.numel // tensor.shape[0] if tensor.shape[0] else 0)
    needed = max(MIN_CHUNK_ELEMENTS, longest_row)
    if chunk < needed:
        minimum = overhead + needed * per_element
        raise DtmError(f"--max-memory {config.max_memory / 2**20:.0f} MiB is too small for this merge: it needs at "
                       f"least {minimum / 2**20:.0f} MiB ({len(input_sizes)} inputs, {backend.name} backend)")
    return chunk, input_sizes, out_size


def tensor_chunk_elements(config: MergeConfig, plan: OutputPlan, shards: list[PlannedShard], budget_chunk: int,
                          slot_bytes: int) -> dict[str, int]:
    """Chunk length of every tensor: a tensor with statistics passes takes the largest chunk the
    budget allows, so that it is read once for all its passes when it fits; a one-pass tensor streams
    in cache-sized chunks. Row-wise methods get whole rows."""
    method = config.method_impl
    streaming = max(MIN_CHUNK_ELEMENTS, STREAMING_SLOT_BYTES // slot_bytes // MIN_CHUNK_ELEMENTS * MIN_CHUNK_ELEMENTS)
    result = {}
    for shard in shards:
        for tensor in shard.tensors:
            params = config.tensor_params(tensor.name, tensor.layer_index, plan.num_layers)
            chunk = budget_chunk
            if not (tensor.merged and method.has_statistics_pass(params)):
                chunk = min(budget_chunk, streaming)
            row_length = tensor.numel // tensor.shape[0] if len(tensor.shape) >= 2 and tensor.shape[0] else 1
            if tensor.merged and method.needs_whole_rows(params) and row_length > 1:
                chunk = max(chunk, row_length) // row_length * row_length  # budget_chunk holds a row
            result[tensor.name] = chunk
    return result


def check_all_params(config: MergeConfig, plan: OutputPlan) -> None:
    """Every tensor's resolved parameters are valid before any output exists."""
    method = config.method_impl
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.merged:
                params = config.tensor_params(tensor.name, tensor.layer_index, plan.num_layers)
                method.check_params(params, f"{config.source}: tensor {tensor.name!r}")


def run_merge(config: MergeConfig) -> Path:
    """Merge according to `config`; returns the published output directory (or the partial
    directory when other processes still own unfinished shards)."""
    from dtm_fast.merge.backends import select_backend

    output = Path(config.output)
    input_paths = [m.path for m in config.models] + ([config.base] if config.base else [])
    check_output_path(output, input_paths)
    cache = output.with_name(output.name + ".dtm-cache")
    inputs = open_inputs(config, cache)
    if any(m.is_adapter for m in inputs.models):
        from dtm_fast.merge.lora import run_lora_merge

        return run_lora_merge(config, inputs)
    plan = plan_output(inputs.reference, config.dtype, config.max_shard_size)
    check_all_params(config, plan)
    # every check that can refuse the merge runs before the partial directory exists
    backend = select_backend(config.backend)
    mapped = getattr(backend, "reads_mapped", False)
    try:
        chunk, input_sizes, out_size = chunk_elements_for(config, inputs, plan, backend, mapped)
    except DtmError:
        if not mapped:
            raise
        mapped = False  # a budget too small for mapped reads still fits copies into buffers
        chunk, input_sizes, out_size = chunk_elements_for(config, inputs, plan, backend)
    mine = [s for i, s in enumerate(plan.shards) if i % config.num_shards == config.shard_index]
    todo = [s for s in mine if not out_io.shard_is_complete(out_io.partial_dir(output), s.filename, s.size, s.header)]
    out_io.check_disk_space(output, sum(s.size for s in todo))
    partial = out_io.prepare_partial(output, fingerprint(config, inputs, plan), config.resume, config.overwrite,
                                     shared=config.num_shards > 1)
    if len(todo) < len(mine):
        ui.info(f"resuming: {len(mine) - len(todo)} of {len(mine)} shard(s) already complete in {partial}")
    release_large_allocations_promptly()
    from dtm_fast.merge.stream import Buffers, ChunkIO, FileCache

    baseline = resident_bytes()
    chunks = tensor_chunk_elements(config, plan, todo, chunk, sum(input_sizes) + out_size)
    chunk = max(chunks.values(), default=MIN_CHUNK_ELEMENTS)
    # mapped reads need output buffers only (the mapped pages take the inputs' share of the budget)
    slot_sizes = [] if mapped else input_sizes
    buffers = Buffers(slot_sizes, out_size, chunk, pinned=getattr(backend, "wants_pinned_buffers", False))
    log.info("method %s, backend %s, chunks of up to %d elements (%s of buffers)", config.method, backend.name,
             chunk, ui.format_bytes(Buffers.bytes_needed(input_sizes, out_size, chunk)))
    files = FileCache()
    total = sum(sum(t.nbytes for t in s.tensors) for s in todo)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dtm-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="dtm-write") as writer, \
                ui.stage(f"merge ({config.method}, {backend.name})", total, "bytes", config.max_memory) as progress:
            def written(nbytes: int) -> None:
                progress.advance(nbytes, memory=max(0, resident_bytes() - baseline))

            io = ChunkIO(buffers, files, reader, writer, written, mapped=mapped)
            try:
                streams = plan_streams(config, inputs, plan, todo, backend, io, chunks)
                for shard, shard_streams in zip(todo, streams):
                    merge_shard(config, plan, shard, shard_streams, partial, io)
            finally:
                io.drain()
    finally:
        files.close()
    return finalize(config, inputs, plan, partial, output, backend.name)


def plan_streams(config: MergeConfig, inputs: Inputs, plan: OutputPlan, shards: list[PlannedShard], backend,
                 io, chunks: dict[str, int]) -> list[list]:
    """One TensorStream per tensor of each shard, in merge order, each knowing the one after it so
    its first chunk is read while the current tensor computes."""
    from dtm_fast.merge.methods.base import TensorContext
    from dtm_fast.merge.stream import TensorStream

    method = config.method_impl
    result, previous = [], None
    for shard in shards:
        shard_streams = []
        for tensor in shard.tensors:
            context = TensorContext(tensor.name, tensor.shape, config.seed)
            base = inputs.base.tensors[tensor.name] if inputs.base is not None else None
            models = [m.tensors[tensor.name] for m in inputs.models]
            params = config.tensor_params(tensor.name, tensor.layer_index, plan.num_layers)
            if tensor.merged:
                fishers = [f.tensors[tensor.name] for f in inputs.fishers]
                stream = TensorStream(context, backend, base if method.needs_base else None, models, fishers, io,
                                      chunks[tensor.name], tensor.out_dtype, None, tensor.offset)
            else:  # copied unchanged from the base (or the first model)
                source = base if base is not None else models[0]
                stream = TensorStream(context, backend, None, [source], [], io, chunks[tensor.name],
                                      tensor.out_dtype, None, tensor.offset)
            if previous is not None:
                previous.following = stream
            shard_streams.append((tensor, params, stream))
            previous = stream
        result.append(shard_streams)
    return result


def merge_shard(config, plan: OutputPlan, shard: PlannedShard, streams: list, partial: Path, io) -> None:
    method = config.method_impl
    fd = out_io.create_shard(partial, shard.filename, shard.header, shard.size)
    try:
        for tensor, params, stream in streams:
            stream.out_fd = fd
            if tensor.merged:
                method.merge(params, stream)
            else:
                stream.copy_first_input()
        io.flush()
    except BaseException:
        io.drain()
        os.close(fd)
        raise
    out_io.finish_shard(partial, shard.filename, fd, shard.size)


def finalize(config: MergeConfig, inputs: Inputs, plan: OutputPlan, partial: Path, output: Path,
             backend_name: str) -> Path:
    """Write the index, side files and provenance, then publish; with several processes only the
    one that finds every shard complete (and wins the lock) does it."""
    incomplete = [s.filename for s in plan.shards
                  if not out_io.shard_is_complete(partial, s.filename, s.size, s.header)]
    if incomplete:
        ui.info(f"{len(plan.shards) - len(incomplete)}/{len(plan.shards)} shards complete in {partial}; "
                "the process that finishes the last one publishes the output")
        return partial
    try:
        lock = os.open(partial / ".publishing", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(lock)
    except FileExistsError:
        return partial  # another process is publishing
    if len(plan.shards) > 1:
        total = sum(t.nbytes for s in plan.shards for t in s.tensors)
        out_io.write_json(partial / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": plan.weight_map()})
    side_source = config.base if config.base is not None else config.models[0].path
    copied = out_io.copy_side_files(Path(side_source), partial, TORCH_DTYPE_NAMES.get(config.dtype or ""))
    out_io.write_json(partial / "dtm_merge.json", provenance(config, inputs, backend_name, copied))
    (partial / ".publishing").unlink()
    out_io.publish(partial, output, config.overwrite)
    cache = output.with_name(output.name + ".dtm-cache")
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    ui.info(f"merged {len(config.models)} model(s) with {config.method} into {output}")
    return output


def provenance(config: MergeConfig, inputs: Inputs, backend_name: str, copied: list[str]) -> dict:
    return {
        "tool": "dtm_fast",
        "version": __version__,
        "method": config.method,
        "parameters": config.parameters,
        "base": {"path": str(config.base), "header_sha256": inputs.base.header_sha256} if inputs.base else None,
        "models": [{"path": str(m.path), "parameters": m.parameters, "header_sha256": c.header_sha256}
                   for m, c in zip(config.models, inputs.models)],
        "dtype": config.dtype,
        "seed": config.seed,
        "backend": backend_name,
        "copied_files": copied,
        **lora_record(config, inputs),
    }
