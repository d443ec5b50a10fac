"""Reading mergekit YAML configs, so mergekit users can switch without rewriting them.

Supported: `models` (each `model` + optional `parameters`), `merge_method`, `base_model`,
`parameters`, `dtype` / `out_dtype` (we always compute in fp32; these set the output dtype),
`tokenizer_source: base`, `int8_mask` (mask storage only: results are identical), and `slices`
when there is exactly one slice whose sources all cover every layer (the usual SLERP config). Any
other key is refused by name: silently ignoring an option would give a different model than
mergekit without saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.merge.config import MergeConfig

TOP_LEVEL_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "slices"}
MERGE_ONLY_PARAMETERS = {"int8_mask"}  # mergekit memory options with no effect on the result


def _strip_merge_only(parameters: dict, where: str) -> dict:
    if not isinstance(parameters, dict):
        raise DtmError(f"{where}: 'parameters' must be a mapping")
    return {k: v for k, v in parameters.items() if k not in MERGE_ONLY_PARAMETERS}


def _resolve(path_text: Any, config_dir: Path, where: str) -> Path:
    if not isinstance(path_text, str):
        raise DtmError(f"{where}: expected a model path, got {path_text!r}")
    if "+" in path_text:
        raise DtmError(f"{where}: {path_text!r} uses mergekit's 'model+lora' syntax; give the LoRA adapter "
                       "directory itself as a model instead (dtm merge applies adapters to the base)")
    path = Path(path_text).expanduser()
    if not path.is_absolute() and not path.exists() and (config_dir / path).exists():
        path = config_dir / path
    if not path.exists():
        raise DtmError(f"{where}: model {path_text!r} not found (dtm_fast reads local directories only; "
                       "download hub models first)")
    return path


def _models_from_slices(slices: Any, base_config_layers: int | None, where: str) -> list[dict]:
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise DtmError(f"{where}: 'slices' is supported only as one slice covering every layer of every model "
                       "(layer stacking / frankenmerges are not supported)")
    sources = slices[0].get("sources")
    unknown = set(slices[0]) - {"sources"}
    if unknown or not isinstance(sources, list) or not sources:
        raise DtmError(f"{where}: slices[0] must hold only 'sources' (found {sorted(slices[0])})")
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
                       "only whole-model slices are supported")
    models = []
    for source in sources:
        extra = set(source) - {"model", "layer_range", "parameters"}
        if extra:
            raise DtmError(f"{where}: slice source option(s) {sorted(extra)} not supported")
        models.append({k: v for k, v in source.items() if k != "layer_range"})
    return models


def load_mergekit_yaml(path: Path, output: Path, **options) -> MergeConfig:
    """Build a MergeConfig from a mergekit YAML file; `options` are the CLI's run options
    (max_memory, backend, resume, ...)."""
    from dtm_fast.io.text_files import load_yaml

    document = load_yaml(path, "mergekit config")
    if not isinstance(document, dict):
        raise DtmError(f"{path}: expected a mapping at the top level")
    where = str(path)
    unknown = sorted(str(key) for key in set(document) - TOP_LEVEL_KEYS)
    if unknown:
        raise DtmError(f"{where}: mergekit option(s) {', '.join(unknown)} not supported by dtm merge; remove them "
                       "(they would change the result, so they are not ignored)")
    method = document.get("merge_method")
    if not isinstance(method, str):
        raise DtmError(f"{where}: needs 'merge_method'")
    tokenizer_source = document.get("tokenizer_source", "base")
    if tokenizer_source != "base":
        raise DtmError(f"{where}: tokenizer_source {tokenizer_source!r} not supported; only 'base' (tokenizer files "
                       "are copied from the base model)")
    base = _resolve(document["base_model"], path.parent, f"{where}: base_model") if document.get("base_model") else None
    if "slices" in document and "models" in document:
        raise DtmError(f"{where}: give either 'models' or 'slices', not both")
    if "slices" in document:
        layers = None
        if base is not None and (base / "config.json").is_file():
            from dtm_fast.io.checkpoint import load_json_object

            layers = load_json_object(base / "config.json").get("num_hidden_layers")
        raw_models = _models_from_slices(document["slices"], layers, where)
    else:
        raw_models = document.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise DtmError(f"{where}: 'models' must be a non-empty list")
    models = []
    for index, item in enumerate(raw_models):
        item_where = f"{where}: models[{index}]"
        if not isinstance(item, dict) or "model" not in item:
            raise DtmError(f"{item_where}: each entry needs 'model'")
        extra = set(item) - {"model", "parameters"}
        if extra:
            raise DtmError(f"{item_where}: option(s) {sorted(extra)} not supported")
        model_path = _resolve(item["model"], path.parent, item_where)
        parameters = _strip_merge_only(item.get("parameters") or {}, item_where)
        if base is not None and model_path.resolve() == base.resolve():
            if parameters and method not in ("slerp",):
                raise DtmError(f"{item_where}: parameters given for the base model are not used by {method}")
            continue  # mergekit lists the base among the models; it is the base here
        models.append({"path": model_path, "parameters": parameters})
    parameters = _strip_merge_only(document.get("parameters") or {}, where)
    if method in ("dare_linear", "dare_ties") and "rescale" not in parameters:
        parameters["rescale"] = "l1"  # mergekit's default for DARE: match each delta's L1 norm
    values = {"method": method, "models": models, "output": output, "base": base, "parameters": parameters,
              "dtype": document.get("out_dtype") or document.get("dtype")}
    return MergeConfig.from_dict({**values, **options}, source=where)
