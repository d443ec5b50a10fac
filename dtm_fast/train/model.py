"""Building what is trained: the tokenizer, the causal LM with its attention implementation, and
LoRA adapters when asked. The model code itself is never changed; parallelism is applied from the
outside (parallel.py)."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.train.config import TrainConfig

logger = logging.getLogger(__name__)


def select_attention(requested: str, device_type: str) -> str:
    """flash_attention_2 on CUDA with flash-attn installed, else sdpa. Asking for flash-attn where
    it cannot run is an error, never a quiet fallback."""
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if device_type == "cuda" and flash_installed else "sdpa"
    if requested == "flash_attention_2":
        if device_type != "cuda":
            raise DtmError("attention: flash_attention_2 needs a CUDA GPU and this run is on "
                           f"{device_type}; use attention: sdpa (or auto)")
        if not flash_installed:
            raise DtmError("attention: flash_attention_2 needs the flash-attn package "
                           "(pip install 'dtm_fast[flash]'); or use attention: sdpa (or auto)")
    return requested


def uses_varlen_batches(attention: str) -> bool:
    """flash-attention runs packed rows through its variable-length kernel, given the cumulative
    sequence lengths of a flattened batch (collate_flat) rather than boundaries it would infer
    from position_ids; sdpa and eager keep padded rows and derive block-diagonal masks from the
    position_ids restarts."""
    return attention == "flash_attention_2"


def check_model_dir(config: TrainConfig) -> Path:
    """The base model directory, refused with a one-line reason when it cannot be trained from:
    missing, unreadable, without config.json, or holding only pickle weights (never loaded here:
    unpickling can run code)."""
    path = Path(config.model)
    if not path.is_dir():
        raise DtmError(f"model: {path} is not a directory; give a local Hugging Face model directory "
                       "(config.json + safetensors) or the directory holding gguf_file")
    try:
        names = {child.name for child in path.iterdir()}
    except OSError as error:
        raise DtmError(f"model: cannot read {path} ({error.strerror}); check its permissions") from None
    if config.gguf_file:
        if not (path / config.gguf_file).is_file():
            raise DtmError(f"gguf_file: {path / config.gguf_file}: no such file")
        return path
    if "config.json" not in names:
        ggufs = sorted(name for name in names if name.endswith(".gguf"))
        hint = f"; it holds {ggufs[0]}: set gguf_file" if ggufs else ""
        raise DtmError(f"model: {path} has no config.json{hint}")
    if not any(name.endswith(".safetensors") for name in names) and any(name.endswith(".bin") for name in names):
        raise DtmError(
            f"model: {path} holds only pickle weights (*.bin); dtm train never unpickles (a pickle can run code). "
            "Convert it to safetensors once, e.g. python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\", and train from that directory")
    return path


def load_tokenizer(config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    path = check_model_dir(config)
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token_id is None:
        # padding never carries loss and comes after real tokens, so any id serves
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: TrainConfig, attention: str) -> Any:
    """The base model in float32 (the master weights; mixed precision casts for compute), on CPU.
    FSDP moves each rank's shard to its device."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_dir(config)
    kwargs: dict[str, Any] = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True,
                                                           attn_implementation=attention, **kwargs)
    except (OSError, ValueError) as error:
        raise DtmError(f"model: cannot load {path} as a causal language model: {error}") from None
    # transformers fills weights a checkpoint lacks with random values and only logs it: training
    # such a model would silently start from a different network
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise DtmError(f"model: {path} lacks {len(missing)} weight(s) its architecture needs (or has them in other "
                       f"shapes), e.g. {missing[0]!r}; the checkpoint is incomplete or of another architecture")
    model.config.use_cache = False  # a cache would disable the packed-sequence masks
    return model


def apply_lora(model: Any, config: TrainConfig) -> Any:
    """Wrap the model with peft LoRA adapters; only they train."""
    from peft import LoraConfig, get_peft_model

    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in config.lora_target_modules if target not in module_names]
    if missing:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                               if type(module).__name__ == "Linear"})
        raise DtmError(f"lora_target_modules: the model has no module named {', '.join(missing)}; "
                       f"its linear layers are {', '.join(linear_names)}")
    widths = [min(module.in_features, module.out_features) for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in config.lora_target_modules and hasattr(module, "in_features")]
    if widths and config.lora_r > min(widths):
        raise DtmError(f"lora_r {config.lora_r} is larger than the narrowest targeted layer ({min(widths)}); "
                       "a rank beyond a layer's width adds nothing: lower lora_r")
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft asks transformers >= 5 through a deprecated name; nothing the user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config)


def decoder_layers(model: Any) -> list[Any]:
    """The transformer blocks: modules of the classes the model itself declares unsplittable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    # by class name anywhere in the class's ancestry: fully_shard swaps a module's class for a
    # subclass (FSDPLlamaDecoderLayer) and compiled or wrapped layers keep theirs as a base
    layers = [module for module in model.modules()
              if any(cls.__name__ in block_names for cls in type(module).__mro__)]
    if not layers:
        raise DtmError(f"cannot find the decoder layers of {type(base).__name__} (its _no_split_modules "
                       "is empty); this architecture is not supported for sharded training")
    return layers


def parameter_count(model: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
