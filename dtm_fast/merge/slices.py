"""Merges given as mergekit `slices`: the output's decoder layers are the slices' layers in order,
output layer j of a slice made from layer `first + j` of each of its sources; so a config can cut,
repeat and interleave layers of models of one architecture (frankenmerges, layer stacking) and
merge each slice with its own parameters. As mergekit: the tensors before the layers (the input
embeddings) come from the first slice's sources, those after them (final norm, lm_head) from the
last slice's; a gradient runs over each slice's layers (t = j / (layers - 1), 1 for one layer; 0
outside the layers); a parameter is looked up in the source's parameters, the slice's, then the
merge's. config.json gets the output's layer count."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dtm_fast.errors import DtmError
from dtm_fast.io.safetensors_format import TensorEntry
from dtm_fast.merge.methods.base import TensorParams
from dtm_fast.merge.plan import LAYER_INDEX, layer_index, plan_tensors
from dtm_fast.merge.slice_spec import SliceSource, SliceSpec
from dtm_fast.merge.sources import CheckpointSource, TensorInputs

if TYPE_CHECKING:
    from dtm_fast.io.checkpoint import Checkpoint
    from dtm_fast.merge.config import MergeConfig
    from dtm_fast.merge.inputs import Inputs

# tensors before the decoder layers (the rest of the non-layer tensors come after them)
INPUT_SIDE = re.compile(r"(embed_tokens|embed_in|wte|wpe|word_embeddings|embeddings)\b")


def renamed(name: str, layer: int) -> str:
    """`name` with its layer index replaced by `layer`."""
    match = LAYER_INDEX.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


class SlicedSource(CheckpointSource):
    def __init__(self, config: "MergeConfig", inputs: "Inputs"):
        self.config = config
        self.inputs = inputs
        method = config.method_impl
        checkpoints = list(inputs.models)
        outputs: list[tuple[str, TensorInputs, TensorParams, SliceSpec]] = []
        slices = config.slices
        first_model = checkpoints[slices[0].sources[0].model]
        non_layer = [name for name in _ordered(first_model) if layer_index(name) is None]
        for name in non_layer:
            if INPUT_SIDE.search(name):
                outputs.append(self._tensor(name, [name] * len(slices[0].sources), slices[0], 0.0))
        out_layer = 0
        for number, spec in enumerate(slices):
            template = checkpoints[spec.sources[0].model]
            for offset in range(spec.layers):
                t = offset / (spec.layers - 1) if spec.layers > 1 else 1.0
                source_layer = spec.sources[0].first + offset
                names = [n for n in _ordered(template) if layer_index(n) == source_layer]
                if not names:
                    raise DtmError(f"{config.source}: slices[{number}]: {template.label} has no layer {source_layer}")
                for name in names:
                    source_names = [renamed(name, s.first + offset) for s in spec.sources]
                    outputs.append(self._tensor(renamed(name, out_layer), source_names, spec, t))
                out_layer += 1
        for name in non_layer:
            if not INPUT_SIDE.search(name):
                outputs.append(self._tensor(name, [name] * len(slices[-1].sources), slices[-1], 0.0))
        self.output_layers = out_layer
        plan = plan_tensors([(name, entries.models[0].dtype, entries.models[0].shape) for name, entries, _, _ in outputs],
                            config.dtype, config.max_shard_size, config.max_shard_parameters)
        table, params = {}, {}
        merged = {t.name: t.merged for s in plan.shards for t in s.tensors}
        for name, entries, tensor_params, _ in outputs:
            if merged[name]:
                table[name] = TensorInputs(entries.base if method.reads_base else None, entries.models)
                params[name] = tensor_params
            else:
                table[name] = TensorInputs(None, ((entries.base or entries.models[0]),))
        super().__init__(config, inputs, plan, table, params)

    def _tensor(self, out_name: str, names: list[str], spec: SliceSpec, t: float):
        """(output name, its input entries, its parameters, its slice); names[i] is the tensor read
        from spec.sources[i]."""
        config = self.config
        found: list[TensorEntry] = []
        for source, name in zip(spec.sources, names):
            checkpoint = self._checkpoint(source)
            entry = checkpoint.tensors.get(name)
            if entry is None:
                raise DtmError(f"{config.source}: {checkpoint.label} has no tensor {name!r} (needed for {out_name!r})")
            found.append(entry)
        if len({(e.shape, e.dtype) for e in found}) > 1:
            detail = ", ".join(f"{self._checkpoint(s).label}: {list(e.shape)} {e.dtype}" for s, e in zip(spec.sources, found))
            raise DtmError(f"{config.source}: {out_name!r} would merge tensors of different shapes or dtypes ({detail})")
        merged = [s for s in spec.sources if not s.is_base]
        base = next((e for s, e in zip(spec.sources, found) if s.is_base), None)
        models = tuple(e for s, e in zip(spec.sources, found) if not s.is_base)
        model_levels = [(self._checkpoint(s).label, [s.parameters, spec.parameters, config.parameters]) for s in merged]
        params = config.resolve_params(out_name, t, [spec.parameters, config.parameters], model_levels)
        return out_name, TensorInputs(base, models), params, spec

    def _checkpoint(self, source: SliceSource) -> "Checkpoint":
        if source.is_base:
            return self.inputs.base
        return self.inputs.models[source.model]

    def check(self) -> None:
        method = self.config.method_impl
        for name, params in self.params.items():
            method.check_params(params, f"{self.config.source}: tensor {name!r}")

    def fingerprint_fields(self) -> dict:
        return {**super().fingerprint_fields(), "slices": [spec.describe() for spec in self.config.slices]}

    def provenance_fields(self) -> dict:
        return {"slices": [spec.describe() for spec in self.config.slices], "output_layers": self.output_layers}

    def config_updates(self) -> dict:
        return {"num_hidden_layers": self.output_layers}


def _ordered(checkpoint: "Checkpoint") -> list[str]:
    """Tensor names in file order (as plan_output lays them out)."""
    return [e.name for e in sorted(checkpoint.tensors.values(), key=lambda e: (str(e.path), e.offset))]
