"""Reading mergekit YAML configs, so mergekit users can switch without rewriting them, and get
mergekit's result (docs/merge.md lists every difference).

Read as mergekit reads them: `models` (each `model` + optional `parameters`), `merge_method`,
`base_model` (the task vectors' origin for methods that need one; for methods that ignore it, such as
linear, an ordinary input that mergekit adds to the models), `parameters` (a per-model parameter
given here applies to every model; a conditional whose filters match no tensor falls back to the
level above), `dtype` / `out_dtype` (computation is always fp32; these set the output dtype),
`tokenizer_source` (base, or a model whose tokenizer is copied), `chat_template` (auto, a named
template or Jinja text), and `slices` when one slice covers every layer of every model. Parameters
a method does not use are ignored with a warning naming them (mergekit ignores them silently).
Anything else that would change the result is refused by name, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.model_refs import resolve_model

TOP_LEVEL_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                  "slices", "chat_template"}
NOT_YET = {  # mergekit keys dtm does not read (yet), and what to do instead
    "modules": "give the merge as `models` (one merge of every module)",
    "tokenizer": "merge models that share one vocabulary (tokenizer_source: base or a model)",
}
MERGE_ONLY_PARAMETERS = {"int8_mask"}  # mergekit memory options with no effect on the result


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DtmError(f"{where}: 'parameters' must be a mapping")
    return {str(k): v for k, v in value.items() if k not in MERGE_ONLY_PARAMETERS}


def _models_from_slices(slices: Any, base_config_layers: int | None, where: str) -> list[dict]:
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise DtmError(f"{where}: 'slices' is read only as one slice covering every layer of every model "
                       "(layer stacking / frankenmerges are not supported yet)")
    sources = slices[0].get("sources")
    unknown = set(slices[0]) - {"sources", "parameters"}
    if unknown or not isinstance(sources, list) or not sources:
        raise DtmError(f"{where}: slices[0] may hold only 'sources' and 'parameters' (found {sorted(map(str, slices[0]))})")
    for index, source in enumerate(sources):
        if not isinstance(source, dict):
            raise DtmError(f"{where}: slices[0].sources[{index}] must be a mapping with 'model', got {source!r}")
        layer_range = source.get("layer_range", [])
        if (not isinstance(layer_range, list) or len(layer_range) not in (0, 2)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)):
            raise DtmError(f"{where}: slices[0].sources[{index}].layer_range must be [first, end] (two whole "
                           f"numbers), got {layer_range!r}")
    ranges = {tuple(s.get("layer_range", ())) for s in sources}
    if len(ranges) != 1:
        raise DtmError(f"{where}: every source of the slice must use the same layer_range")
    (layer_range,) = ranges
    if base_config_layers is not None and layer_range not in ((), (0, base_config_layers)):
        raise DtmError(f"{where}: layer_range {list(layer_range)} does not cover all {base_config_layers} layers; "
                       "only whole-model slices are supported yet")
    models = []
    for source in sources:
        extra = set(source) - {"model", "layer_range", "parameters"}
        if extra:
            raise DtmError(f"{where}: slice source option(s) {sorted(map(str, extra))} not supported")
        models.append({k: v for k, v in source.items() if k != "layer_range"})
    return models


def _usable(method, parameters: dict, level: str, where: str, ignored: list[str]) -> dict:
    """The parameters the method reads at this level; the others are noted in `ignored`."""
    scopes = {p.name: p.scope for p in method.params}
    kept = {}
    for name, value in parameters.items():
        if name in scopes and (level == "merge" or scopes[name] == "model"):
            kept[name] = value
        else:
            ignored.append(f"{name} ({where})")
    return kept


def load_mergekit_yaml(path: Path, output: Path, **options) -> MergeConfig:
    """Build a MergeConfig from a mergekit YAML file; `options` are the CLI's run options
    (max_memory, backend, resume, ...)."""
    from dtm_fast import ui
    from dtm_fast.io.text_files import load_yaml, read_text
    from dtm_fast.merge.methods import METHODS

    document = load_yaml(path, "mergekit config")
    if not isinstance(document, dict):
        raise DtmError(f"{path}: expected a mapping at the top level")
    where = str(path)
    for key, advice in NOT_YET.items():
        if key in document:
            raise DtmError(f"{where}: mergekit's '{key}' is not supported by dtm merge yet; {advice}")
    unknown = sorted(str(key) for key in set(document) - TOP_LEVEL_KEYS)
    if unknown:
        raise DtmError(f"{where}: mergekit option(s) {', '.join(unknown)} not supported by dtm merge; remove them "
                       "(they would change the result, so they are not ignored)")
    method_name = document.get("merge_method")
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise DtmError(f"{where}: merge_method {method_name!r} is not one of {', '.join(METHODS)}")
    method = METHODS[method_name]
    base = resolve_model(document["base_model"], path.parent, f"{where}: base_model") \
        if document.get("base_model") else None
    if "slices" in document and "models" in document:
        raise DtmError(f"{where}: give either 'models' or 'slices', not both")
    ignored: list[str] = []
    merge_parameters = _parameters(document.get("parameters"), where)
    if "slices" in document:
        layers = None
        if base is not None and (base / "config.json").is_file():
            from dtm_fast.io.checkpoint import load_json_object

            layers = load_json_object(base / "config.json").get("num_hidden_layers")
        raw_models = _models_from_slices(document["slices"], layers, where)
        slice_parameters = _parameters(document["slices"][0].get("parameters"), f"{where}: slices[0]")
        merge_parameters = {**merge_parameters, **slice_parameters}  # the slice's own come first
    else:
        raw_models = document.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise DtmError(f"{where}: 'models' must be a non-empty list")
    models, base_listed = [], False
    for index, item in enumerate(raw_models):
        item_where = f"{where}: models[{index}]"
        if not isinstance(item, dict) or "model" not in item:
            raise DtmError(f"{item_where}: each entry needs 'model'")
        extra = set(item) - {"model", "parameters"}
        if extra:
            raise DtmError(f"{item_where}: option(s) {sorted(map(str, extra))} not supported")
        model_path = resolve_model(item["model"], path.parent, item_where)
        parameters = _parameters(item.get("parameters"), item_where)
        is_base = base is not None and model_path.resolve() == base.resolve()
        base_listed |= is_base
        if is_base and method.base_role != "ignored":
            ignored += [f"{name} (models[{index}], the base model)" for name in parameters]
            continue  # the task vectors' origin, not one of the merged models
        models.append({"path": model_path, "parameters": _usable(method, parameters, "model", item_where, ignored)})
    if base is not None and method.base_role == "ignored":
        if not base_listed:
            models.append({"path": base, "parameters": {}})  # mergekit merges the base as an input too
        base = None
    merge_parameters = _usable(method, merge_parameters, "merge", "parameters", ignored)
    if ignored:
        ui.warn(f"{where}: {method_name} does not use, and ignores: {', '.join(ignored)}")
    if method_name in ("dare_linear", "dare_ties") and "rescale" not in merge_parameters:
        merge_parameters["rescale"] = "l1"  # mergekit's default for DARE: match each delta's L1 norm
    tokenizer_source = document.get("tokenizer_source")
    tokenizer_path = None
    if tokenizer_source not in (None, "base"):
        if tokenizer_source == "union":
            raise DtmError(f"{where}: tokenizer_source union (a merged vocabulary) is not supported by dtm merge "
                           "yet; merge models that share one vocabulary (tokenizer_source: base or a model)")
        tokenizer_path = resolve_model(tokenizer_source, path.parent, f"{where}: tokenizer_source")
    values = {"method": method_name, "models": models, "output": output, "base": base,
              "parameters": merge_parameters, "dtype": document.get("out_dtype") or document.get("dtype"),
              "tokenizer_source": tokenizer_path, "chat_template": document.get("chat_template"),
              "mergekit_config": read_text(path, "mergekit config")}
    return MergeConfig.from_dict({**values, **options}, source=where)
