"""`dtm_train.json`: what a sub-model was trained from (with content hashes), how, and by which
version, so `dtm run` can tell whether an existing output is current."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dtm_fast import __version__

MANIFEST_NAME = "dtm_train.json"
# files of a model directory that decide its weights and tokenisation
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.gguf", "tokenizer*", "special_tokens_map.json",
                       "*.model", "vocab.*", "merges.txt", "chat_template.*", "model.safetensors.index.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(model_dir: Path, gguf_file: str | None) -> list[Path]:
    if gguf_file:
        return [model_dir / gguf_file]
    files = {path for pattern in MODEL_FILE_PATTERNS for path in model_dir.glob(pattern) if path.is_file()}
    return sorted(files)


def describe_inputs(model_dir: Path, gguf_file: str | None, data: list[str]) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir.resolve()),
                  "files": {path.name: file_sha256(path) for path in model_files(model_dir, gguf_file)}},
        "data": [{"path": str(Path(item).resolve()),
                  "sha256": file_sha256(Path(item)) if Path(item).is_file() else _dir_sha256(Path(item))}
                 for item in data],
    }


def _dir_sha256(directory: Path) -> str:
    """A saved dataset directory: the hash of its files' names and hashes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory)}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def build_manifest(config: dict[str, Any], inputs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {"tool": "dtm_fast train", "version": __version__, "config": config, "inputs": inputs, "result": result}
