"""A tensor stream over whole in-memory tensors, as one chunk: what every method's `reference()`
runs its own streaming `merge()` on, with the reference backend. So a method's math is written once
(its merge, in backend operations); the reference is that math on whole tensors in plain torch, and
every backend and every chunking of a real merge is tested against it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from dtm_fast.merge.chunk import Chunk, TensorContext

if TYPE_CHECKING:
    import torch


class WholeTensorStream:
    holds_whole_tensor = True  # methods may use whole-tensor definitions (a full sort for thresholds)

    def __init__(self, context: TensorContext, backend, base: "torch.Tensor | None",
                 models: Sequence["torch.Tensor"], fishers: Sequence["torch.Tensor"] = ()):
        import torch

        self.context = context
        self.backend = backend
        self.base = base.reshape(-1).contiguous() if base is not None else None
        self.model_tensors = [model.reshape(-1).contiguous() for model in models]
        self.fisher_tensors = [fisher.reshape(-1).contiguous() for fisher in fishers]
        self.chunk_elements = max(1, context.numel)
        self.out = torch.empty(context.numel, dtype=torch.float32)

    @property
    def models(self) -> list["torch.Tensor"]:
        return self.model_tensors

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, self.context.numel)]

    def chunks(self, write: bool = False) -> Iterator[Chunk]:
        yield Chunk(0, self.context.numel, self.base, self.model_tensors, self.fisher_tensors,
                    out=self.out if write else None)


def merge_whole(method, params, base, models, context: TensorContext, fishers=()) -> "torch.Tensor":
    """method.merge() over whole tensors with the reference backend: the fp32 result, shaped."""
    from dtm_fast.merge.backends.reference import ReferenceBackend

    stream = WholeTensorStream(context, ReferenceBackend(), base, models, fishers)
    method.merge(params, stream)
    return stream.out.reshape(context.shape)
