"""What identifies an input file: its content hash (slow, exact) and its identity on disk (cheap:
device, inode, size, modification time in nanoseconds). A file rewritten in place keeps its inode but
changes its mtime; one replaced by a rename changes its inode; so a changed identity means a possibly
changed file, and an unchanged one means unchanged content unless someone reset the mtime by hand
(which only the content hash catches)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK_BYTES = 1 << 22


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_sha256(directory: Path) -> str:
    """A directory of files (a saved dataset): the hash of its files' relative names and hashes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    path = Path(path)
    return directory_sha256(path) if path.is_dir() else file_sha256(path)


def file_identity(path: Path) -> dict[str, int | str]:
    """Where and which file this is now, from one stat() call (symlinks followed)."""
    path = Path(path)
    status = os.stat(path)
    return {"path": str(path.resolve()), "device": status.st_dev, "inode": status.st_ino,
            "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def describe_identity_change(old: dict, new: dict) -> str:
    """Which part of a file's identity changed, in words."""
    changes = []
    if old.get("size") != new.get("size"):
        changes.append(f"size {old.get('size')} -> {new.get('size')} bytes")
    if old.get("mtime_ns") != new.get("mtime_ns"):
        changes.append("modification time changed")
    if (old.get("device"), old.get("inode")) != (new.get("device"), new.get("inode")):
        changes.append("it was replaced by another file")
    if old.get("sha256") and new.get("sha256") and old["sha256"] != new["sha256"]:
        changes.append("its content differs")
    return ", ".join(changes) or "unchanged"
