"""Diagonal empirical Fisher information of the trained weights, for Fisher-weighted merging:
F_i = mean over examples of (d log p(response | prompt) / d w_i)^2, with the response's
log-likelihood summed over its tokens.

Squares must be of one example's gradient, but FSDP averages gradients over ranks as they are
reduced; so every rank processes the same example at the same time (the average of identical
gradients is that gradient) and squares its own shard. Dropout is off (eval mode).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from dtm_fast.data.chat import TokenizedExample
from dtm_fast.data.packing import collate
from dtm_fast.train.export import ExportTensor
from dtm_fast.train.parallel import Runtime

logger = logging.getLogger(__name__)


def adapter_tensor_name(name: str) -> str:
    """peft's saved name for a LoRA parameter (the adapter name is not part of it)."""
    return name.replace(".default", "")


def estimate_fisher(model: Any, examples: Sequence[TokenizedExample], indices: Sequence[int], runtime: Runtime,
                    pad_id: int, autocast_context, lora: bool) -> list[ExportTensor]:
    import torch
    import torch.nn.functional as F

    parameters = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    sums = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in parameters}
    was_training = model.training
    model.eval()
    for index in indices:
        batch = collate(examples, [[index]], pad_id)
        model.zero_grad(set_to_none=True)
        with autocast_context():
            logits = model(input_ids=batch.input_ids.to(runtime.device),
                           position_ids=batch.position_ids.to(runtime.device), use_cache=False).logits
        log_likelihood = -F.cross_entropy(logits.float().flatten(0, 1), batch.targets.to(runtime.device).flatten(),
                                          ignore_index=-100, reduction="sum")
        log_likelihood.backward()
        for name, param in parameters:
            sums[name] += param.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    count = max(1, len(indices))
    return [ExportTensor(adapter_tensor_name(name) if lora else name, tuple(param.shape), sums[name] / count)
            for name, param in parameters]
