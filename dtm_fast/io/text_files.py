"""Reading a user's text files (YAML configs, JSON files) with errors that name the file, the line
and what is wrong: a missing file, a directory, bytes that are not UTF-8, a YAML syntax error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from dtm_fast.errors import DtmError


def read_text(path: Path, what: str = "file") -> str:
    """The whole file as UTF-8 text, or a DtmError naming the file (and the line of a bad byte)."""
    path = Path(path)
    if path.is_dir():
        raise DtmError(f"{path}: is a directory; give the {what} itself")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DtmError(f"{path}: no such {what}") from None
    except OSError as error:
        raise DtmError(f"{path}: cannot read this {what} ({error.strerror or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DtmError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                       f"save the {what} as UTF-8") from None


def load_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML document (safe loader) with syntax errors reported as file:line."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DtmError(f"{path}{line}: not valid YAML ({problem})") from None
    except (ValueError, OverflowError, RecursionError) as error:  # e.g. a date like 2024-13-01, deep nesting
        raise DtmError(f"{path}: not valid YAML ({type(error).__name__}: {str(error)[:200]})") from None


def utf8_lines(path: Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, read one at a time (a large jsonl file stays out of
    memory); errors as read_text's."""
    path = Path(path)
    if path.is_dir():
        raise DtmError(f"{path}: is a directory; give the {what} itself")
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DtmError(f"{path}: no such {what}") from None
    except OSError as error:
        raise DtmError(f"{path}: cannot read this {what} ({error.strerror or error})") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DtmError(f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                               f"{error.start + 1}); save the {what} as UTF-8") from None


def json_value(text: str, where: str) -> Any:
    """One JSON value (a jsonl line), errors naming `where` ("file:line")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DtmError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise DtmError(f"{where}: JSON nested too deeply to read") from None
