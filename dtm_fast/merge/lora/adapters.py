"""Merging LoRA sub-models (peft adapter directories) onto their base model.

Each adapter i holds, per targeted linear layer, factors A_i (r_i x in) and B_i (out x r_i) with
scale s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rslora); its sub-model is W_i = W + s_i B_i A_i.
This module reads and checks the adapters against the base; merge/lora/__init__.py picks the mode's
source for the merge driver.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import ADAPTER_CONFIG, Checkpoint
from dtm_fast.io.safetensors_format import FLOAT_DTYPES, TensorEntry
from dtm_fast.merge.config import MergeConfig

if TYPE_CHECKING:
    import torch

    from dtm_fast.merge.inputs import Inputs

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")
ADAPTER_ONLY_MODES = ("exact-concat", "factor-average")


@dataclass(frozen=True)
class LoraModule:
    """One targeted linear layer of one adapter: delta = scale * B @ A, added to `weight_name`."""

    weight_name: str  # the base tensor, e.g. model.layers.0.mlp.gate_proj.weight
    a: TensorEntry  # (rank, in)
    b: TensorEntry  # (out, rank)
    rank: int
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    checkpoint: Checkpoint
    rank: int
    alpha: float
    use_rslora: bool
    modules: dict[str, LoraModule]  # by base weight name

    @property
    def label(self) -> str:
        return self.checkpoint.label

    @property
    def config(self) -> dict:
        return self.checkpoint.config


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's scaling of B @ A."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _field_error(adapter: Checkpoint, field: str, problem: str) -> DtmError:
    return DtmError(f"{adapter.label}/{ADAPTER_CONFIG}: field {field!r} {problem}")


def read_adapter(checkpoint: Checkpoint, base: Checkpoint, mode: str) -> LoraAdapter:
    """Check one adapter's config and factors against the base and collect its modules."""
    config = checkpoint.config
    if not config:
        raise DtmError(f"{checkpoint.label}: has adapter weights but no {ADAPTER_CONFIG}; it is needed for the "
                       "rank, lora_alpha and the targeted modules")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _field_error(checkpoint, "peft_type", f"is {peft_type!r}; only LoRA adapters can be merged")
    bias = config.get("bias", "none")
    if bias != "none":
        raise _field_error(checkpoint, "bias", f"is {bias!r}: the adapter trains biases, which a LoRA merge "
                           "would silently drop; train with bias='none', or merge_and_unload each adapter with "
                           "peft and merge the full models")
    if config.get("modules_to_save"):
        raise _field_error(checkpoint, "modules_to_save", f"is {config['modules_to_save']!r}: those modules are "
                           "fully fine-tuned copies, not LoRA factors; merge_and_unload each adapter with peft "
                           "and merge the full models instead")
    if config.get("use_dora"):
        raise _field_error(checkpoint, "use_dora", "is true: DoRA's magnitude vectors are not supported; "
                           "merge_and_unload each adapter with peft and merge the full models")
    if config.get("fan_in_fan_out"):
        raise _field_error(checkpoint, "fan_in_fan_out", "is true (GPT-2 style Conv1D layers): not supported")
    if config.get("alpha_pattern"):
        raise _field_error(checkpoint, "alpha_pattern", "is set: per-module lora_alpha is not supported")
    if config.get("rank_pattern") and mode in ADAPTER_ONLY_MODES:
        raise _field_error(checkpoint, "rank_pattern", f"is set: --lora-mode {mode} needs one rank for every "
                           "module; use --lora-mode materialize")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise _field_error(checkpoint, "r", f"must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _field_error(checkpoint, "lora_alpha", f"must be a finite number, got {alpha!r}")
    use_rslora = bool(config.get("use_rslora", False))

    factors: dict[str, dict[str, TensorEntry]] = {}
    for name, entry in checkpoint.tensors.items():
        match = FACTOR_KEY.match(name)
        if match is None:
            raise DtmError(f"{checkpoint.label}: tensor {name!r} is not a LoRA factor (lora_A/lora_B of a linear "
                           "layer); embedding LoRA, DoRA and trained extra modules are not supported")
        if entry.dtype not in FLOAT_DTYPES:
            raise DtmError(f"{checkpoint.label}: tensor {name!r} has dtype {entry.dtype}; LoRA factors are floats")
        module = match.group("module")
        module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        factors.setdefault(module, {})[match.group("side")] = entry
    if not factors:
        raise DtmError(f"{checkpoint.label}: holds no LoRA factors")
    modules = {}
    for module, sides in sorted(factors.items()):
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise DtmError(f"{checkpoint.label}: module {module!r} has no lora_{missing} factor; the adapter is "
                           "incomplete")
        a, b = sides["A"], sides["B"]
        weight_name = f"{module}.weight"
        target = base.tensors.get(weight_name)
        if target is None:
            if module.endswith("lm_head") and base.config.get("tie_word_embeddings"):
                raise DtmError(f"{checkpoint.label}: module {module!r} adapts lm_head, which {base.label} ties to "
                               "the input embeddings (tie_word_embeddings); adapters of a tied lm_head are not "
                               "supported")
            raise DtmError(f"{checkpoint.label}: module {module!r} adapts {weight_name!r}, which {base.label} does "
                           "not hold; was the adapter trained on another base model?")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise DtmError(f"{checkpoint.label}: module {module!r} has lora_A {list(a.shape)} and lora_B "
                           f"{list(b.shape)}; expected (r, in) and (out, r)")
        if len(target.shape) != 2 or (b.shape[0], a.shape[1]) != target.shape:
            raise DtmError(f"{checkpoint.label}: module {module!r} gives a delta of shape "
                           f"{[b.shape[0], a.shape[1]]} but {weight_name!r} in {base.label} is {list(target.shape)}; "
                           "the adapter was trained on another base model")
        if target.dtype not in FLOAT_DTYPES:
            raise DtmError(f"{base.label}: tensor {weight_name!r} ({target.dtype}) is not a float weight")
        module_rank = a.shape[0]
        if module_rank != rank and not config.get("rank_pattern"):
            raise DtmError(f"{checkpoint.label}: module {module!r} has rank {module_rank} but field 'r' says {rank}")
        modules[weight_name] = LoraModule(weight_name, a, b, module_rank, lora_scale(alpha, module_rank, use_rslora))
    return LoraAdapter(checkpoint, rank, float(alpha), use_rslora, modules)


def _unordered(target_modules):
    """target_modules is a list of names (order irrelevant) or one regular expression."""
    return sorted(target_modules) if isinstance(target_modules, list) else target_modules


def _check_same_family(adapters: list[LoraAdapter], mode: str) -> None:
    """Adapters that are combined into one adapter must target the same modules of the same base."""
    first = adapters[0]
    for other in adapters[1:]:
        name_a = first.config.get("base_model_name_or_path")
        name_b = other.config.get("base_model_name_or_path")
        if name_a and name_b and name_a != name_b:
            message = (f"{other.label}/{ADAPTER_CONFIG}: field 'base_model_name_or_path' is {name_b!r} but "
                       f"{first.label} says {name_a!r}: the adapters were trained on different base models")
            if mode in ADAPTER_ONLY_MODES:
                raise DtmError(message)
            log.warning("%s; the merge uses the factors on the --base given, whose shapes agree", message)
        if mode not in ADAPTER_ONLY_MODES:
            continue
        targets_a, targets_b = first.config.get("target_modules"), other.config.get("target_modules")
        if _unordered(targets_a) != _unordered(targets_b):
            raise DtmError(f"{other.label}/{ADAPTER_CONFIG}: field 'target_modules' is {targets_b!r} but "
                           f"{first.label} has {targets_a!r}; --lora-mode {mode} needs adapters of the same "
                           "modules (use --lora-mode materialize for adapters of different modules)")
        only_first = sorted(set(first.modules) - set(other.modules))
        only_other = sorted(set(other.modules) - set(first.modules))
        if only_first or only_other:
            module = (only_first or only_other)[0]
            holder = first.label if only_first else other.label
            raise DtmError(f"{holder}: adapts {module!r} and the other adapter does not; --lora-mode {mode} needs "
                           "adapters of the same modules (use --lora-mode materialize)")


def read_adapters(config: MergeConfig, inputs: "Inputs") -> list[LoraAdapter]:
    """Every input as a checked adapter, or a DtmError saying what to change."""
    full_models = [m.label for m in inputs.models if not m.is_adapter]
    if full_models:
        raise DtmError(f"{full_models[0]} is a full model but other inputs are LoRA adapters; merge either "
                       "adapters (with --base) or full models, not both")
    if inputs.base is None:
        raise DtmError(f"merging LoRA adapters ({inputs.models[0].label}, ...) needs --base: the full model "
                       "directory the adapters were trained on")
    if not Path(config.base).is_dir():
        raise DtmError(f"--base {config.base}: must be a full model directory (config.json and safetensors)")
    if config.method_impl.needs_fisher:
        raise DtmError(f"--method {config.method} needs full-size Fisher estimates, which LoRA sub-models do not "
                       "have; use linear (the DTM default) or another method")
    if config.lora_mode in ADAPTER_ONLY_MODES and config.method != "linear":
        raise DtmError(f"--lora-mode {config.lora_mode} combines adapters with the linear method only, not "
                       f"{config.method}; use --lora-mode materialize to apply {config.method} to the sub-models")
    adapters = [read_adapter(m, inputs.base, config.lora_mode) for m in inputs.models]
    _check_same_family(adapters, config.lora_mode)
    if config.lora_mode == "factor-average":
        first = adapters[0]
        for other in adapters[1:]:
            for field, mine, theirs in (("r", first.rank, other.rank), ("lora_alpha", first.alpha, other.alpha),
                                        ("use_rslora", first.use_rslora, other.use_rslora)):
                if mine != theirs:
                    raise _field_error(other.checkpoint, field, f"is {theirs} but {first.label} has {mine}; "
                                       "factor-average needs equal r, lora_alpha and use_rslora (exact-concat "
                                       "merges any ranks exactly)")
    return adapters


def read_factor(entry: TensorEntry) -> "torch.Tensor":
    """A whole factor tensor from disk, as fp32."""
    import os

    import torch

    from dtm_fast.io.safetensors_format import read_exact
    from dtm_fast.merge.host_array import torch_dtype

    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        read_exact(fd, memoryview(raw.numpy()), entry.offset, entry.path)
    finally:
        os.close(fd)
    return raw.view(torch_dtype(entry.dtype)).reshape(entry.shape).float()
