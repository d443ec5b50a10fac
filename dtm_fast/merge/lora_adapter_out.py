"""LoRA merges whose result is again a peft adapter: exact-concat and factor-average.

exact-concat stacks the K adapters into one of rank R = sum r_i:
    A = [A_1; ...; A_K]                       (R x in)
    B = [c_1 s_1 B_1, ..., c_K s_K B_K] / s   (out x R)
so s * B @ A = sum_i c_i s_i B_i A_i exactly (up to rounding B to the adapter dtype). We write
lora_alpha = R without rslora, so the output scale s is 1 and the scales live in B.

factor-average reproduces the DTM paper code: A = sum c_i A_i, B = sum c_i B_i with the adapters'
common r and alpha. Its product (sum c_i B_i)(sum c_i A_i) carries the cross terms c_i c_j B_i A_j,
so it is NOT the average of the sub-models; it is offered to reproduce the paper, with a warning.

The output file is laid out from the modules' shapes first, then filled one module at a time, so
memory holds one module's factors of every adapter, whatever the adapters' total size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dtm_fast import __version__, ui
from dtm_fast.errors import DtmError
from dtm_fast.io import output as out_io
from dtm_fast.io.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE
from dtm_fast.io.safetensors_format import encode_header, write_exact
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.lora import LoraAdapter, read_factor
from dtm_fast.merge.plan import layer_index

if TYPE_CHECKING:
    from dtm_fast.merge.engine import Inputs

log = logging.getLogger(__name__)
APPROXIMATION_WARNING = (
    "--lora-mode factor-average averages lora_A and lora_B separately (the DTM paper code's behaviour): the "
    "result (sum c_i B_i)(sum c_i A_i) includes cross terms between adapters and is NOT the average of the "
    "sub-models. Use --lora-mode exact-concat (an adapter) or materialize (a full model) for the exact merge.")


def module_coefficients(config: MergeConfig, weight_name: str, num_layers: int | None) -> list[float]:
    """The linear method's c_i for one module (weights may vary by tensor, as in any merge)."""
    method = config.method_impl
    params = config.tensor_params(weight_name, layer_index(weight_name), num_layers)
    method.check_params(params, f"{config.source}: tensor {weight_name!r}")
    return method.coefficients(params)


def output_dtype(config: MergeConfig, adapters: list[LoraAdapter]) -> str:
    if config.dtype is not None:
        return config.dtype
    dtypes = {entry.dtype for a in adapters for m in a.modules.values() for entry in (m.a, m.b)}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def combined_factors(mode: str, adapters: list[LoraAdapter], weight_name: str, coefficients: list[float]):
    """(A, B) of the output for one module, fp32."""
    import torch

    modules = [adapter.modules[weight_name] for adapter in adapters]
    if mode == "exact-concat":
        a = torch.cat([read_factor(m.a) for m in modules], dim=0)  # (sum r, in)
        b = torch.cat([read_factor(m.b) * (c * m.scale) for m, c in zip(modules, coefficients)], dim=1)  # (out, sum r)
        return a, b
    a = sum(read_factor(m.a) * c for m, c in zip(modules, coefficients))
    b = sum(read_factor(m.b) * c for m, c in zip(modules, coefficients))
    return a, b


def output_adapter_config(mode: str, adapters: list[LoraAdapter]) -> dict:
    config = dict(adapters[0].config)
    if mode == "exact-concat":
        rank = sum(adapter.rank for adapter in adapters)
        config.update(r=rank, lora_alpha=rank, use_rslora=False)  # scale 1: the scales are folded into B
    config.update(rank_pattern={}, alpha_pattern={})
    return config


def run_adapter_merge(config: MergeConfig, inputs: "Inputs", adapters: list[LoraAdapter]) -> Path:
    import torch

    from dtm_fast.merge.host_array import torch_dtype

    mode = config.lora_mode
    if config.num_shards != 1:
        raise DtmError(f"--lora-mode {mode} writes one small adapter file; --num-shards does not apply")
    if mode == "factor-average":
        ui.warn(APPROXIMATION_WARNING)
    output = Path(config.output)  # engine.run_merge has checked it is outside every input
    layers = [i for i in (layer_index(name) for name in inputs.base.tensors) if i is not None]
    num_layers = max(layers) + 1 if layers else None
    dtype = output_dtype(config, adapters)
    first = adapters[0]
    weight_names = sorted(first.modules)
    coefficients = {name: module_coefficients(config, name, num_layers) for name in weight_names}
    rank = sum(a.rank for a in adapters) if mode == "exact-concat" else first.rank
    entries = []
    for name in weight_names:
        module = first.modules[name]
        entries.append((module.a.name, dtype, (rank, module.a.shape[1])))
        entries.append((module.b.name, dtype, (module.b.shape[0], rank)))
    header, offsets = encode_header(entries, {"format": "pt"})
    size = len(header) + (offsets[-1][1] if offsets else 0)
    fingerprint = {
        "lora_mode": mode, "method": config.method, "parameters": config.parameters,
        "models": [{"path": str(m.path), "parameters": m.parameters} for m in config.models],
        "inputs": {c.label: c.header_sha256 for c in inputs.all()}, "dtype": dtype, "version": __version__,
    }
    partial = out_io.prepare_partial(output, fingerprint, config.resume, config.overwrite, shared=False)
    if not out_io.shard_is_complete(partial, ADAPTER_FILE, size, header):
        out_io.check_disk_space(output, size)
        fd = out_io.create_shard(partial, ADAPTER_FILE, header, size)
        try:
            for index, name in enumerate(weight_names):
                a, b = combined_factors(mode, adapters, name, coefficients[name])
                for tensor, (begin, _) in zip((a, b), offsets[2 * index: 2 * index + 2]):
                    stored = tensor.to(torch_dtype(dtype)).contiguous().view(-1).view(torch.uint8)
                    write_exact(fd, memoryview(stored.numpy()), len(header) + begin)
        except BaseException:
            os.close(fd)
            raise
        out_io.finish_shard(partial, ADAPTER_FILE, fd, size)
    out_io.write_json(partial / ADAPTER_CONFIG, output_adapter_config(mode, adapters))
    out_io.write_json(partial / "dtm_merge.json", {
        "tool": "dtm_fast", "version": __version__, "method": config.method, "lora_mode": mode,
        "exact": mode == "exact-concat", "parameters": config.parameters,
        "base": {"path": str(config.base), "header_sha256": inputs.base.header_sha256},
        "models": [{"path": str(m.path), "parameters": m.parameters, "header_sha256": c.header_sha256,
                    "r": a.rank, "lora_alpha": a.alpha, "use_rslora": a.use_rslora}
                   for m, c, a in zip(config.models, inputs.models, adapters)],
        "dtype": dtype, "r": rank,
    })
    out_io.publish(partial, output, config.overwrite)
    ui.info(f"merged {len(adapters)} LoRA adapter(s) with --lora-mode {mode} into {output} "
            f"(r={rank}, {len(weight_names)} modules)")
    return output
