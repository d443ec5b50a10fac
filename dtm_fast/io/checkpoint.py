"""Finding the tensors of a checkpoint directory from its safetensors headers alone.

Accepted inputs: a Hugging Face model directory (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), a peft adapter directory (`adapter_model.safetensors` +
`adapter_config.json`), or a single `.safetensors` file. Pickle checkpoints (`*.bin`) are refused
unless the caller allows them; then they are loaded with `weights_only=True` and converted once to
safetensors so the streaming merger can treat every input the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from dtm_fast.errors import DtmError, shown
from dtm_fast.io.safetensors_format import TensorEntry, read_header

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
FISHER_FILE = "fisher.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the directory (or file) the user named
    tensors: dict[str, TensorEntry]
    files: tuple[Path, ...]
    header_sha256: str  # hash of every header in file order: identifies the inputs cheaply
    config: dict = field(default_factory=dict)  # config.json or adapter_config.json, if present
    is_adapter: bool = False

    @property
    def label(self) -> str:
        return str(self.path)

    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())


def load_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise DtmError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise DtmError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                       "JSON files must be UTF-8") from None
    except json.JSONDecodeError as error:
        raise DtmError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise DtmError(f"{path}: expected a JSON object")
    return value


def _files_from_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    index = load_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DtmError(f"{index_path}: has no 'weight_map' of tensor name -> shard file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise DtmError(f"{index_path}: weight_map[{name!r}] must be the name of a shard file in "
                           f"{index_path.parent}, got {file!r}")
    files = sorted(set(weight_map.values()))
    paths = []
    for name in files:
        shard = index_path.parent / name
        if not shard.is_file():
            raise DtmError(f"{index_path}: lists shard {name!r}, which is missing from {index_path.parent}")
        paths.append(shard)
    return paths, weight_map


def open_checkpoint(path: str | Path, allow_pickle: bool = False, pickle_cache: Path | None = None) -> Checkpoint:
    """Read every header of a checkpoint and check the files agree with each other."""
    path = Path(path)
    if not path.exists():
        raise DtmError(f"{shown(path)}: no such file or directory")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise DtmError(f"{path}: cannot read this directory (permission denied)")
    config: dict = {}
    is_adapter = False
    weight_map: dict[str, str] | None = None
    if path.is_file():
        if path.suffix == ".bin":
            return _open_pickle(path, [path], allow_pickle, pickle_cache)
        files = [path]
    elif (path / SAFETENSORS_INDEX).is_file():
        files, weight_map = _files_from_index(path / SAFETENSORS_INDEX)
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / ADAPTER_FILE).is_file():
        files = [path / ADAPTER_FILE]
        is_adapter = True
    elif (path / PICKLE_INDEX).is_file() or (path / "pytorch_model.bin").is_file():
        if (path / PICKLE_INDEX).is_file():
            pickle_files, _ = _files_from_index(path / PICKLE_INDEX)
        else:
            pickle_files = [path / "pytorch_model.bin"]
        return _open_pickle(path, pickle_files, allow_pickle, pickle_cache)
    else:
        shards = sorted(p for p in path.glob("*.safetensors") if p.name != FISHER_FILE)
        if not shards:
            raise DtmError(f"{path}: no model weights found (expected model.safetensors, {SAFETENSORS_INDEX}, "
                           f"{ADAPTER_FILE} or *.safetensors)")
        files = shards
    if path.is_dir():
        if (path / "config.json").is_file():
            config = load_json_object(path / "config.json")
        if (path / ADAPTER_CONFIG).is_file():
            config = load_json_object(path / ADAPTER_CONFIG)
            is_adapter = True
    return _collect(path, files, weight_map, config, is_adapter)


def _collect(path: Path, files: list[Path], weight_map: dict[str, str] | None, config: dict,
             is_adapter: bool) -> Checkpoint:
    tensors: dict[str, TensorEntry] = {}
    digest = hashlib.sha256()
    for file in files:
        header = read_header(file)
        digest.update(file.name.encode() + b"\0" + header.header_bytes)
        for name, entry in header.tensors.items():
            if name in tensors:
                raise DtmError(f"{path}: tensor {name!r} appears in both {tensors[name].path.name} and {file.name}")
            if weight_map is not None and weight_map.get(name) not in (None, file.name):
                raise DtmError(f"{path}: the index puts {name!r} in {weight_map[name]} but it is in {file.name}")
            tensors[name] = entry
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise DtmError(f"{path}: the index lists {len(missing)} tensor(s) that no shard holds, "
                           f"e.g. {missing[0]!r}; a shard is incomplete or from another checkpoint")
    return Checkpoint(path, tensors, tuple(files), digest.hexdigest(), config, is_adapter)


def _open_pickle(path: Path, files: list[Path], allow_pickle: bool, cache: Path | None) -> Checkpoint:
    if not allow_pickle:
        raise DtmError(f"{path}: is a pickle checkpoint (.bin). Pickle files can run code when loaded; "
                       "convert it to safetensors, or pass --allow-pickle to load it with "
                       "torch.load(weights_only=True)")
    if cache is None:
        raise DtmError(f"{path}: a pickle checkpoint needs a cache directory to convert it to safetensors")
    import torch
    from safetensors.torch import save_file

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + str(file.stat().st_size).encode() + str(file.stat().st_mtime_ns).encode())
    target_dir = cache / f"pickle-{digest.hexdigest()[:16]}"
    converted = []
    for index, file in enumerate(files):
        target = target_dir / f"part-{index:05d}.safetensors"
        if not target.is_file():
            target_dir.mkdir(parents=True, exist_ok=True)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a bad pickle
                raise DtmError(f"{file}: cannot load with weights_only=True ({error})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise DtmError(f"{file}: expected a state dict of tensors")
            partial = target.with_suffix(".partial")
            save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
            partial.rename(target)
            log.info("converted %s to safetensors in %s", file, target)
        converted.append(target)
    config = load_json_object(path / "config.json") if path.is_dir() and (path / "config.json").is_file() else {}
    checkpoint = _collect(path, converted, None, config, False)
    return checkpoint


def open_fisher(model_dir: Path) -> Checkpoint:
    """The diagonal Fisher estimate that `dtm train --fisher` writes beside a sub-model."""
    fisher = Path(model_dir) / FISHER_FILE
    if not fisher.is_file():
        raise DtmError(f"{model_dir}: has no {FISHER_FILE}; the fisher method needs one per model "
                       "(write it with `dtm train ... --fisher-samples N`)")
    return _collect(fisher, [fisher], None, {}, False)
