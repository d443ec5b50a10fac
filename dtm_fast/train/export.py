"""Export of the trained sub-model in the layout `dtm merge` and transformers read.

Full fine-tuning: `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, config.json,
generation_config.json and the tokenizer files. LoRA: a peft adapter directory
(adapter_config.json + adapter_model.safetensors). Either may carry `fisher.safetensors`.

Nothing is gathered whole on one rank: tensors are gathered one at a time (every rank takes part
in each gather) and rank 0 streams each into its planned place in a shard whose header was written
first, so rank 0 holds one tensor at a time. Everything is written into a temporary directory
beside the output and renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dtm_fast.io.atomic import write_json
from dtm_fast.io.dtypes import DTYPE_SIZES, NAME_TO_TAG
from dtm_fast.io.safetensors_format import encode_header, layout_shards
from dtm_fast.io.owned_dir import publish
from dtm_fast.train.parallel import Runtime, barrier

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExportTensor:
    name: str
    shape: tuple[int, ...]
    tensor: Any  # a torch.Tensor or a DTensor shard; gathered when written


def _full(tensor: Any):
    """The whole tensor: a collective gather for an FSDP-sharded DTensor (all ranks call it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def write_safetensors(path: Path, entries: list[ExportTensor], dtype: str, runtime: Runtime,
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file tensor by tensor: the header is laid out from shapes first
    (io.safetensors_format.encode_header), then each tensor is gathered, cast and appended. Rank 0
    writes; all ranks gather."""
    import torch

    torch_dtype = getattr(torch, dtype)
    handle = None
    if runtime.is_main:
        header, _ = encode_header([(e.name, NAME_TO_TAG[dtype], e.shape) for e in entries],
                                  {"format": "pt", **(metadata or {})})
        handle = open(path, "wb")
        handle.write(header)
    try:
        for entry in entries:
            full = _full(entry.tensor)
            if handle is not None:
                data = full.detach().to("cpu", torch_dtype).contiguous()
                handle.write(data.view(torch.uint8).numpy().tobytes())
            del full
    finally:
        if handle is not None:
            handle.close()


def model_entries(model: Any) -> list[ExportTensor]:
    """Parameters and persistent buffers under the names transformers saves: a tied weight
    (lm_head sharing the embedding) appears once, under its first name."""
    entries = [ExportTensor(name, tuple(param.shape), param) for name, param in model.named_parameters()]
    non_persistent = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    entries += [ExportTensor(name, tuple(buffer.shape), buffer) for name, buffer in model.named_buffers()
                if name not in non_persistent]
    return entries


def trainable_entries(model: Any) -> list[ExportTensor]:
    return [ExportTensor(name, tuple(param.shape), param)
            for name, param in model.named_parameters() if param.requires_grad]


class StagingDir:
    """The output directory under construction: `.<name>.dtm-staging` beside it, published over it
    at the end by `io.owned_dir.publish` (which replaces only files dtm wrote there before)."""

    def __init__(self, output: Path, runtime: Runtime, tool: str, marker: str):
        self.output = output
        self.runtime = runtime
        self.tool = tool
        self.marker = marker
        self.path = output.parent / f".{output.name}.dtm-staging"

    def __enter__(self) -> Path:
        if self.runtime.is_main:
            shutil.rmtree(self.path, ignore_errors=True)  # an earlier export's unfinished staging: ours
            self.path.mkdir(parents=True)
        barrier(self.runtime)
        return self.path

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            return  # the partial directory stays hidden; the next export replaces it
        barrier(self.runtime)
        if self.runtime.is_main:
            publish(self.path, self.output, self.tool, marker=self.marker)


def write_hf_weights(directory: Path, model: Any, dtype: str, max_shard_bytes: int, runtime: Runtime) -> None:
    entries = {entry.name: entry for entry in model_entries(model)}
    tag = NAME_TO_TAG[dtype]
    layouts = layout_shards([(e.name, tag, e.shape) for e in entries.values()], max_shard_bytes,
                            number_a_single_shard=True)
    weight_map = {}
    total = 0
    for layout in layouts:
        write_safetensors(directory / layout.filename, [entries[name] for name, _, _ in layout.entries], dtype, runtime)
        for name, _, shape in layout.entries:
            weight_map[name] = layout.filename
            total += math.prod(shape) * DTYPE_SIZES[tag]
    if runtime.is_main:
        write_json(directory / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_hf_metadata(directory: Path, model: Any, tokenizer: Any, dtype: str, base_dir: Path) -> None:
    """config.json (with use_cache restored for inference), generation_config.json, tokenizer."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    config.use_cache = True
    config.dtype = getattr(torch, dtype)
    config.save_pretrained(directory)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", directory / "generation_config.json")
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_adapter(directory: Path, model: Any, runtime: Runtime, base_dir: Path) -> None:
    """A peft adapter directory from the trained LoRA weights (small: gathered, then saved)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    gathered = {}
    for entry in trainable_entries(model):
        full = _full(entry.tensor)
        if runtime.is_main:
            gathered[entry.name] = full.detach().to("cpu", torch.float32).contiguous()
    if not runtime.is_main:
        return
    adapter_state = get_peft_model_state_dict(model, state_dict=gathered)
    save_file({name: tensor.contiguous() for name, tensor in adapter_state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = copy_peft_config(model, base_dir)
    peft_config.save_pretrained(str(directory))


def copy_peft_config(model: Any, base_dir: Path) -> Any:
    import copy

    peft_config = copy.deepcopy(model.peft_config["default"])
    peft_config.base_model_name_or_path = str(base_dir.resolve())
    peft_config.inference_mode = True
    return peft_config


def copy_files(directory: Path, files: Iterable[Path]) -> None:
    for file in files:
        if file.is_file():
            shutil.copyfile(file, directory / file.name)
