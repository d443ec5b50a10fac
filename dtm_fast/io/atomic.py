"""Writing a file so that a reader (or a crash) sees either the old content or the new, never a
part: the bytes go to a temporary name in the same directory, are fsynced, and are renamed over the
target; the directory is fsynced so the rename survives a power loss too. The one home of this
pattern: every JSON manifest, report and marker dtm writes goes through here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself has happened
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # our own temporary, never the target
        raise
    if durable:
        fsync_directory(path.parent)


def write_text(path: Path, text: str, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable)


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None: JSON has no such numbers, and a file
    holding them is refused by strict readers (and by `json.loads` in other languages)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps_json(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN/Infinity; paths and other objects as strings), newline-terminated."""
    return json.dumps(finite_json(value), indent=indent, default=str, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path: Path, value: Any, indent: int | None = 2, durable: bool = True) -> None:
    write_text(path, dumps_json(value, indent), durable)
