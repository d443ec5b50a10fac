"""The checkpoints a merge reads: base, models and, for Fisher merging, their Fisher estimates,
opened from their headers alone and checked against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import Checkpoint, open_checkpoint, open_fisher
from dtm_fast.io.safetensors_format import FLOAT_DTYPES
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.plan import check_agreement


@dataclass(frozen=True)
class Inputs:
    base: Checkpoint | None
    models: tuple[Checkpoint, ...]
    fishers: tuple[Checkpoint, ...]
    model_adapters: tuple[Checkpoint | None, ...] = ()  # LoRA adapters applied to models (model+lora)

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    @property
    def adapters(self) -> bool:
        return any(m.is_adapter for m in self.models)

    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + list(self.models) + list(self.fishers) + \
            [a for a in self.model_adapters if a is not None]


def open_inputs(config: MergeConfig, cache: Path) -> Inputs:
    base = open_checkpoint(config.base, config.allow_pickle, cache) if config.base is not None else None
    models = tuple(open_checkpoint(m.path, config.allow_pickle, cache) for m in config.models)
    if base is not None and base.is_adapter:
        raise DtmError(f"{config.base}: the base must be a full model, not a LoRA adapter")
    if config.tokenizer is not None:  # vocabulary tensors re-laid over the output vocabulary first
        from dtm_fast.merge.vocab_align import align_vocabularies

        if any(m.is_adapter for m in models) or any(m.adapter is not None for m in config.models):
            raise DtmError(f"{config.source}: a tokenizer setting with LoRA adapters is not supported; merge the "
                           "adapters into their models first, or drop tokenizer_source / tokenizer")
        base, models = align_vocabularies(config.tokenizer, base, models, cache, config.max_memory, config.source)
    if any(m.is_adapter for m in models):
        return Inputs(base, models, ())  # adapters hold factors, not weights: merge/lora/adapters.py checks them
    adapters = tuple(open_checkpoint(m.adapter, False, cache) if m.adapter is not None else None
                     for m in config.models)
    for model, adapter in zip(config.models, adapters):
        if adapter is not None and not adapter.is_adapter:
            raise DtmError(f"{model.adapter}: is not a LoRA adapter directory (adapter_config.json and "
                           f"adapter_model.safetensors), so it cannot be applied to {model.path}")
    if any(adapters) and (config.slices is not None or config.method_impl.needs_fisher):
        raise DtmError(f"{config.source}: model+lora is not supported with slices or Fisher merging yet")
    reference = base if base is not None else models[0]
    if config.slices is None:  # slices read other layers of other models: merge/slices.py checks them
        check_agreement(reference, [m for m in models if m is not reference])
    fishers: tuple[Checkpoint, ...] = ()
    if config.method_impl.needs_fisher:
        fishers = tuple(open_fisher(m.path) for m in config.models)
        float_names = {n for n, e in reference.tensors.items() if e.dtype in FLOAT_DTYPES}
        for fisher in fishers:
            for name in sorted(float_names):
                entry = fisher.tensors.get(name)
                if entry is None or entry.shape != reference.tensors[name].shape or entry.dtype not in FLOAT_DTYPES:
                    raise DtmError(f"{fisher.label}: needs a float tensor {name!r} of shape "
                                   f"{list(reference.tensors[name].shape)} (the Fisher estimate of that weight)")
    return Inputs(base, models, fishers, adapters if any(adapters) else ())
