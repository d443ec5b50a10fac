"""The optimizer and the learning-rate schedule.

AdamW (fused on CUDA) with two parameter groups: weight decay applies to matrices (linear layers
and embeddings), never to norm weights and biases, the rule of transformers' Trainer and torchtune
(decaying a norm's gain or a bias pulls it toward zero, which is not regularisation of the
function). A linear warmup, then cosine, linear or constant decay to `min_lr_ratio`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from dtm_fast.train.config import TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(param: Any) -> bool:
    """Norm weights and biases are vectors; weight matrices and embeddings are not."""
    return param.ndim >= 2


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if decays(p)], "weight_decay": weight_decay},
              {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: Any, config: TrainConfig, total_steps: int, device_type: str) -> tuple[Any, Any]:
    import torch

    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                  fused=device_type == "cuda")
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, total_steps=total_steps, warmup_steps=warmup, kind=config.lr_scheduler,
        min_ratio=config.min_lr_ratio))
    return optimizer, scheduler
