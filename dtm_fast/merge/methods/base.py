"""What a merge method is: its parameters and a streaming merge built from backend chunk operations.
Its reference (the definition every backend and chunking is tested against) is the same merge run
on whole in-memory tensors with the reference backend.

Parameters are values, never code. A parameter is either shared by all models ("global") or given
per model ("model"); mergekit-style per-tensor gradients and filters are resolved to plain numbers
before a method sees them (see merge/config.py), so a method only ever reads `TensorParams`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from dtm_fast.errors import DtmError
from dtm_fast.merge.chunk import TensorContext  # noqa: F401 - part of a method's interface

if TYPE_CHECKING:
    import torch

    from dtm_fast.merge.stream import TensorStream

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    scope: str  # "global" or "model"
    kind: type  # float, bool or int
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None  # returns a complaint, or None if fine
    help: str = ""


def in_open_closed_unit(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def in_unit(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor: globals by name, per-model ones as lists."""

    values: dict[str, Any]
    per_model: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def model(self, name: str) -> tuple[Any, ...]:
        return self.per_model[name]


class MergeMethod(ABC):
    """Base class: subclasses set the class attributes and implement merge()."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_base: ClassVar[bool] = True  # task-vector methods read base weights
    # what a mergekit config's base_model is to this method: "required" (the task vectors' origin),
    # "optional" (a reference point when given) or "ignored" (an ordinary input, as mergekit adds it)
    base_role: ClassVar[str] = "required"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    needs_fisher: ClassVar[bool] = False
    row_wise: ClassVar[bool] = False  # statistics per leading-axis row: chunks hold whole rows
    vector_is_one_row: ClassVar[bool] = False  # per-row statistics see a 1-D tensor as one row (mergekit's)
    # some of its chunk operations are torch's on every backend: torch is loaded before the merge
    # takes its memory baseline, so that its ~200 MiB count as the interpreter's, as with a torch backend
    uses_torch: ClassVar[bool] = False

    @property
    def reads_base(self) -> bool:
        """Whether the base's tensors are given to merge(): needed, or optional (used when given)."""
        return self.needs_base or self.base_role == "optional"

    def has_statistics_pass(self, params: TensorParams) -> bool:
        """Whether merge() reads the tensor more than once (statistics, then combine): the engine
        then gives it chunks as large as the budget allows, so a tensor that fits is read once."""
        return False

    def statistics_bytes_per_element(self, num_models: int) -> float:
        """Memory the statistics passes hold per element of a chunk (budgeted by the engine)."""
        return 0

    def needs_whole_rows(self, params: TensorParams) -> bool:
        """Whether every chunk must hold whole leading-axis rows (per-row statistics)."""
        return self.row_wise

    def row_length(self, context: TensorContext) -> int:
        """Elements per row of this method's per-row statistics: the leading axis' rows, and for a
        vector either one row per element or, with `vector_is_one_row`, the whole vector."""
        if len(context.shape) < 2 and self.vector_is_one_row:
            return max(1, context.numel)
        return context.row_length

    def check_model_count(self, count: int) -> None:
        if count < self.min_models:
            raise DtmError(f"{self.name} needs at least {self.min_models} model(s) besides the base, got {count}")
        if self.max_models is not None and count > self.max_models:
            raise DtmError(f"{self.name} takes at most {self.max_models} model(s) besides the base, got {count}")

    def check_params(self, params: TensorParams, where: str) -> None:
        """Method-specific checks across parameters (ranges are checked per Param)."""

    def reference(self, params: TensorParams, base: "torch.Tensor | None", models: Sequence["torch.Tensor"],
                  context: TensorContext, fishers: Sequence["torch.Tensor"] = ()) -> "torch.Tensor":
        """The definition: the fp32 result for whole in-memory tensors, which is this method's own
        merge() run on them as one chunk with the reference backend (so its math exists once)."""
        from dtm_fast.merge.in_memory import merge_whole

        return merge_whole(self, params, base, models, context, fishers)

    @abstractmethod
    def merge(self, params: TensorParams, stream: "TensorStream") -> None:
        """Streaming merge of one tensor: optional statistics passes over stream.chunks(), then a
        combine pass that fills each chunk's output buffer."""
