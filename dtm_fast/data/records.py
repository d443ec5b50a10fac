"""Instruction records: loading files and normalising the four common formats to chat messages.

Formats (detected from the first record's fields, or named with `format=`):
- alpaca:            {"instruction", "input"?, "output", "system"?}
- sharegpt:          {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- messages:          {"messages": [{"role": "user"|"assistant"|"system", "content"}]}   (Tulu, OpenAI)
- prompt_completion: {"prompt", "completion"}

Files: .jsonl, .json (a list of records), .parquet, .csv, or a directory saved by
`datasets.Dataset.save_to_disk`. Every record keeps its location ("data.jsonl:17") so errors can
name the line to fix.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from dtm_fast.errors import DtmError, shown
from dtm_fast.io.text_files import json_value, read_text, utf8_lines

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One raw record as read from disk and where it came from."""

    fields: dict[str, Any]
    location: str  # "path:line" for jsonl, "path[index]" otherwise


@dataclass(frozen=True)
class Conversation:
    """A record normalised to chat messages: [{"role": ..., "content": ...}, ...]."""

    messages: list[dict[str, str]]
    location: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def first_turn(self) -> "Conversation":
        """The system message (if any), the first user message and the first reply (what the DTM
        paper trained on)."""
        kept: list[dict[str, str]] = []
        for message in self.messages:
            kept.append(message)
            if message["role"] == "assistant":
                break
        return Conversation(kept, self.location, self.raw)


def read_records(path: str | Path) -> list[Record]:
    """Read every record of one file or saved dataset directory."""
    path = Path(path)
    if not path.exists():
        raise DtmError(f"{shown(path)}: no such file or directory")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_iter_jsonl(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DtmError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .parquet, .csv "
                   "or a directory saved with datasets' save_to_disk")


def first_record(path: str | Path) -> Record | None:
    """The first record of a data file, reading no more of a jsonl file than that (what
    `dtm run --dry-run` checks cheaply); None for an empty file."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return next(_iter_jsonl(path), None)
    records = read_records(path)
    return records[0] if records else None


def count_records(path: str | Path) -> int:
    """How many records a data file holds; a jsonl file's lines are counted without being parsed."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if path.is_file() and path.suffix.lower() == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.ParquetFile(path).metadata.num_rows
        except Exception as error:  # pyarrow raises its own types for a damaged file
            raise DtmError(f"{path}: not a readable parquet file ({error})") from None
    return len(read_records(path))


def _iter_jsonl(path: Path) -> Iterator[Record]:
    for line_number, line in utf8_lines(path, "data file"):
        if not line.strip():
            continue
        value = json_value(line, f"{path}:{line_number}")
        if not isinstance(value, dict):
            raise DtmError(f"{path}:{line_number}: expected a JSON object per line, got {type(value).__name__}")
        yield Record(value, f"{path}:{line_number}")


