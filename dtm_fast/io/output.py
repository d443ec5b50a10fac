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
from typing import Callable

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import write_json

MERGE_TOOL = "dtm merge"
PROVENANCE_FILE = "dtm_merge.json"
PARTIAL_SUFFIX = ".dtm-partial"
PLAN_FILE = ".plan.json"
PUBLISHING_LOCK = ".publishing"
SCRATCH_FILES = (PLAN_FILE, ".done-*.json", PUBLISHING_LOCK)  # resume markers, not part of the output
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def prepare_partial(output: Path, fingerprint: dict, resume: bool, overwrite: bool, shared: bool,
                    explain: Callable[[dict, dict, Path], str] | None = None) -> Path:
    """Create (or, resuming, reopen) the partial directory for `output`.

    shared=True is for one of several processes writing disjoint shards: an existing partial
    directory with the same fingerprint is joined instead of refused. `explain(previous, current,
    partial)` says why a partial directory of another merge cannot be resumed."""
    from dtm_fast.io.atomic import dumps_json, write_text
    from dtm_fast.io.owned_dir import check_replaceable

    check_replaceable(output, MERGE_TOOL, overwrite, replace_own=False)
    partial = partial_dir(output)
    plan_path = partial / PLAN_FILE
    current = json.loads(dumps_json(fingerprint))  # compared as it is stored (tuples become lists)
    if partial.exists():
        if not partial.is_dir():
            raise DtmError(f"{partial} exists and is not a directory; dtm keeps an interrupted merge there. Move it "
                           "away, or choose another output")
        try:
            previous = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = None
        if previous is not None and previous != current:
            raise DtmError(explain(previous, current, partial) if explain is not None else
                           f"{partial} holds an interrupted merge with different inputs or parameters; "
                           f"remove {partial} to merge from scratch")
        if previous is None:
            raise DtmError(f"{partial} exists but holds no record of the merge that made it (dtm did not write it, or "
                           f"was stopped while creating it); move it away or remove it, then rerun")
        if not (resume or shared):
            raise DtmError(f"{partial} holds an interrupted merge of these inputs; pass --resume to continue it "
                           f"(finished shards are kept), or remove {partial} to start over")
        return partial
    partial.mkdir(parents=True)
    write_text(plan_path, dumps_json(current, indent=1))
    return partial


def reclaimable_bytes(partial: Path, filenames: list[str]) -> int:
    """Disk space held by unfinished shard files a resumed merge rewrites (they are recreated)."""
    total = 0
    for name in filenames:
        try:
            total += (partial / name).stat().st_blocks * 512
        except OSError:
            pass
    return total


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
    write_json(done_marker(partial, filename), {"size": size})


def check_disk_space(output: Path, needed: int, reclaimable: int = 0) -> None:
    """Refuse a merge whose remaining shards cannot fit; `reclaimable` is what unfinished shard files
    of a resumed merge already hold (rewritten in place)."""
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free + reclaimable
    if needed > free:
        raise DtmError(f"not enough disk space for {output}: the merge still writes {needed / 1e9:.2f} GB but "
                       f"{parent} has {free / 1e9:.2f} GB free (counting what its unfinished shards hold); free "
                       "some space or choose another output")


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
            from dtm_fast.io.checkpoint import load_json_object

            config = load_json_object(path)
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = dtype_name
            write_json(partial / name, config)  # dtm's own file now, with the dtype it holds
        else:
            shutil.copy2(path, partial / name)
        copied.append(name)
    return copied


def publish(partial: Path, output: Path, overwrite: bool) -> None:
    """Move the finished directory into place. An earlier output is replaced only with --overwrite,
    and then only the files dtm wrote into it are removed (io/owned_dir.py)."""
    from dtm_fast.io.owned_dir import check_replaceable, publish as publish_owned

    check_replaceable(output, MERGE_TOOL, overwrite, replace_own=False)
    publish_owned(partial, output, MERGE_TOOL, marker=PROVENANCE_FILE, scratch=SCRATCH_FILES)


def take_publishing_lock(partial: Path) -> bool:
    """Only one of several processes sharing the shards publishes: the one that creates the lock.
    A lock left by a process of this machine that no longer runs (killed while publishing) is stale
    and taken over; one from another machine cannot be judged and is respected."""
    import socket

    lock = partial / PUBLISHING_LOCK
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                host, pid = "", "0"
            if host != socket.gethostname() or _alive(int(pid)):
                return False
            lock.unlink(missing_ok=True)  # the stale lock of a killed process on this machine
            continue
        os.write(fd, owner.encode())
        os.close(fd)
        return True
    return False


def release_publishing_lock(partial: Path) -> None:
    (partial / PUBLISHING_LOCK).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
