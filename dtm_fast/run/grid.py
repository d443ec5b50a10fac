"""What one `dtm run` sweeps over: its cells (a seed and a K each), its training jobs and its merge
settings, and the reading of a swept axis from the YAML (`k: 4` or `k: [2, 4, 8]`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dtm_fast import checks
from dtm_fast.errors import DtmError
from dtm_fast.merge.budget import DEFAULT_MAX_MEMORY_TEXT

MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class MergeSection:
    method: str = "linear"
    parameters: dict[str, Any] = field(default_factory=dict)  # the method's global parameters
    weights: tuple[float, ...] | None = None   # one per sub-model (linear, task_arithmetic, ...)
    lora_mode: str = "materialize"              # LoRA sub-models: materialize | exact-concat | factor-average
    dtype: str | None = None                    # None: the inputs' dtype
    max_memory: str = DEFAULT_MAX_MEMORY_TEXT  # the merger's one default
    max_shard_size: str = "5GB"
    backend: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class MergeSetting:
    """One merge of the sub-models: its name (a directory name) and its MergeSection."""

    name: str
    section: MergeSection


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a seed (None: the sections' own seeds) and a K."""

    seed: int | None
    k: int
    prefix: str  # where its outputs go inside run_dir ("" without sweeps, "seed-0/k-4/")


@dataclass(frozen=True)
class Job:
    """One training job: a sub-model of a cell, or the vanilla baseline of a seed."""

    name: str            # its directory inside run_dir, e.g. "sub-0", "seed-1/k-4/sub-2", "seed-1/vanilla"
    cell: Cell           # for vanilla: the cell whose portions it trains on (the seed's first K)
    portion: int | None  # None: vanilla, all portions


def axis(values: Mapping[str, Any], key: str, where: str, minimum: int, maximum: int | None) -> tuple[tuple[int, ...], bool]:
    """A whole number or a list of distinct whole numbers: (values, swept)."""
    value = values[key]
    if isinstance(value, list):
        if not value:
            raise DtmError(f"{where}: '{key}' must list at least one value")
        numbers = tuple(checks.whole_number(v, f"{key}[{i}]", minimum, maximum) for i, v in enumerate(value))
        if len(set(numbers)) != len(numbers):
            raise DtmError(f"{where}: '{key}' lists a value twice: {value!r}")
        return numbers, True
    return (checks.whole_number(value, key, minimum, maximum),), False
