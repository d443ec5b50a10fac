"""Loading the base model sharded: every rank holds its shard plus one tensor, never the model.

    1. build the architecture on the meta device (parameters only: buffers such as the rotary
       frequencies are computed for real, they are no checkpoint's business);
    2. LoRA: wrap with peft on meta, then give the adapters real memory and peft's own init
       (identical on every rank: same seed, same order);
    3. parallelize(): activation checkpointing, torch.compile, FSDP2 `fully_shard` (meta stays meta);
    4. allocate each rank's shard on its device and fill it from the safetensors files with
       positioned reads of exactly the rows it owns (tensor_rows.RowReader).

One process is the same with one "shard" per tensor: the whole tensor, read once into place.
Bit for bit this equals `from_pretrained(dtype=float32)`: a bf16 or fp16 checkpoint is widened
exactly, an fp32 one copied. A GGUF base is de-quantised once, on rank 0, into a safetensors
directory in the run's checkpoint directory, and read sharded from there by every later start.

A checkpoint whose tensor names differ from the architecture's parameter names (transformers
renames some legacy layouts while loading) is loaded the old way, whole on every rank, with a
warning that says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.model import apply_lora, check_model_dir, decoder_layers, load_model
from dtm_fast.train.parallel import Runtime, barrier, parallelize
from dtm_fast.train.tensor_rows import RowReader, RowSource, local_rows

logger = logging.getLogger(__name__)
GGUF_CACHE = "base-from-gguf"
GGUF_SOURCE_RECORD = "dtm_gguf_source.json"


def stored_dtype_name(hf_config: Any) -> str:
    """The dtype config.json says the checkpoint is stored in (float32 when it says nothing usable)."""
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(stored).replace("torch.", "") if stored is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def gguf_as_safetensors(config: TrainConfig, runtime: Runtime) -> Path:
    """A GGUF base de-quantised to float32 safetensors, once: rank 0 converts into the checkpoint
    directory (whole, which transformers' GGUF reader needs) and every rank then loads it sharded.
    Reused while the GGUF file's size and modification time are those it was made from."""
    source = Path(config.model) / config.gguf_file
    target = config.checkpoints_path / GGUF_CACHE
    status = source.stat()
    identity = {"gguf": str(source.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    record = target / GGUF_SOURCE_RECORD
    current = record.is_file() and json.loads(record.read_text()) == identity
    if runtime.is_main and target.exists() and not record.is_file():
        # every conversion is renamed into place with its record, so this directory is not dtm's
        raise DtmError(f"{target} exists and was not written by dtm (it has no {GGUF_SOURCE_RECORD}); "
                       f"move it away, or choose another output for this run")
    if runtime.is_main and not current:
        _convert_gguf(source, config.gguf_file, target, identity)
    barrier(runtime)
    return target


def save_dequantized_gguf(model_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise `model_dir/gguf_file` to float32 and save it as a Hugging Face safetensors
    directory (the one home of this conversion; `dtm run`'s base conversion can call it too)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise DtmError(f"gguf_file: cannot load {Path(model_dir) / gguf_file}: {error}") from None
    # the weights are plain float32 now; the "quantizer" transformers attaches to GGUF models only
    # records where they came from, and would make save_pretrained refuse
    model.hf_quantizer = None
    for holder in (model, model.config):
        for attribute in ("quantization_config", "is_quantized"):
            if attribute in vars(holder):
                delattr(holder, attribute)
    model.save_pretrained(target)


def _convert_gguf(source: Path, gguf_file: str, target: Path, identity: dict[str, Any]) -> None:
    from dtm_fast.io.atomic import write_json

    logger.info("converting %s to float32 safetensors in %s (once)", source, target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    save_dequantized_gguf(source.parent, gguf_file, staging)
    write_json(staging / GGUF_SOURCE_RECORD, identity)
    if target.exists():  # an earlier conversion (it has our record) of a GGUF file changed since
        shutil.rmtree(target)
    staging.rename(target)


def _parameter_holders(model: Any) -> list[tuple[str, Any, str]]:
    """(checkpoint name, owning module, attribute) of every parameter, tied ones once, taken before
    peft and FSDP replace modules and parameters (the owning module objects survive both)."""
    holders = []
    seen = set()
    for module_name, module in model.named_modules():
        for attribute, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            holders.append((f"{module_name}.{attribute}" if module_name else attribute, module, attribute))
    return holders


def _names_match(holders: list[tuple[str, Any, str]], tensors: dict[str, Any]) -> str:
    """'' when every parameter is in the checkpoint with its shape; else the first mismatch."""
    for name, module, attribute in holders:
        entry = tensors.get(name)
        shape = tuple(getattr(module, attribute).shape)
        if entry is None:
            return f"{name!r} is not in the checkpoint"
        if tuple(entry.shape) != shape:
            return f"{name!r} has shape {list(entry.shape)} in the checkpoint, {list(shape)} in the model"
    return ""


def _materialize_lora(model: Any) -> None:
    """Real CPU memory and peft's own initialisation for the adapters of a model built on meta."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in list(module.lora_A.keys()) + list(getattr(module, "lora_embedding_A", {}).keys()):
            for attribute in module.adapter_layer_names:
                container = getattr(module, attribute, None)
                if container is None or adapter not in container:
                    continue
                if isinstance(container[adapter], torch.nn.Module):  # lora_A / lora_B: Linear layers
                    container[adapter].to_empty(device="cpu")
                else:  # embedding adapters are bare parameters
                    old = container[adapter]
                    container[adapter] = torch.nn.Parameter(torch.empty_like(old, device="cpu"), old.requires_grad)
            module.reset_lora_parameters(adapter, True)
        meta = [name for name, param in module.named_parameters() if param.is_meta and "base_layer" not in name]
        if meta:
            raise DtmError(f"LoRA parameters {meta[0]} could not be initialised on a model built without weights; "
                           "this peft version lays adapters out differently")


def materialize(model: Any, device: Any) -> None:
    """Give every meta parameter uninitialised memory on `device` (FSDP2 then re-pads its shards)
    and move every real tensor there."""
    import torch

    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t.to(device, copy=True))


def build_sharded(config: TrainConfig, attention: str, runtime: Runtime, param_dtype: Any) -> tuple[Any, str]:
    """The model ready to train (parallelized, weights loaded) and the export dtype."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtm_fast.io.checkpoint import open_checkpoint

    weights_dir = gguf_as_safetensors(config, runtime) if config.gguf_file else check_model_dir(config)
    try:
        hf_config = AutoConfig.from_pretrained(str(weights_dir))
    except (OSError, ValueError) as error:
        raise DtmError(f"model: cannot read {weights_dir / 'config.json'}: {error}") from None
    export_dtype = config.export_dtype if config.export_dtype != "auto" else \
        "float32" if config.gguf_file else stored_dtype_name(hf_config)
    checkpoint = open_checkpoint(weights_dir)  # headers only; errors name the file
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attention)
        except (ValueError, KeyError) as error:
            raise DtmError(f"model: {weights_dir} is not a causal language model transformers can build: "
                           f"{error}") from None
    model.config.use_cache = False  # a cache would disable the packed-sequence masks
    holders = _parameter_holders(model)
    mismatch = _names_match(holders, checkpoint.tensors)
    if mismatch:
        logger.warning("model %s: %s, so every rank loads the whole model (sharded loading needs the "
                       "checkpoint's names to be the architecture's)", weights_dir, mismatch)
        return _build_whole(config, attention, runtime, param_dtype), export_dtype
    if config.finetuning == "lora":
        model = apply_lora(model, config)
        _materialize_lora(model)
    model = parallelize(model, runtime, decoder_layers(model), param_dtype, config.activation_checkpointing,
                        config.compile)
    materialize(model, runtime.device)
    with RowReader() as reader, torch.no_grad():
        for name, module, attribute in holders:
            local, first = local_rows(getattr(module, attribute))
            reader.fill(local, first, [RowSource(checkpoint.tensors[name])], f"{weights_dir}: {name}")
        for name, buffer in model.named_buffers():
            base_name = name.removeprefix("base_model.model.")
            if base_name in checkpoint.tensors and buffer.shape == checkpoint.tensors[base_name].shape:
                reader.fill(buffer, 0, [RowSource(checkpoint.tensors[base_name])], f"{weights_dir}: {base_name}")
    return model, export_dtype


def _build_whole(config: TrainConfig, attention: str, runtime: Runtime, param_dtype: Any) -> Any:
    """The old way: the whole model in float32 on every rank's host, then sharded."""
    model = load_model(config, attention)
    if config.finetuning == "lora":
        model = apply_lora(model, config)
    model = parallelize(model, runtime, decoder_layers(model), param_dtype, config.activation_checkpointing,
                        config.compile)
    return model.to(runtime.device) if not runtime.distributed else model
