"""mergekit's `slices`, as plain data: each output slice stacks `stop - first` layers made from the
same layer range of each of its sources (models of one architecture), so a config can cut, repeat
and interleave layers (frankenmerges, layer stacking) and merge each slice its own way. Read by
mergekit_yaml.py, checked by MergeConfig, merged by slices.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SliceSource:
    model: int  # index into MergeConfig.models: the checkpoint it reads
    first: int  # layers first .. stop-1 of that model
    stop: int
    parameters: dict[str, Any] = field(default_factory=dict)
    is_base: bool = False  # the slice's base model: its task vectors' origin, not a merged model

    @property
    def layers(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[SliceSource, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.sources[0].layers

    @property
    def merged(self) -> tuple[SliceSource, ...]:
        """The sources that are merged (all but the base)."""
        return tuple(s for s in self.sources if not s.is_base)

    @property
    def base(self) -> SliceSource | None:
        return next((s for s in self.sources if s.is_base), None)

    def describe(self) -> dict:
        return {"sources": [{"model": s.model, "layer_range": [s.first, s.stop], "parameters": s.parameters,
                             "base": s.is_base} for s in self.sources], "parameters": self.parameters}
