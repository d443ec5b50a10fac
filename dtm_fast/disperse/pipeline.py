"""`disperse(config)`: read the records, assign every record to one of K portions with the chosen
method, and write portion-{i}.jsonl + manifest.json atomically.

The output is a pure function of the input bytes and the parameters: records keep their input order
inside a portion, JSON is written with fixed separators and no timestamps, so a rerun reproduces
every file byte for byte (and a rerun on a current output does no work at all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast import __version__
from dtm_fast.data.records import Conversation, detect_format, read_records, to_conversation
from dtm_fast.disperse.config import DisperseConfig
from dtm_fast.errors import DtmError

logger = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
# the top-level fields each format keeps its conversation in
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
MESSAGE_LIST_FIELD = {"sharegpt": "conversations", "messages": "messages"}


@dataclass(frozen=True)
class DisperseResult:
    output_dir: Path
    portion_files: tuple[Path, ...]
    manifest: dict[str, Any]
    reused: bool  # True when the output was already current and nothing was written


def portion_name(index: int) -> str:
    return f"portion-{index}.jsonl"


def hash_path(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_not_blank(conversation: Conversation) -> None:
    for index, message in enumerate(conversation.messages):
        if message["role"] != "system" and not message["content"].strip():
            raise DtmError(f"{conversation.location}: message {index} ({message['role']}) is empty; "
                           "fix or remove this record")


@dataclass(frozen=True)
class _LoadedInputs:
    conversations: list[Conversation]
    input_index: list[int]  # which input each conversation came from
    formats: list[str]  # the format of each input
    record_counts: list[int]


def load_inputs(config: DisperseConfig) -> _LoadedInputs:
    conversations, input_index, formats, counts = [], [], [], []
    for number, path in enumerate(config.inputs):
        records = read_records(path)
        if not records:
            raise DtmError(f"{path}: contains no records")
        file_format = config.format or detect_format(records[0])
        for record in records:
            conversation = to_conversation(record, file_format)
            if config.first_turn_only:
                conversation = conversation.first_turn()
            _check_not_blank(conversation)
            conversations.append(conversation)
            input_index.append(number)
        formats.append(file_format)
        counts.append(len(records))
    if config.k > len(conversations):
        raise DtmError(f"disperse: K = {config.k} portions but only {len(conversations)} records in "
                       f"{', '.join(config.inputs)}; lower K")
    if config.output_format == "original" and len(set(formats)) > 1:
        mixed = ", ".join(f"{path} ({fmt})" for path, fmt in zip(config.inputs, formats))
        raise DtmError(f"disperse: the inputs mix record formats ({mixed}); a portion must hold one format, "
                       "so pass --output-format messages to write every record as chat messages")
    return _LoadedInputs(conversations, input_index, formats, counts)


def output_record(conversation: Conversation, fmt: str, config: DisperseConfig) -> dict[str, Any]:
    """The record as written to a portion: the input record itself, its message list cut to the
    first turn when asked, or the normalised messages for output_format="messages"."""
    if config.output_format == "messages":
        extra = {key: value for key, value in conversation.raw.items() if key not in FORMAT_FIELDS[fmt]}
        return {"messages": conversation.messages, **extra}
    list_field = MESSAGE_LIST_FIELD.get(fmt)
    if config.first_turn_only and list_field is not None:
        # records.py maps raw messages one to one, so the kept prefix has the same length
        return {**conversation.raw, list_field: conversation.raw[list_field][:len(conversation.messages)]}
    return conversation.raw


def _json_line(record: dict[str, Any], location: str) -> str:
    try:
        return json.dumps(record, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as error:
        raise DtmError(f"{location}: the record cannot be written as JSON ({error}); "
                       "convert that column to text or numbers") from None


def _composition(members: list[int], loaded: _LoadedInputs, config: DisperseConfig,
                 groups: list[str] | None) -> dict[str, Any]:
    by_input = Counter(config.inputs[loaded.input_index[i]] for i in members)
    user_chars = sum(len(m["content"]) for i in members for m in loaded.conversations[i].messages if m["role"] == "user")
    reply_chars = sum(len(m["content"]) for i in members
                      for m in loaded.conversations[i].messages if m["role"] == "assistant")
    composition: dict[str, Any] = {
        "by_input": {path: by_input[path] for path in config.inputs if by_input[path]},
        "mean_user_chars": round(user_chars / len(members), 1),
        "mean_assistant_chars": round(reply_chars / len(members), 1),
    }
    if groups is not None:
        by_group = Counter(groups[i] for i in members)
        composition["by_group"] = dict(sorted(by_group.items(), key=lambda item: (-item[1], item[0])))
    return composition


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def is_current(config: DisperseConfig) -> bool:
    """True when output_dir holds a complete dispersal of these inputs with these parameters."""
    manifest = read_manifest(config.output_dir)
    if manifest is None or manifest.get("parameters") != config.parameters():
        return False
    if [item.get("sha256") for item in manifest.get("inputs", [])] != [hash_path(p) for p in config.inputs]:
        return False
    if config.method == "kmeans":
        from dtm_fast.disperse.embed import encoder_fingerprint

        if manifest.get("encoder", {}).get("fingerprint") != encoder_fingerprint(config.encoder):
            return False
    for portion in manifest.get("portions", []):
        path = Path(config.output_dir) / portion["file"]
        if not path.is_file() or hash_path(path) != portion["sha256"]:
            return False
    return len(manifest.get("portions", [])) == config.k


def _check_output_location(config: DisperseConfig) -> None:
    output = Path(config.output_dir).resolve()
    for path in config.inputs:
        source = Path(path).resolve()
        if output == source or (source.is_dir() and source in output.parents):
            raise DtmError(f"{config.output_dir}: the output would be written inside the input {path}; "
                           "choose another --output")
    if output.exists() and not output.is_dir():
        raise DtmError(f"{config.output_dir}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if read_manifest(output) is None:
            raise DtmError(f"{config.output_dir}: already holds files that dtm disperse did not write; "
                           "choose an empty or new --output directory")
        if not config.overwrite:
            raise DtmError(f"{config.output_dir}: holds a dispersal of other inputs or parameters; pass "
                           "--overwrite to replace it, or choose another --output")


def _write_atomically(output: Path, files: dict[str, bytes]) -> None:
    """Write every file into a temporary sibling directory, then swap it in with renames, so a
    reader sees either the old complete dispersal or the new one, never a mix."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}"
    retired = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        for name, content in files.items():
            with open(temporary / name, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        if output.exists():
            output.rename(retired)
        temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if retired.exists() and not output.exists():
            retired.rename(output)  # put the previous dispersal back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def disperse(config: DisperseConfig) -> DisperseResult:
    """Split config.inputs into config.k portions under config.output_dir; returns the files and the
    manifest. An output that is already current is left untouched (reused=True)."""
    from dtm_fast.disperse.methods import METHODS

    output = Path(config.output_dir)
    if is_current(config):
        logger.info("%s is current; nothing to do", output)
        manifest = read_manifest(output)
        return DisperseResult(output, tuple(output / p["file"] for p in manifest["portions"]), manifest, True)
    _check_output_location(config)
    loaded = load_inputs(config)
    assignment = METHODS[config.method](loaded.conversations, config)
    members: list[list[int]] = [[] for _ in range(config.k)]
    for record, portion in enumerate(assignment.portion):
        members[portion].append(record)
    empty = [i for i, m in enumerate(members) if not m]
    if empty:
        raise DtmError(f"disperse: method {config.method!r} left portion(s) {empty} empty; lower K")

    files: dict[str, bytes] = {}
    portions = []
    for index, portion_members in enumerate(members):
        content = "".join(
            _json_line(output_record(loaded.conversations[i], loaded.formats[loaded.input_index[i]], config),
                       loaded.conversations[i].location)
            for i in portion_members).encode("utf-8")
        files[portion_name(index)] = content
        portions.append({"file": portion_name(index), "records": len(portion_members),
                         "sha256": hashlib.sha256(content).hexdigest(),
                         **_composition(portion_members, loaded, config, assignment.group)})
    manifest: dict[str, Any] = {
        "stage": "disperse",
        "tool": "dtm_fast",
        "tool_version": __version__,
        "method": config.method,
        "seed": config.seed,
        "k": config.k,
        "records": len(loaded.conversations),
        "counts": [portion["records"] for portion in portions],
        "parameters": config.parameters(),
        "inputs": [{"path": path, "sha256": hash_path(path), "format": fmt, "records": count}
                   for path, fmt, count in zip(config.inputs, loaded.formats, loaded.record_counts)],
        "portions": portions,
    }
    if config.method == "kmeans":
        from dtm_fast.disperse.embed import encoder_fingerprint

        manifest["encoder"] = {"path": config.encoder, "fingerprint": encoder_fingerprint(config.encoder)}
    files[MANIFEST_NAME] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _write_atomically(output, files)
    logger.info("wrote %d portions (%s records) to %s", config.k,
                " / ".join(str(p["records"]) for p in portions), output)
    return DisperseResult(output, tuple(output / portion_name(i) for i in range(config.k)), manifest, False)
