"""`dtm_train.json`: what a sub-model was trained from (with content hashes), how, and by which
version, so `dtm run` can tell whether an existing output is current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm_fast import __version__
from dtm_fast.io.hashing import file_sha256, path_sha256

MANIFEST_NAME = "dtm_train.json"
# files of a model directory that decide its weights and tokenisation
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.gguf", "tokenizer*", "special_tokens_map.json",
                       "*.model", "vocab.*", "merges.txt", "chat_template.*", "model.safetensors.index.json")


def model_files(model_dir: Path, gguf_file: str | None) -> list[Path]:
    if gguf_file:
        return [model_dir / gguf_file]
    files = {path for pattern in MODEL_FILE_PATTERNS for path in model_dir.glob(pattern) if path.is_file()}
    return sorted(files)


def describe_inputs(model_dir: Path, gguf_file: str | None, data: list[str],
                    data_sha256: list[str] | None = None) -> dict[str, Any]:
    """The inputs with their SHA-256; `data_sha256` when the run already hashed its data."""
    hashes = data_sha256 or [path_sha256(Path(item)) for item in data]
    return {
        "model": {"path": str(model_dir.resolve()),
                  "files": {path.name: file_sha256(path) for path in model_files(model_dir, gguf_file)}},
        "data": [{"path": str(Path(item).resolve()), "sha256": digest} for item, digest in zip(data, hashes)],
    }


def build_manifest(config: dict[str, Any], inputs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {"tool": "dtm_fast train", "version": __version__, "config": config, "inputs": inputs, "result": result}
