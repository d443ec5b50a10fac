"""The memory plan: what one rank of a run needs, computed from config.json before anything loads.

    dtm train --plan train.yaml --nproc-per-node 8 [--nnodes 2] [--gpu-memory 80GB]

Per rank, for FSDP2 over W ranks with fp32 master weights (as the trainer runs):
    parameters   4 B x all parameters / W          (a LoRA base is frozen but sharded the same way)
    gradients    4 B x trainable parameters / W
    optimizer    8 B x trainable parameters / W    (AdamW's two moments; its step counters are scalars)
    gathered     the root unit (embeddings, final norm, lm_head) plus two decoder layers (the one
                 computing and the one FSDP2 prefetches) in the compute dtype; none on one rank
    activations  per micro-batch of T = micro_batch_size x max_length tokens, per decoder layer
                 (8h + 3kv + 4i) values per token saved for backward (norm inputs and outputs, q/k/v
                 before and after rotary, attention output, gate/up/activation/product of the MLP);
                 with activation checkpointing only each layer's input (h per token) plus one
                 layer's full set while it is recomputed; and the logits, T x vocab in the compute
                 dtype, in fp32 for the loss, and their fp32 gradient
The first three are exact up to FSDP2's padding of uneven shards (the tests compare them with the
bytes a CPU run allocates); activations are an estimate from that count, not a measurement. On CUDA
a fixed allowance covers the CUDA context, NCCL buffers and allocator slack (an allowance, not a
figure measured here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.train.config import TrainConfig

CUDA_ALLOWANCE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Architecture:
    """What the plan needs to know about the model, read from config.json on the meta device."""

    parameters: int
    trainable: int
    lora_trainable: int          # what LoRA with the configured targets would train
    layer_parameters: int        # the largest decoder layer
    root_parameters: int         # parameters outside the decoder layers (embeddings, norm, lm_head)
    largest_tensor: int          # elements of the largest single tensor
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int


def describe_architecture(config: TrainConfig) -> Architecture:
    """Count parameters on a model built on the meta device (no weights are read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtm_fast.train.model import apply_lora, check_model_dir, decoder_layers

    directory = check_model_dir(config)
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        hf_config = AutoConfig.from_pretrained(str(directory), **kwargs)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise DtmError(f"model: cannot read the architecture of {directory}: {error}") from None
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    layers = decoder_layers(model)
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    largest = max(p.numel() for p in unique.values())
    try:
        lora_model = apply_lora(model, TrainConfig(**{**config.to_dict(), "finetuning": "lora"}))
        lora_trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    except DtmError:  # the configured targets do not exist in this model: no LoRA figure to offer
        if config.finetuning == "lora":
            raise
        lora_trainable = 0
    heads = getattr(hf_config, "num_attention_heads", 1)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return Architecture(
        parameters=total, trainable=lora_trainable if config.finetuning == "lora" else total,
        lora_trainable=lora_trainable, layer_parameters=max(layer_sizes), root_parameters=total - sum(layer_sizes),
        largest_tensor=largest, layers=len(layers), hidden=hf_config.hidden_size,
        intermediate=getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size), kv_width=kv_heads * head_dim,
        vocab=hf_config.vocab_size)


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    device_type: str
    compute_bytes: int              # 2 for bf16 compute, 4 for fp32
    parts: dict[str, int]           # device bytes per rank, by part
    host_load_bytes: int            # host bytes per rank while loading (beyond the process itself)
    capacity: int | None            # device (or host, on CPU) bytes available to one rank
    capacity_source: str
    fixes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def rows(self) -> list[list[str]]:
        rows = [[name, gib(value)] for name, value in self.parts.items()]
        rows.append(["total per rank", gib(self.total)])
        rows.append(["host memory while loading (beyond the process)", gib(self.host_load_bytes)])
        if self.capacity is not None:
            rows.append([f"available ({self.capacity_source})", gib(self.capacity)])
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "device_type": self.device_type, "parts": self.parts,
                "total": self.total, "host_load_bytes": self.host_load_bytes, "capacity": self.capacity,
                "capacity_source": self.capacity_source, "fits": self.fits, "fixes": self.fixes}

    def refusal(self) -> str:
        return (f"this run needs about {gib(self.total)} per rank on {self.world_size} rank(s) and "
                f"{self.capacity_source} has {gib(self.capacity)}; "
                + ("; or ".join(self.fixes) if self.fixes else "it cannot fit: use a larger device")
                + " (dtm train --plan CONFIG shows the plan)")


