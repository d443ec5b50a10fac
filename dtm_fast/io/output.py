"""Writing a Hugging Face model directory safely.

Everything is written under `<output>.dtm-partial/` beside the output (same filesystem, so the final
rename is atomic). Each shard file is created at its full planned size with its header in place;
data is written at planned offsets. A shard is marked complete (`.done-<file>.json`) only after its
data is fsynced, so after a crash `--resume` trusts exactly the shards that were finished. A
fingerprint of the plan (`.plan.json`) refuses to resume a different merge into the same place.
Separate processes (`--shard-index/--num-shards`) write disjoint shards into the same directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dtm_fast.errors import DtmError

MERGE_TOOL = "dtm merge"
PROVENANCE_FILE = "dtm_merge.json"
PARTIAL_SUFFIX = ".dtm-partial"
PLAN_FILE = ".plan.json"
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def prepare_partial(output: Path, fingerprint: dict, resume: bool, overwrite: bool, shared: bool) -> Path:
    """Create (or, resuming, reopen) the partial directory for `output`.

    shared=True is for one of several processes writing disjoint shards: an existing partial
    directory with the same fingerprint is joined instead of refused."""
    from dtm_fast.io.owned_dir import check_replaceable

    check_replaceable(output, MERGE_TOOL, overwrite, replace_own=False)
    partial = partial_dir(output)
    plan_path = partial / PLAN_FILE
    if partial.exists():
        previous = json.loads(plan_path.read_text()) if plan_path.is_file() else None
        if previous is not None and previous != fingerprint:
            raise DtmError(f"{partial} holds an interrupted merge with different inputs or parameters; "
                           "delete it, or rerun that merge with --resume")
        if previous is None or not (resume or shared):
            raise DtmError(f"{partial} holds an interrupted merge of these inputs; pass --resume to continue it "
                           f"(finished shards are kept), or delete {partial} to start over")
        return partial
    partial.mkdir(parents=True)
    temporary = plan_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(temporary, plan_path)
    return partial


def done_marker(partial: Path, filename: str) -> Path:
    return partial / f".done-{filename}.json"


def shard_is_complete(partial: Path, filename: str, size: int, header: bytes) -> bool:
    """True when the shard was marked complete and its size and header are what the plan says."""
    marker = done_marker(partial, filename)
    path = partial / filename
    if not marker.is_file() or not path.is_file() or path.stat().st_size != size:
        return False
    with open(path, "rb") as handle:
        return handle.read(len(header)) == header


def create_shard(partial: Path, filename: str, header: bytes, size: int) -> int:
    """Create the shard at its final size with its header; returns a writable descriptor."""
    path = partial / filename
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    os.pwrite(fd, header, 0)
    return fd


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux sync_file_range, not waiting),
    so that the fsync that publishes a shard waits only for its last chunks instead of the whole
    file. A no-op where the call does not exist."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = function
        except (OSError, AttributeError):
            pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def finish_shard(partial: Path, filename: str, fd: int, size: int) -> None:
    os.fsync(fd)
    os.close(fd)
    marker = done_marker(partial, filename)
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps({"size": size}))
    os.replace(temporary, marker)


def check_disk_space(output: Path, needed: int) -> None:
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise DtmError(f"not enough disk space for {output}: the merge writes {needed / 1e9:.2f} GB but "
                       f"{parent} has {free / 1e9:.2f} GB free")


def write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def copy_side_files(source: Path, partial: Path, dtype_name: str | None) -> list[str]:
    """Copy config, generation config and tokenizer files from `source` (a model directory)."""
    copied = []
    if not source.is_dir():
        return copied
    for name in COPIED_FILES:
        path = source / name
        if not path.is_file():
            continue
        if name == "config.json" and dtype_name is not None:
            config = json.loads(path.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = dtype_name
            write_json(partial / name, config)
        else:
            shutil.copy2(path, partial / name)
        copied.append(name)
    return copied


def publish(partial: Path, output: Path, overwrite: bool) -> None:
    """Move the finished directory into place. An earlier output is replaced only with --overwrite,
    and then only the files dtm wrote into it are removed (io/owned_dir.py)."""
    from dtm_fast.io.owned_dir import check_replaceable, publish as publish_owned

    check_replaceable(output, MERGE_TOOL, overwrite, replace_own=False)
    for leftover in list(partial.glob(".done-*.json")) + [partial / PLAN_FILE, partial / ".publishing"]:
        leftover.unlink(missing_ok=True)
    publish_owned(partial, output, MERGE_TOOL, marker=PROVENANCE_FILE)
