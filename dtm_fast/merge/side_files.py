"""The files beside a merged model's weights: config.json and generation_config.json (from the base,
or the first model), the tokenizer (from `tokenizer_source`, unless --no-copy-tokenizer), a chat
template override, the merge config in mergekit's schema (mergekit_config.yml) and, with
--write-model-card, a README.md that says what was merged from what."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import write_json, write_text

if TYPE_CHECKING:
    from dtm_fast.merge.config import MergeConfig

MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MERGEKIT_CONFIG = "mergekit_config.yml"
MODEL_CARD = "README.md"


def write_side_files(config: "MergeConfig", partial: Path, dtype_name: str | None,
                     config_updates: dict | None = None) -> list[str]:
    """Copy and write the side files into `partial` (config.json with the output dtype and
    `config_updates`); returns the names copied from inputs (or written from the built vocabulary)."""
    from dtm_fast.io.checkpoint import load_json_object

    model_source = Path(config.base if config.base is not None else config.models[0].path)
    vocabulary = _vocabulary(config) if config.tokenizer is not None else None
    copied = []
    for name in MODEL_FILES:
        path = model_source / name
        if not model_source.is_dir() or not path.is_file():
            continue
        if name == "config.json" and (dtype_name is not None or config_updates or vocabulary is not None):
            values = load_json_object(path)
            if dtype_name is not None:
                values["torch_dtype"] = dtype_name
                if "dtype" in values:
                    values["dtype"] = dtype_name
            values.update(config_updates or {})
            if vocabulary is not None:  # the rows the merged embeddings have
                values["vocab_size"] = vocabulary.size
            write_json(partial / name, values)  # dtm's own file now, describing what it holds
        else:
            shutil.copy2(path, partial / name)
        copied.append(name)
    if vocabulary is not None:  # the built vocabulary's tokenizer, as mergekit saves it
        vocabulary.tokenizer.save_pretrained(str(partial))
        copied += [name for name in TOKENIZER_FILES if (partial / name).is_file()]
        if config.chat_template is not None:
            set_chat_template(partial, resolve_chat_template(config))
    elif config.copy_tokenizer:
        tokenizer_source = Path(config.tokenizer_source) if config.tokenizer_source is not None else model_source
        for name in TOKENIZER_FILES:
            if tokenizer_source.is_dir() and (tokenizer_source / name).is_file():
                shutil.copy2(tokenizer_source / name, partial / name)
                copied.append(name)
        if config.chat_template is not None:
            set_chat_template(partial, resolve_chat_template(config))
    write_text(partial / MERGEKIT_CONFIG, config.mergekit_config or mergekit_document(config))
    return copied


def _vocabulary(config: "MergeConfig"):
    """The output vocabulary, built again from the tokenizers (deterministic, and cheap beside a merge)."""
    from dtm_fast.merge.vocab import build_vocabulary

    paths = ([config.base] if config.base is not None else []) + [m.path for m in config.models]
    return build_vocabulary(config.tokenizer, [Path(p) for p in paths], config.source)


def resolve_chat_template(config: "MergeConfig") -> str:
    """The template text: `auto` (the one most input models use), a named template, or Jinja."""
    from dtm_fast.data.chat import TEMPLATES

    choice = config.chat_template
    if choice == "auto":
        found = Counter(template for template in (_model_template(Path(m.path)) for m in config.models) if template)
        if not found:
            raise DtmError(f"{config.source}: chat_template auto: none of the models has a chat template")
        return found.most_common(1)[0][0]
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if "{%" in choice or "{{" in choice:
        return choice
    raise DtmError(f"{config.source}: chat_template {choice!r} is neither auto, a known template "
                   f"({', '.join(sorted(TEMPLATES))}) nor Jinja text")


def _model_template(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    try:
        value = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    template = value.get("chat_template") if isinstance(value, dict) else None
    return template if isinstance(template, str) else None


def set_chat_template(partial: Path, template: str) -> None:
    """The output tokenizer's chat template, where transformers reads it."""
    config_path = partial / "tokenizer_config.json"
    if config_path.is_file():
        values = json.loads(config_path.read_text(encoding="utf-8"))
        values["chat_template"] = template
        write_json(config_path, values)
    write_text(partial / "chat_template.jinja", template)


def mergekit_document(config: "MergeConfig") -> str:
    """This merge in mergekit's YAML schema (for a merge given on the command line)."""
    import yaml

    document: dict[str, Any] = {"merge_method": config.method}
    if config.base is not None:
        document["base_model"] = str(config.base)
    document["models"] = [{"model": str(m.path), **({"parameters": m.parameters} if m.parameters else {})}
                          for m in config.models]
    if config.parameters:
        document["parameters"] = dict(config.parameters)
    if config.dtype is not None:
        from dtm_fast.io.dtypes import torch_name

        document["dtype"] = torch_name(config.dtype)
    return "# written by dtm merge; mergekit-yaml reads it too\n" + yaml.safe_dump(document, sort_keys=False)


def write_model_card(partial: Path, config: "MergeConfig", record: dict) -> None:
    """README.md: what was merged from what, the config, and how to load the result."""
    models = "\n".join(f"- `{m['path']}`" for m in record["models"])
    base = f"\nBase model: `{record['base']['path']}`\n" if record.get("base") else ""
    yaml_text = (partial / MERGEKIT_CONFIG).read_text(encoding="utf-8")
    card = (f"---\nlibrary_name: transformers\ntags:\n- merge\n- dtm_fast\n---\n"
            f"# {Path(config.output).name}\n\n"
            f"A merge made with dtm_fast {record['version']} using the **{record['method']}** method "
            f"({record['backend'] or 'no'} backend).\n{base}\nModels merged:\n\n{models}\n\n"
            f"## Configuration\n\n```yaml\n{yaml_text.rstrip()}\n```\n\n"
            f"Every input file's identity and the parameters are recorded in `dtm_merge.json`.\n")
    write_text(partial / MODEL_CARD, card)