def gib(count: float) -> str:
    """A byte count for a person: GiB from 1 GiB up, MiB below."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _parts(arch: Architecture, config: TrainConfig, world_size: int, compute_bytes: int, device_type: str,
           trainable: int | None = None, activation_checkpointing: bool | None = None,
           micro_batch_size: int | None = None) -> dict[str, int]:
    trainable = arch.trainable if trainable is None else trainable
    checkpointing = config.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    tokens = (micro_batch_size or config.micro_batch_size) * config.max_length
    per_token_layer = 8 * arch.hidden + 3 * arch.kv_width + 4 * arch.intermediate
    if checkpointing:
        activations = tokens * compute_bytes * (arch.layers * arch.hidden + per_token_layer)
    else:
        activations = tokens * compute_bytes * arch.layers * per_token_layer
    logits = tokens * arch.vocab * (compute_bytes + 4 + 4)
    gathered = 0 if world_size == 1 else (arch.root_parameters + 2 * arch.layer_parameters) * compute_bytes
    parts = {
        "parameters (fp32 master, sharded)": math.ceil(4 * arch.parameters / world_size),
        "gradients (fp32, sharded)": math.ceil(4 * trainable / world_size),
        "optimizer (AdamW moments, sharded)": math.ceil(8 * trainable / world_size),
        "gathered for compute (root + 2 layers)": gathered,
        f"activations ({'with' if checkpointing else 'without'} checkpointing)": activations,
        "logits and their gradient": logits,
    }
    if device_type == "cuda":
        parts["CUDA context, NCCL, allocator (allowance)"] = CUDA_ALLOWANCE_BYTES
    return parts


def plan_memory(arch: Architecture, config: TrainConfig, world_size: int, device_type: str,
                capacity: int | None, capacity_source: str, compute_bytes: int) -> MemoryPlan:
    parts = _parts(arch, config, world_size, compute_bytes, device_type)
    # loading: this rank's rows of the largest tensor, read in the file's dtype and widened to fp32
    host = math.ceil(arch.largest_tensor / world_size) * (2 + 4)
    if device_type == "cpu":
        host += sum(parts.values())
    fixes = []
    if capacity is not None and sum(parts.values()) > capacity:
        def fits(**change: Any) -> bool:
            return sum(_parts(arch, config, change.pop("world_size", world_size), compute_bytes, device_type,
                              **change).values()) <= capacity

        if not config.activation_checkpointing and fits(activation_checkpointing=True):
            fixes.append("set activation_checkpointing: true")
        if config.micro_batch_size > 1:
            for smaller in range(config.micro_batch_size - 1, 0, -1):
                if fits(micro_batch_size=smaller):
                    fixes.append(f"lower micro_batch_size to {smaller} (batch_size stays; accumulation grows)")
                    break
        for more in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            if more > world_size and fits(world_size=more):
                fixes.append(f"use {more} ranks or more (e.g. --nproc-per-node 8 --nnodes {max(1, more // 8)})"
                             if more > 8 else f"use {more} ranks or more (--nproc-per-node {more})")
                break
        if config.finetuning == "full" and arch.lora_trainable and fits(trainable=arch.lora_trainable):
            fixes.append(f"finetuning: lora (trains {arch.lora_trainable:,} instead of {arch.parameters:,} parameters)")
    return MemoryPlan(world_size, device_type, compute_bytes, parts, host, capacity, capacity_source, fixes)


def plan_for(config: TrainConfig, world_size: int, device_type: str, gpu_memory: int | None = None,
             ranks_per_node: int = 1) -> MemoryPlan:
    """The plan with the capacity this machine (or --gpu-memory) offers one rank."""
    arch = describe_architecture(config)
    precision = config.mixed_precision
    compute_bytes = 2 if (precision == "bf16" or (precision == "auto" and device_type == "cuda")) else 4
    if gpu_memory is not None:
        capacity, source = gpu_memory, "--gpu-memory"
    elif device_type == "cuda":
        import torch

        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        capacity, source = properties.total_memory, f"the GPU ({properties.name})"
    else:
        import psutil

        capacity = psutil.virtual_memory().total // max(1, ranks_per_node)
        source = f"this machine's memory / {ranks_per_node} rank(s)" if ranks_per_node > 1 else "this machine's memory"
    return plan_memory(arch, config, world_size, device_type, capacity, source, compute_bytes)


def check_fits(config: TrainConfig, world_size: int, device_type: str, ranks_per_node: int) -> MemoryPlan:
    """Refuse, before anything is loaded, a run whose plan exceeds what one rank has."""
    plan = plan_for(config, world_size, device_type, ranks_per_node=ranks_per_node)
    if plan.fits is False:
        raise DtmError(plan.refusal())
    return plan
