"""Model FLOPs of a training step and MFU (model FLOPs utilisation) against the device's peak.

FLOPs count the model's work, not the recomputation activation checkpointing adds (that would be
hardware FLOPs), in the convention of PaLM and torchtitan:
    matmuls      6 x (weights of every linear layer) per token for full fine-tuning (forward 2,
                 input gradients 2, weight gradients 2); under LoRA the frozen weights get no
                 weight gradients: 4 x linear weights + 2 x adapter weights per token
    attention    12 x layers x (heads x head_dim) x n per token of an example of n tokens
                 (QK^T and AV, forward and backward, not halved for causality); a packed row is
                 counted per example, since examples attend only within themselves
Embedding lookups are gathers, not matmuls, and are not counted; a tied lm_head is.

Peaks are the dense bf16 tensor-core figures of NVIDIA's datasheets, looked up by device name; a
run computing in fp32, or on a device not listed (every CPU), reports no MFU unless `peak_tflops`
gives the peak, and says so rather than guessing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# (substring of torch.cuda.get_device_name(), dense bf16 peak in FLOP/s); the most specific first,
# since "A100" contains "A10" and "L40S" contains "L4"
DATASHEET_BF16_PEAKS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("GH200", 989.4e12), ("H200", 989.4e12), ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12), ("H100", 989.4e12), ("H800", 989.4e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362.05e12), ("L40", 181.05e12), ("L4", 121e12), ("A10", 125e12),
)


@dataclass(frozen=True)
class FlopModel:
    linear_weights: int       # elements of every linear layer's weight (LoRA's A and B included)
    trainable_linear: int     # the part of them that is trained
    frozen_base: bool         # LoRA: the base gets no weight gradients
    layers: int
    attention_width: int      # heads x head_dim

    def step_flops(self, sequence_lengths: Iterable[int]) -> float:
        lengths = list(sequence_lengths)
        tokens = sum(lengths)
        if self.frozen_base:
            matmuls = (4 * self.linear_weights + 2 * self.trainable_linear) * tokens
        else:
            matmuls = 6 * self.linear_weights * tokens
        attention = 12 * self.layers * self.attention_width * sum(n * n for n in lengths)
        return float(matmuls + attention)


def flop_model(model: Any, layers: int) -> FlopModel:
    import torch

    linear = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            trainable += module.weight.numel() if module.weight.requires_grad else 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf_config = base.config
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return FlopModel(linear, trainable, frozen_base=trainable < linear, layers=layers,
                     attention_width=heads * head_dim)


def device_peak(device: Any, compute_dtype: Any, configured_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where that figure comes from); (None, why not) when unknown."""
    import torch

    if configured_tflops is not None:
        return configured_tflops * 1e12, f"peak_tflops {configured_tflops:g}"
    if device.type != "cuda":
        return None, f"no known peak for {device.type}: set peak_tflops to report MFU"
    name = torch.cuda.get_device_name(device)
    if compute_dtype != torch.bfloat16:
        return None, f"the datasheet peaks listed are bf16 and this run computes in {compute_dtype}: set peak_tflops"
    for key, peak in DATASHEET_BF16_PEAKS:
        if key in name:
            return peak, f"the {key} datasheet's dense bf16 peak, {peak / 1e12:g} TFLOP/s"
    return None, f"no known peak for {name}: set peak_tflops to report MFU"


def mfu(flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    """Share of the devices' peak the step's model FLOPs used."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (devices * peak)
