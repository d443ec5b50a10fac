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
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast import __version__
from dtm_fast.data.records import Conversation, conversations_of, detect_format, read_records
from dtm_fast.disperse.config import DisperseConfig
from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import dumps_json, write_bytes
from dtm_fast.io.hashing import path_sha256
from dtm_fast.io.owned_dir import OWNERSHIP_FILE, check_replaceable, check_separate, publish, written_files

logger = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
TOOL = "dtm disperse"
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
        converted = conversations_of(records, file_format, config.first_turn_only)
        conversations += converted
        input_index += [number] * len(converted)
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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _input_hashes(config: DisperseConfig) -> list[str]:
    return [path_sha256(Path(p)) for p in config.inputs]


def is_current(config: DisperseConfig) -> bool:
    """True when output_dir holds a complete dispersal of these inputs with these parameters.
    Inputs are compared by content (and order), never by how their paths were spelled, so naming a
    file by a relative or an absolute path is the same dispersal."""
    manifest = read_manifest(config.output_dir)
    if manifest is None or manifest.get("parameters") != config.parameters():
        return False
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or [item.get("sha256") for item in inputs if isinstance(item, dict)] \
            != _input_hashes(config):
        return False
    if config.method == "kmeans":
        from dtm_fast.disperse.embed import encoder_fingerprint

        if (manifest.get("encoder") or {}).get("fingerprint") != encoder_fingerprint(config.encoder):
            return False
    portions = manifest.get("portions")
    if not isinstance(portions, list) or len(portions) != config.k:
        return False
    for portion in portions:
        path = Path(config.output_dir) / str(portion.get("file"))
        if not path.is_file() or path_sha256(path) != portion.get("sha256"):
            return False
    return True


def _adopt_earlier_dispersal(output: Path) -> None:
    """An output written before dtm recorded its files (no .dtm-written.json) but holding a dtm
    dispersal manifest: record the files that manifest names as dtm's, so replacing it removes
    exactly those and nothing else."""
    if not output.is_dir() or written_files(output) is not None:
        return
    manifest = read_manifest(output)
    if manifest is None or manifest.get("stage") != "disperse" or manifest.get("tool") != "dtm_fast":
        return
    names = [MANIFEST_NAME] + [str(p.get("file")) for p in manifest.get("portions", []) if isinstance(p, dict)]
    owned = [name for name in names if (output / name).is_file()]
    write_bytes(output / OWNERSHIP_FILE, dumps_json({"tool": TOOL, "files": owned}).encode())


def _check_output_location(config: DisperseConfig) -> None:
    output = Path(config.output_dir)
    check_separate(output, [("input", Path(p)) for p in config.inputs])
    _adopt_earlier_dispersal(output)
    # a rerun with other inputs or parameters replaces an earlier dispersal only with --overwrite
    check_replaceable(output, TOOL, overwrite=config.overwrite, replace_own=False)


def _publish(output: Path, files: dict[str, bytes]) -> None:
    """Write every file into a staging directory beside the output, then publish it: a reader sees
    the old complete dispersal or the new one, and only files dtm wrote are ever removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        for name, content in files.items():
            write_bytes(staging / name, content)
        publish(staging, output, TOOL, marker=MANIFEST_NAME)
    finally:
        if staging.exists():  # a failure before publish: the staging directory holds only our files
            for name in [*files, OWNERSHIP_FILE]:
                (staging / name).unlink(missing_ok=True)
            if not any(staging.iterdir()):
                staging.rmdir()


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
        "inputs": [{"path": path, "resolved_path": str(Path(path).resolve()), "sha256": digest, "format": fmt,
                    "records": count}
                   for path, digest, fmt, count in zip(config.inputs, _input_hashes(config), loaded.formats,
                                                       loaded.record_counts)],
        "portions": portions,
    }
    if config.method == "kmeans":
        from dtm_fast.disperse.embed import encoder_fingerprint

        manifest["encoder"] = {"path": config.encoder, "fingerprint": encoder_fingerprint(config.encoder)}
    files[MANIFEST_NAME] = dumps_json(manifest).encode("utf-8")
    _publish(output, files)
    logger.info("wrote %d portions (%s records) to %s", config.k,
                " / ".join(str(p["records"]) for p in portions), output)
    return DisperseResult(output, tuple(output / portion_name(i) for i in range(config.k)), manifest, False)
