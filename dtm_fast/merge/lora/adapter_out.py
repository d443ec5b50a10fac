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
from pathlib import Path
from typing import TYPE_CHECKING

from dtm_fast import ui
from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import write_json
from dtm_fast.io.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE
from dtm_fast.io.safetensors_format import encode_header, write_exact
from dtm_fast.merge.budget import ChunkNeeds
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.lora.adapters import LoraAdapter, read_factor
from dtm_fast.merge.plan import OutputPlan, PlannedShard, PlannedTensor, layer_index
from dtm_fast.merge.sources import MergeSource, TensorWork

if TYPE_CHECKING:
    from dtm_fast.merge.inputs import Inputs

log = logging.getLogger(__name__)
APPROXIMATION_WARNING = (
    "--lora-mode factor-average averages lora_A and lora_B separately (the DTM paper code's behaviour): the "
    "result (sum c_i B_i)(sum c_i A_i) includes cross terms between adapters and is NOT the average of the "
    "sub-models. Use --lora-mode exact-concat (an adapter) or materialize (a full model) for the exact merge.")


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


class AdapterSource(MergeSource):
    """One small adapter file, filled one module at a time (each module's factors of every adapter
    in memory, nothing else): no chunk backend, no buffers."""

    needs_backend = False

    def __init__(self, config: MergeConfig, inputs: "Inputs", adapters: list[LoraAdapter]):
        mode = config.lora_mode
        if config.num_shards != 1:
            raise DtmError(f"--lora-mode {mode} writes one small adapter file; --num-shards does not apply")
        self.adapters = adapters
        layers = [i for i in (layer_index(name) for name in inputs.base.tensors) if i is not None]
        num_layers = max(layers) + 1 if layers else None
        self.dtype = output_dtype(config, adapters)
        first = adapters[0]
        self.weight_names = sorted(first.modules)
        self.rank = sum(a.rank for a in adapters) if mode == "exact-concat" else first.rank
        self.module_params = {name: config.tensor_params(name, layer_index(name), num_layers)
                              for name in self.weight_names}
        entries = []
        for name in self.weight_names:
            module = first.modules[name]
            entries.append((module.a.name, self.dtype, (self.rank, module.a.shape[1])))
            entries.append((module.b.name, self.dtype, (module.b.shape[0], self.rank)))
        header, offsets = encode_header(entries, {"format": "pt"})
        tensors = tuple(PlannedTensor(entry_name, shape, dtype, True, 0, len(header) + begin, layer_index(entry_name))
                        for (entry_name, dtype, shape), (begin, _) in zip(entries, offsets))
        size = len(header) + (offsets[-1][1] if offsets else 0)
        super().__init__(config, inputs, OutputPlan((PlannedShard(ADAPTER_FILE, header, size, tensors),), num_layers))

    def check(self) -> None:
        method = self.config.method_impl
        for name, params in self.module_params.items():
            method.check_params(params, f"{self.config.source}: tensor {name!r}")
        if self.config.lora_mode == "factor-average":
            ui.warn(APPROXIMATION_WARNING)

    def stage_label(self, backend_name: str) -> str:
        return f"merge LoRA adapters ({self.config.lora_mode})"

    def fingerprint_fields(self) -> dict:
        return {"lora_mode": self.config.lora_mode, "dtype": self.dtype}

    def provenance_fields(self) -> dict:
        return {"lora_mode": self.config.lora_mode, "exact": self.config.lora_mode == "exact-concat",
                "dtype": self.dtype, "r": self.rank,
                "adapters": [{"r": a.rank, "lora_alpha": a.alpha, "use_rslora": a.use_rslora} for a in self.adapters]}

    def side_files(self, partial: Path) -> list[str]:
        write_json(partial / ADAPTER_CONFIG, output_adapter_config(self.config.lora_mode, self.adapters))
        return []

    def chunk_needs(self, backend, mapped: bool) -> ChunkNeeds:
        return ChunkNeeds((), 0, min_elements=0)

    def budget_description(self, backend) -> str:
        return "LoRA adapter output"

    def chunk_sizes(self, shards, needs, budget) -> dict[str, int]:
        return {}

    def work(self, shards, backend, io, chunks) -> list[list[TensorWork]]:
        """Both factors of a module come from one computation: the A entry's work writes both, the
        B entry's has nothing left to do."""
        result = []
        for shard in shards:
            by_name = {t.name: t for t in shard.tensors}
            shard_work = []
            for name in self.weight_names:
                module = self.adapters[0].modules[name]
                shard_work.append(TensorWork(by_name[module.a.name], self._writer(name, by_name[module.a.name],
                                                                                  by_name[module.b.name])))
                shard_work.append(TensorWork(by_name[module.b.name], _nothing))
            result.append(shard_work)
        return result

    def _writer(self, weight_name: str, a_tensor: PlannedTensor, b_tensor: PlannedTensor):
        def run(fd: int) -> None:
            import torch

            from dtm_fast.merge.host_array import torch_dtype

            coefficients = self.config.method_impl.coefficients(self.module_params[weight_name])
            a, b = combined_factors(self.config.lora_mode, self.adapters, weight_name, coefficients)
            for tensor, planned in ((a, a_tensor), (b, b_tensor)):
                stored = tensor.to(torch_dtype(self.dtype)).contiguous().view(-1).view(torch.uint8)
                write_exact(fd, memoryview(stored.numpy()), planned.offset)

        return run


def _nothing(fd: int) -> None:
    """The B factor is written with the A factor of its module."""
