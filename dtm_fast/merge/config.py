"""The merge configuration: a frozen dataclass built from CLI options or a mergekit YAML file, and
the resolution of per-tensor parameter values.

A parameter value is a number/bool/string; a list of numbers (a gradient: interpolated along the
layers, t = layer / (layers - 1), t = 0 for tensors outside the layers, as mergekit does); or a list
of {filter, value} conditionals (the first whose filter is a substring of the tensor name, or
"*"/absent, applies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from dtm_fast.errors import DtmError
from dtm_fast.io.dtypes import NAME_TO_TAG as DTYPE_NAMES  # user-facing name -> safetensors tag
from dtm_fast.merge.budget import DEFAULT_MAX_MEMORY  # the one default budget
from dtm_fast.merge.methods.base import REQUIRED, MergeMethod, Param, TensorParams
from dtm_fast.merge.slice_spec import SliceSpec

if TYPE_CHECKING:
    from dtm_fast.merge.vocab import TokenizerSpec

LORA_MODES = ("exact-concat", "materialize", "factor-average")
BACKENDS = ("auto", "reference", "cpu", "triton")
BOOLEAN_SETTINGS = ("allow_pickle", "resume", "overwrite", "verify_inputs", "strict", "copy_tokenizer",
                    "write_model_card")
INTEGER_SETTINGS = ("seed", "shard_index", "num_shards")
TEXT_SETTINGS = ("method", "backend", "lora_mode", "chat_template", "mergekit_config")
DEFAULT_MAX_SHARD = 5 * 1000**3


def parse_size(text: str | int, what: str) -> int:
    """'512MiB', '5GB', '1.5GiB', '1000000' -> bytes."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise DtmError(f"{what}: expected a size such as 512MiB, got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise DtmError(f"{what}: must be positive, got {text!r}")
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
             "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "k": 1024, "m": 1024**2, "g": 1024**3, "b": 1}
    cleaned = str(text).strip().lower().replace(" ", "")
    for suffix in sorted(units, key=len, reverse=True):
        if cleaned.endswith(suffix):
            number, scale = cleaned[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = cleaned, 1
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount * scale >= 2**62:
        raise DtmError(f"{what}: cannot read {text!r} as a size (examples: 512MiB, 4GiB, 5GB)")
    value = int(amount * scale)
    if value <= 0:
        raise DtmError(f"{what}: must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class ModelInput:
    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    adapter: Path | None = None  # a LoRA adapter applied to this model on the fly (mergekit's model+lora)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[ModelInput, ...]
    output: Path
    base: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # safetensors tag; None keeps the input dtype
    max_memory: int = DEFAULT_MAX_MEMORY
    max_shard_size: int = DEFAULT_MAX_SHARD
    backend: str = "auto"
    seed: int = 0
    lora_mode: str = "materialize"
    allow_pickle: bool = False
    resume: bool = False
    overwrite: bool = False
    shard_index: int = 0
    num_shards: int = 1
    verify_inputs: bool = False  # also hash every input file's content for the resume check and provenance
    strict: bool = False  # a NaN or infinity in any input stops the merge
    max_shard_parameters: int | None = None  # mergekit's out_shard_size: elements per shard (over max_shard_size)
    copy_tokenizer: bool = True
    tokenizer_source: Path | None = None  # the model directory whose tokenizer is copied (None: base or first)
    chat_template: str | None = None  # auto, a template name or Jinja text, set on the copied tokenizer
    tokenizer: "TokenizerSpec | None" = None  # an output vocabulary built from the models' (merge/vocab.py)
    write_model_card: bool = False  # README.md with the config and provenance
    mergekit_config: str | None = None  # the config as given (YAML text), written as mergekit_config.yml
    slices: tuple[SliceSpec, ...] | None = None  # mergekit slices: the output's layers, slice by slice
    source: str = "command line"  # where the values came from, for error messages

    def __post_init__(self):
        from dtm_fast.merge.methods import METHODS

        if self.method not in METHODS:
            raise DtmError(f"{self.source}: unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.models:
            raise DtmError(f"{self.source}: no models to merge")
        if self.lora_mode not in LORA_MODES:
            raise DtmError(f"{self.source}: lora mode {self.lora_mode!r} unknown; choose one of {', '.join(LORA_MODES)}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise DtmError(f"{self.source}: --shard-index must be in [0, --num-shards) (got {self.shard_index} of {self.num_shards})")
        method = METHODS[self.method]
        if method.needs_base and self.base is None:
            raise DtmError(f"{self.source}: {self.method} needs a base model (--base)")
        if self.slices is None:
            method.check_model_count(len(self.models))
        else:
            self._check_slices(method)
        known = {p.name: p for p in method.params}
        for name in self.parameters:
            if name not in known:
                raise DtmError(f"{self.source}: {self.method} has no parameter {name!r} (it takes: {', '.join(known) or 'none'})")
        for model in self.models:
            for name in model.parameters:
                if name not in known:
                    raise DtmError(f"{self.source}: model {model.path}: {self.method} has no parameter {name!r} "
                                   f"(it takes: {', '.join(known) or 'none'})")
                if known[name].scope == "global":
                    raise DtmError(f"{self.source}: model {model.path}: {name!r} is shared by all models; "
                                   "give it once under the merge's parameters")
        for param in method.params:  # required ones are present, and every value is checked up front
            if param.scope == "model":
                for model in self.models:
                    value = model.parameters.get(param.name, self.parameters.get(param.name, param.default))
                    if value is REQUIRED:
                        raise DtmError(f"{self.source}: model {model.path} needs parameter {param.name!r}")
                    where = f"{self.source}: model {model.path}"
                    _walk_values(value, lambda v: _check_value(param, v, where), f"{where}: parameter {param.name!r}")
            else:
                value = self.parameters.get(param.name, param.default)
                if value is REQUIRED:
                    raise DtmError(f"{self.source}: {self.method} needs parameter {param.name!r}")
                _walk_values(value, lambda v: _check_value(param, v, self.source),
                             f"{self.source}: parameter {param.name!r}")

    def _check_slices(self, method: MergeMethod) -> None:
        """Every slice is a valid merge of its sources, and every value in it is checked."""
        known = {p.name: p for p in method.params}
        for number, spec in enumerate(self.slices):
            where = f"{self.source}: slices[{number}]"
            if not spec.sources or len({s.layers for s in spec.sources}) != 1 or spec.layers < 1:
                raise DtmError(f"{where}: every source must give the same, non-empty number of layers")
            if method.needs_base and spec.base is None:
                raise DtmError(f"{where}: {self.method} needs the base model among the slice's sources")
            try:
                method.check_model_count(len(spec.merged))
            except DtmError as error:
                raise DtmError(f"{where}: {error}") from None
            for level, parameters in [("parameters", spec.parameters)] + [
                    (f"sources[{i}].parameters", s.parameters) for i, s in enumerate(spec.sources)]:
                for name, value in parameters.items():
                    if name not in known:
                        raise DtmError(f"{where}.{level}: {self.method} has no parameter {name!r}")
                    _walk_values(value, lambda v, p=known[name]: _check_value(p, v, f"{where}.{level}"),
                                 f"{where}.{level}: parameter {name!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "command line") -> "MergeConfig":
        """The one way a merge configuration is built: from plain values, as the command line, a
        `dtm run` config or a mergekit YAML gives them. Sizes are parsed here ("2GiB"), types are
        checked, and every error names the setting. `models` holds paths, or mappings with `path`
        (or mergekit's `model`) and `parameters`."""
        allowed = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(str(key) for key in values if key not in allowed)
        if unknown:
            raise DtmError(f"{source}: unknown merge setting(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
        for required in ("method", "models", "output"):
            if values.get(required) in (None, "", [], ()):
                raise DtmError(f"{source}: the merge needs '{required}'")
        settings: dict[str, Any] = {"source": source}
        for name, value in values.items():
            where = f"{source}: {name}"
            if name in TEXT_SETTINGS:
                settings[name] = None if value is None and name not in ("method",) else _text(value, where)
            elif name in ("output", "base", "tokenizer_source"):
                settings[name] = None if value is None else Path(_text(value, where)).expanduser()
            elif name == "models":
                settings[name] = _models(value, where)
            elif name == "parameters":
                if not isinstance(value, Mapping):
                    raise DtmError(f"{where}: expected a mapping of parameter names to values, got {value!r}")
                settings[name] = {str(k): v for k, v in value.items()}
            elif name == "dtype":
                settings[name] = None if value is None else _dtype_tag(value, where)
            elif name in ("max_memory", "max_shard_size"):
                settings[name] = parse_size(value, where)
            elif name in BOOLEAN_SETTINGS:
                if not isinstance(value, bool):
                    raise DtmError(f"{where}: expected true or false, got {value!r}")
                settings[name] = value
            elif name in INTEGER_SETTINGS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DtmError(f"{where}: expected a whole number, got {value!r}")
                settings[name] = value
            elif name == "slices":
                if value is not None and not (isinstance(value, (tuple, list)) and
                                              all(isinstance(v, SliceSpec) for v in value)):
                    raise DtmError(f"{where}: expected slices as read from a mergekit config")
                settings[name] = tuple(value) if value is not None else None
            elif name == "tokenizer":
                from dtm_fast.merge.vocab import TokenizerSpec

                if value is not None and not isinstance(value, TokenizerSpec):
                    raise DtmError(f"{where}: expected a tokenizer setting as read from a mergekit config")
                settings[name] = value
            elif name == "max_shard_parameters":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise DtmError(f"{where}: expected a positive whole number of parameters, got {value!r}")
                settings[name] = value
        if settings.get("backend", "auto") not in BACKENDS:
            raise DtmError(f"{source}: backend: {settings['backend']!r} is not one of {', '.join(BACKENDS)}")
        return cls(**settings)

    @property
    def method_impl(self) -> MergeMethod:
        from dtm_fast.merge.methods import METHODS

        return METHODS[self.method]

    def tensor_params(self, tensor_name: str, layer: int | None, num_layers: int | None) -> TensorParams:
        """Concrete parameter values for one tensor. A per-model parameter is looked up in the
        model's parameters, then in the merge's; a conditional whose filters match nothing falls
        back to the next level, then to the default (as mergekit resolves them)."""
        t = 0.0
        if layer is not None and num_layers:
            t = layer / (num_layers - 1) if num_layers > 1 else 1.0
        return self.resolve_params(tensor_name, t, [self.parameters],
                                   [(str(m.path), [m.parameters, self.parameters]) for m in self.models])

    def resolve_params(self, tensor_name: str, t: float, shared_levels: list[dict],
                       model_levels: list[tuple[str, list[dict]]]) -> TensorParams:
        """Parameters from levels of settings, highest precedence first: `shared_levels` for the
        global ones, one (label, levels) per merged model for the per-model ones."""
        values: dict[str, Any] = {}
        per_model: dict[str, tuple[Any, ...]] = {}
        for param in self.method_impl.params:
            where = f"{self.source}: parameter {param.name!r} for tensor {tensor_name!r}"
            if param.scope == "global":
                values[param.name] = _coerce(param, _first_match(param, shared_levels, tensor_name, t, where), where)
            else:
                per_model[param.name] = tuple(
                    _coerce(param, _first_match(param, levels, tensor_name, t, f"{where} of model {label}"), where)
                    for label, levels in model_levels)
        return TensorParams(values, per_model)


def _text(value: Any, where: str) -> str:
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise DtmError(f"{where}: expected text, got {value!r}")
    return value


def _models(value: Any, where: str) -> tuple[ModelInput, ...]:
    if not isinstance(value, (list, tuple)):
        raise DtmError(f"{where}: expected a list of models, got {value!r}")
    models = []
    for index, item in enumerate(value):
        item_where = f"{where}[{index}]"
        if isinstance(item, Mapping):
            unknown = set(item) - {"path", "model", "parameters", "adapter"}
            if unknown:
                raise DtmError(f"{item_where}: unknown key(s) {sorted(map(str, unknown))}; give path and parameters")
            path = item.get("path", item.get("model"))
            parameters = item.get("parameters") or {}
            if not isinstance(parameters, Mapping):
                raise DtmError(f"{item_where}.parameters: expected a mapping, got {parameters!r}")
            adapter = item.get("adapter")
            models.append(ModelInput(Path(_text(path, f"{item_where}.path")).expanduser(),
                                     {str(k): v for k, v in parameters.items()},
                                     Path(_text(adapter, f"{item_where}.adapter")).expanduser() if adapter else None))
        else:
            models.append(ModelInput(Path(_text(item, item_where)).expanduser()))
    return tuple(models)


def _dtype_tag(value: Any, where: str) -> str:
    from dtm_fast.io.dtypes import OUTPUT_DTYPE_NAMES

    if isinstance(value, str) and value in DTYPE_NAMES:
        return DTYPE_NAMES[value]
    if isinstance(value, str) and value in DTYPE_NAMES.values():
        return value
    raise DtmError(f"{where}: dtype {value!r} not supported; use {', '.join(OUTPUT_DTYPE_NAMES)}")


def _walk_values(value: Any, visit, where: str) -> None:
    """Apply `visit` to every leaf value of a scalar, gradient or list of conditionals, refusing
    any other shape (a mapping where a value belongs, a conditional without its value)."""
    if isinstance(value, dict) and "value" in value:
        value = [value]  # one conditional, as mergekit writes it without a list
    if isinstance(value, list):
        if not value:
            raise DtmError(f"{where}: an empty list is not a value")
        for item in value:
            if isinstance(item, dict):
                if "value" not in item:
                    raise DtmError(f"{where}: a conditional entry needs 'value' (and optionally 'filter'), "
                                   f"got {item!r}")
                unknown = set(item) - {"filter", "value"}
                if unknown:
                    raise DtmError(f"{where}: conditional entry has unsupported key(s) {sorted(map(str, unknown))}")
                if not isinstance(item.get("filter", ""), (str, type(None))):
                    raise DtmError(f"{where}: a conditional's 'filter' must be text, got {item['filter']!r}")
                _walk_values(item["value"], visit, where)
            else:
                _walk_values(item, visit, where)
    elif isinstance(value, dict):
        raise DtmError(f"{where}: expected a value, a list of values or a list of {{filter, value}} entries, "
                       f"got a mapping {value!r}")
    else:
        visit(value)


def _coerce(param: Param, value: Any, where: str) -> Any:
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        raise DtmError(f"{where}: expected true or false, got {value!r}")
    if param.kind is str:
        if isinstance(value, bool) and param.name == "rescale":
            return "l1" if value else "none"  # mergekit's boolean rescale matches L1 norms
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DtmError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise DtmError(f"{where}: must be a finite number, got {value!r}")
    if param.kind is int and value != int(value):
        raise DtmError(f"{where}: expected a whole number, got {value!r}")
    return param.kind(value)


def _check_value(param: Param, value: Any, where: str) -> None:
    coerced = _coerce(param, value, f"{where}: parameter {param.name!r}")
    if param.check is not None:
        complaint = param.check(coerced)
        if complaint:
            raise DtmError(f"{where}: parameter {param.name!r} = {value!r} {complaint}")


NO_MATCH = object()  # a conditional setting none of whose filters matches the tensor


def _first_match(param: Param, levels: list[dict], tensor_name: str, t: float, where: str) -> Any:
    for level in levels:
        if param.name in level:
            value = resolve_value(level[param.name], tensor_name, t, where)
            if value is not NO_MATCH:
                return value
    if param.default is REQUIRED:
        raise DtmError(f"{where}: no setting applies to this tensor (every filter given misses it) and the "
                       "parameter has no default; add an entry without a filter")
    return param.default


def resolve_value(value: Any, tensor_name: str, t: float, where: str) -> Any:
    """A setting's value for one tensor: a scalar, a gradient over the layers (t in [0, 1]), or the
    first conditional whose filter is in the tensor's name (NO_MATCH when none is)."""
    if isinstance(value, dict):
        value = [value]  # one conditional
    if not isinstance(value, list):
        return value
    if not value:
        raise DtmError(f"{where}: an empty list is not a value")
    if all(isinstance(item, dict) for item in value):
        for item in value:
            if "value" not in item:
                raise DtmError(f"{where}: a conditional entry needs 'value' (and optionally 'filter')")
            unknown = set(item) - {"filter", "value"}
            if unknown:
                raise DtmError(f"{where}: conditional entry has unsupported key(s) {sorted(unknown)}")
            pattern = item.get("filter")
            if pattern in (None, "*") or str(pattern) in tensor_name:
                return resolve_value(item["value"], tensor_name, t, where)
        return NO_MATCH
    if any(isinstance(item, dict) for item in value):
        raise DtmError(f"{where}: mixes conditionals and plain values")
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * value[low] + fraction * value[high]
