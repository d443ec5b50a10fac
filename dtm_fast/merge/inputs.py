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

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    @property
    def adapters(self) -> bool:
        return any(m.is_adapter for m in self.models)

    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + list(self.models) + list(self.fishers)


def open_inputs(config: MergeConfig, cache: Path) -> Inputs:
    base = open_checkpoint(config.base, config.allow_pickle, cache) if config.base is not None else None
    models = tuple(open_checkpoint(m.path, config.allow_pickle, cache) for m in config.models)
    if base is not None and base.is_adapter:
        raise DtmError(f"{config.base}: the base must be a full model, not a LoRA adapter")
    if any(m.is_adapter for m in models):
        return Inputs(base, models, ())  # adapters hold factors, not weights: merge/lora/adapters.py checks them
    reference = base if base is not None else models[0]
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
    return Inputs(base, models, fishers)
