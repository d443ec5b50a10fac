"""Reading text files a user gave (data, configs, task files) so that bytes that are not UTF-8 give one
line naming the file and the line, never a UnicodeDecodeError traceback. The one home of this rule:
every reader of a user's text file goes through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from dtm_fast.errors import DtmError


def _not_utf8(path: Path, line_number: int, error: UnicodeDecodeError, data: bytes) -> DtmError:
    byte = data[error.start:error.start + 1].hex()
    return DtmError(f"{path}:{line_number}: not UTF-8 text (byte 0x{byte}); save the file as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)")


def _readable_file(path: Path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DtmError(f"{path}: is a directory, not a {what}; give the file's path")
    if not path.exists():
        raise DtmError(f"{path}: no such {what}")
    return path


def read_utf8(path: Path, what: str = "file") -> str:
    """The whole file as text; a byte that is not UTF-8 is reported with its line number."""
    path = _readable_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data.count(b"\n", 0, error.start) + 1, error, data) from None


def utf8_lines(path: Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, read one at a time (large jsonl files stay out of memory)."""
    path = _readable_file(path, what)
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, line_number, error, raw) from None


def json_value(text: str, where: str):
    """One JSON value (a jsonl line, a small file), errors naming `where` ("file:line")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DtmError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise DtmError(f"{where}: JSON nested too deeply to read") from None
