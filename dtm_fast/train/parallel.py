"""Processes and sharding. `parallelize()` is the one place the model is changed for scale:
activation checkpointing, then FSDP2 `fully_shard` on each decoder layer and on the root, with
a mixed-precision policy (bf16 parameters for compute, fp32 gradient reduction). One process runs
the plain model (autocast for bf16), no process group needed."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    local_world_size: int = 1  # ranks on this node (they share its host memory)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join the torchrun job when there is one (nccl on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def close_runtime(runtime: Runtime) -> None:
    import torch.distributed as dist

    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(mixed_precision: str, device_type: str):
    import torch

    if mixed_precision == "auto":
        mixed_precision = "bf16" if device_type == "cuda" else "fp32"
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def parallelize(model: Any, runtime: Runtime, layers: list[Any], param_dtype, activation_checkpointing: bool,
                compile_layers: bool = False) -> Any:
    """Apply activation checkpointing, torch.compile and FSDP2 sharding from outside the model code.
    The model may still be on the meta device; its tensors are not moved here."""
    import torch

    if activation_checkpointing:
        # transformers' own non-reentrant checkpointing wraps each decoder layer's forward without
        # renaming parameters, so checkpoints and the export keep the model's tensor names
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        # in place (nn.Module.compile): the parameters keep their names, which checkpoints and the
        # export rely on; one compiled graph per decoder layer, as torchtitan does
        for layer in layers:
            layer.compile()
    if not runtime.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def autocast(runtime: Runtime, param_dtype):
    """On one process there is no FSDP cast, so bf16 compute comes from autocast."""
    import torch

    if runtime.distributed or param_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=param_dtype)


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum a few scalars over ranks (token counts, loss sums)."""
    if not runtime.distributed:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()

