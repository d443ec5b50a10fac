"""The merge driver, the one loop every merge runs: plan -> buffers -> stream -> combine -> write ->
publish. What is merged comes from a source (merge/sources.py): full checkpoints, LoRA sub-models
materialised on the fly, or LoRA adapters combined into one adapter (merge/lora/).

Everything that can refuse a merge (paths, inputs, parameters, budget, disk space, a partial output
of another merge) is checked before the partial directory exists; once it exists, it is kept on
any failure (a full disk, a kill, a bad value under --strict) so that --resume continues it."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dtm_fast import ui
from dtm_fast.errors import DtmError
from dtm_fast.io import output as out_io
from dtm_fast.io.owned_dir import check_replaceable, check_separate
from dtm_fast.merge import provenance
from dtm_fast.merge.budget import ChunkNeeds, budget_chunk
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.inputs import Inputs, open_inputs
from dtm_fast.merge.nonfinite import NonFiniteCounts
from dtm_fast.merge.plan import PlannedShard
from dtm_fast.merge.sources import CheckpointSource, MergeSource

log = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def make_source(config: MergeConfig, inputs: Inputs) -> MergeSource:
    if inputs.adapters:
        from dtm_fast.merge.lora import lora_source

        return lora_source(config, inputs)
    if config.slices is not None:
        from dtm_fast.merge.slices import SlicedSource

        return SlicedSource(config, inputs)
    if inputs.model_adapters:
        from dtm_fast.merge.lora.on_models import AdaptedSource

        return AdaptedSource(config, inputs)
    return CheckpointSource(config, inputs)


def check_output(config: MergeConfig, output: Path) -> None:
    """The output is outside every input, and dtm may write (and, with --overwrite, replace) it."""
    protected = [("model", m.path) for m in config.models] + ([("base model", config.base)] if config.base else [])
    check_separate(output, protected)
    check_replaceable(output, out_io.MERGE_TOOL, config.overwrite, replace_own=False)


def plan_chunks(config: MergeConfig, source: MergeSource, backend) -> tuple[ChunkNeeds, int]:
    """The chunk costs and the budget's chunk; mapped reads when the backend takes them and the
    budget has room for the pages they map, else copies into buffers."""
    if not source.needs_backend:
        return source.chunk_needs(backend, False), 0
    mapped = backend.reads_mapped and source.reads_mapped_inputs
    needs = source.chunk_needs(backend, mapped)
    try:
        return needs, budget_chunk(config.max_memory, needs, source.budget_subject, source.budget_description(backend))
    except DtmError:
        if not mapped:
            raise
    needs = source.chunk_needs(backend, False)  # a budget too small for mapped reads still fits copies
    return needs, budget_chunk(config.max_memory, needs, source.budget_subject, source.budget_description(backend))


def run_merge(config: MergeConfig) -> Path:
    """Merge according to `config`; returns the published output directory (or the partial
    directory when other processes still own unfinished shards)."""
    from dtm_fast.merge.backends import select_backend

    output = Path(config.output)
    check_output(config, output)
    cache = output.with_name(output.name + ".dtm-cache")
    inputs = open_inputs(config, cache)
    source = make_source(config, inputs)
    source.check()
    backend = select_backend(config.backend) if source.needs_backend else None
    needs, budget = plan_chunks(config, source, backend)
    plan = source.plan
    identities = provenance.input_identities(inputs, config.verify_inputs)
    fingerprint = provenance.fingerprint(config, plan, identities, source.fingerprint_fields())
    partial = out_io.partial_dir(output)
    mine = [s for i, s in enumerate(plan.shards) if i % config.num_shards == config.shard_index]
    todo = [s for s in mine if not out_io.shard_is_complete(partial, s.filename, s.size, s.header)]
    out_io.check_disk_space(output, sum(s.size for s in todo),
                            out_io.reclaimable_bytes(partial, [s.filename for s in todo]) if partial.is_dir() else 0)
    partial = out_io.prepare_partial(output, fingerprint, config.resume, config.overwrite,
                                     shared=config.num_shards > 1, explain=provenance.explain_difference)
    if len(todo) < len(mine):
        ui.info(f"resuming: {len(mine) - len(todo)} of {len(mine)} shard(s) already complete in {partial}")
    nonfinite = NonFiniteCounts(config.strict)
    try:
        stream_shards(config, source, backend, needs, budget, todo, partial, nonfinite)
        return finalize(config, inputs, source, partial, output, backend, identities, nonfinite)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        done = sum(out_io.shard_is_complete(partial, s.filename, s.size, s.header) for s in plan.shards)
        raise DtmError(f"the disk holding {partial} is full ({error.strerror}): {done} of {len(plan.shards)} shard(s) "
                       f"are complete and kept there; free space, then rerun the same command with --resume to "
                       "continue") from None


def stream_shards(config: MergeConfig, source: MergeSource, backend, needs: ChunkNeeds, budget: int,
                  todo: list[PlannedShard], partial: Path, nonfinite: NonFiniteCounts) -> None:
    """Write every shard of `todo` through the source's tensor work, reading ahead and writing behind."""
    from dtm_fast.merge.stream import Buffers, ChunkIO, FileCache

    release_large_allocations_promptly()
    if config.method_impl.uses_torch:
        import torch  # noqa: F401 - part of the interpreter's memory, not of the merge's budget

    baseline = resident_bytes()
    chunks = source.chunk_sizes(todo, needs, budget)
    chunk = max(chunks.values(), default=0) if chunks else 0
    # mapped reads need output buffers only (the mapped pages take the inputs' share of the budget)
    buffers = Buffers([] if needs.mapped else needs.input_itemsizes, needs.out_itemsize, chunk,
                      pinned=backend is not None and backend.wants_pinned_buffers)
    if backend is not None:
        log.info("method %s, backend %s, chunks of up to %d elements (%s of buffers)", config.method, backend.name,
                 chunk, ui.format_bytes(Buffers.bytes_needed(needs.input_itemsizes, needs.out_itemsize, chunk)))
    files = FileCache()
    total = sum(t.nbytes for s in todo for t in s.tensors)
    label = source.stage_label(backend.name if backend is not None else "")
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dtm-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="dtm-write") as writer, \
                ui.stage(label, total, "bytes", config.max_memory) as progress:
            def written(nbytes: int) -> None:
                progress.advance(nbytes, memory=max(0, resident_bytes() - baseline))

            io = ChunkIO(buffers, files, reader, writer, written, mapped=needs.mapped, nonfinite=nonfinite)
            try:
                for shard, shard_work in zip(todo, source.work(todo, backend, io, chunks)):
                    write_shard(shard, shard_work, partial, io)
            finally:
                io.drain()
    finally:
        files.close()