def _read_json(path: Path) -> list[Record]:
    text = read_text(path, "data file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DtmError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise DtmError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} style wrappers
    if not isinstance(value, list):
        raise DtmError(f"{path}: expected a JSON list of records")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DtmError(f"{path}[{index}]: expected a JSON object, got {type(item).__name__}")
    return [Record(item, f"{path}[{index}]") for index, item in enumerate(value)]


def _read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(read_text(path, "data file"), newline=""))
    records = []
    try:
        for row in reader:
            # line numbers count the header as line 1
            records.append(Record(dict(row), f"{path}:{reader.line_num}"))
    except csv.Error as error:
        raise DtmError(f"{path}:{reader.line_num}: not readable as CSV ({error})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow raises its own types (ArrowInvalid, ...) for a damaged file
        raise DtmError(f"{path}: not a readable parquet file ({error})") from None
    return [Record(row, f"{path}[{i}]") for i, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DtmError(f"{path}: a directory, but not one saved by datasets' save_to_disk "
                       "(no dataset_info.json / state.json)") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DtmError(f"{path}: a DatasetDict without a 'train' split (has {list(dataset)})")
        dataset = dataset["train"]
    return [Record(row, f"{path}[{i}]") for i, row in enumerate(dataset)]


def detect_format(record: Record) -> str:
    keys = set(record.fields)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise DtmError(
        f"{record.location}: cannot tell the record format from its fields {sorted(keys)}; expected "
        "'messages', 'conversations', 'instruction'+'output' or 'prompt'+'completion', "
        "or name the format explicitly (--format)")


def _text_field(record: Record, name: str, fmt: str, required: bool = True) -> str:
    value = record.fields.get(name)
    if value is None:
        if required:
            raise DtmError(f"{record.location}: record has no field {name!r} (the {fmt} format needs it)")
        return ""
    if not isinstance(value, str):
        raise DtmError(f"{record.location}: field {name!r} should be text, got {type(value).__name__}")
    return value


def _message_list(record: Record, name: str, role_key: str, content_key: str,
                  role_map: dict[str, str]) -> list[dict[str, str]]:
    raw_messages = record.fields.get(name)
    if not isinstance(raw_messages, list) or not raw_messages:
        raise DtmError(f"{record.location}: field {name!r} should be a non-empty list of messages")
    messages = []
    for index, message in enumerate(raw_messages):
        where = f"{record.location}: {name}[{index}]"
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise DtmError(f"{where}: each message needs {role_key!r} and {content_key!r}")
        role = role_map.get(str(message[role_key]).lower())
        if role is None:
            raise DtmError(f"{where}: unknown role {message[role_key]!r}; expected one of {sorted(role_map)}")
        if not isinstance(message[content_key], str):
            raise DtmError(f"{where}: {content_key!r} should be text")
        messages.append({"role": role, "content": message[content_key]})
    return messages


def to_conversation(record: Record, fmt: str) -> Conversation:
    """Normalise one record; errors name the record's location and the missing or bad field."""
    if fmt == "alpaca":
        instruction = _text_field(record, "instruction", fmt)
        extra_input = _text_field(record, "input", fmt, required=False)
        prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text_field(record, "output", fmt)}]
        system = _text_field(record, "system", fmt, required=False)
        if system:
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "sharegpt":
        messages = _message_list(record, "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt == "messages":
        messages = _message_list(record, "messages", "role", "content", {r: r for r in MESSAGE_ROLES})
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text_field(record, "prompt", fmt)},
                    {"role": "assistant", "content": _text_field(record, "completion", fmt)}]
    else:
        raise DtmError(f"unknown record format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DtmError(f"{record.location}: the conversation has no assistant reply to learn from")
    return Conversation(messages, record.location, record.fields)


def check_not_blank(conversation: Conversation) -> None:
    """The one rule for every command (dtm disperse, dtm train, dtm run): a user or assistant message
    that is empty or whitespace only is an error naming the record, never silently trained on."""
    for index, message in enumerate(conversation.messages):
        if message["role"] != "system" and not message["content"].strip():
            raise DtmError(f"{conversation.location}: message {index} ({message['role']}) is empty; "
                           "fix or remove this record")


def conversations_of(records: list[Record], fmt: str, first_turn_only: bool = False) -> list[Conversation]:
    """Normalise the records of one file as every command uses them: to chat messages, cut to the
    first turn when asked, and checked for empty messages (after the cut, so only what is used counts)."""
    conversations = []
    for record in records:
        conversation = to_conversation(record, fmt)
        if first_turn_only:
            conversation = conversation.first_turn()
        check_not_blank(conversation)
        conversations.append(conversation)
    return conversations


def load_conversations(paths: str | Path | Iterable[str | Path], fmt: str | None = None,
                       first_turn_only: bool = False) -> list[Conversation]:
    """Read and normalise every record of one or more files. `fmt=None` detects the format from
    each file's first record."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    conversations: list[Conversation] = []
    for path in paths:
        records = read_records(path)
        if not records:
            raise DtmError(f"{path}: contains no records")
        conversations += conversations_of(records, fmt or detect_format(records[0]), first_turn_only)
    return conversations