def write_shard(shard: PlannedShard, work: list, partial: Path, io) -> None:
    fd = out_io.create_shard(partial, shard.filename, shard.header, shard.size)
    try:
        for item in work:
            item.run(fd)
        io.flush()
    except BaseException:
        io.drain()
        os.close(fd)
        raise
    out_io.finish_shard(partial, shard.filename, fd, shard.size)


def finalize(config: MergeConfig, inputs: Inputs, source: MergeSource, partial: Path, output: Path, backend,
             identities: dict, nonfinite: NonFiniteCounts) -> Path:
    """Write the index, side files and provenance, then publish; with several processes only the
    one that finds every shard complete (and wins the lock) does it."""
    plan = source.plan
    incomplete = [s.filename for s in plan.shards
                  if not out_io.shard_is_complete(partial, s.filename, s.size, s.header)]
    if incomplete:
        ui.info(f"{len(plan.shards) - len(incomplete)}/{len(plan.shards)} shards complete in {partial}; "
                "the process that finishes the last one publishes the output")
        return partial
    if not out_io.take_publishing_lock(partial):
        ui.info(f"another process is publishing {partial}")
        return partial
    summary = nonfinite.summary()
    if summary:
        ui.warn(summary)
    if len(plan.shards) > 1:
        total = sum(t.nbytes for s in plan.shards for t in s.tensors)
        out_io.write_json(partial / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": plan.weight_map()})
    copied = source.side_files(partial)
    record = provenance.record(config, inputs, identities, backend.name if backend is not None else None, copied,
                               nonfinite.records(), source.provenance_fields())
    out_io.write_json(partial / out_io.PROVENANCE_FILE, record)
    if config.write_model_card:
        from dtm_fast.merge.side_files import write_model_card

        write_model_card(partial, config, record)
    out_io.publish(partial, output, config.overwrite)
    remove_pickle_cache(output.with_name(output.name + ".dtm-cache"))
    ui.info(f"merged {len(config.models)} model(s) with {config.method} into {output}")
    return output


def remove_pickle_cache(cache: Path) -> None:
    """The safetensors copies dtm made of pickle inputs (io/checkpoint.py) and the vocabulary-aligned
    embeddings (merge/vocab_align.py), and nothing else there."""
    if not cache.is_dir():
        return
    for aligned in cache.glob("vocabulary-*.safetensors"):
        aligned.unlink()
    for converted in cache.glob("pickle-*/part-*.safetensors"):
        converted.unlink()
    for directory in sorted(cache.glob("pickle-*"), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    if not any(cache.iterdir()):
        cache.rmdir()
