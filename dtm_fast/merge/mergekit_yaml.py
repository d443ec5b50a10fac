"""Reading mergekit YAML configs, so mergekit users can switch without rewriting them, and get
mergekit's result (docs/merge.md lists every difference).

Read as mergekit reads them: `models` (each `model` + optional `parameters`), `merge_method`,
`base_model` (the task vectors' origin for methods that need one; for methods that ignore it, such as
linear, an ordinary input that mergekit adds to the models), `parameters` (a per-model parameter
given here applies to every model; a conditional whose filters match no tensor falls back to the
level above), `dtype` / `out_dtype` (computation is always fp32; these set the output dtype),
`tokenizer_source` (union, base or a model) and `tokenizer` (source, per-token embedding sources,
pad_to_multiple_of): the output vocabulary and each input's embedding rows over it, as mergekit
builds them (merge/vocab.py), `chat_template` (auto, a named template or Jinja text), `slices` (a
slice's own base_model where it is the merge's one base), and `modules` with the one module of a
causal LM, `default`. Parameters
a method does not use are ignored with a warning naming them (mergekit ignores them silently).
Anything else that would change the result is refused by name, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.merge.config import MergeConfig
from dtm_fast.merge.model_refs import resolve_model, resolve_reference

TOP_LEVEL_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                  "tokenizer", "slices", "chat_template", "modules"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what transformers needs to load a tokenizer
MERGE_ONLY_PARAMETERS = {"int8_mask"}  # mergekit memory options with no effect on the result


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DtmError(f"{where}: 'parameters' must be a mapping")
    return {str(k): v for k, v in value.items() if k not in MERGE_ONLY_PARAMETERS}


def _entries(value: Any, what: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise DtmError(f"{where}: '{what}' must be a non-empty list")
    return value


def _model_entry(item: Any, allowed: set[str], where: str) -> dict:
    """One `model:` entry of a list, with only the allowed keys."""
    if not isinstance(item, dict) or "model" not in item:
        raise DtmError(f"{where}: expected a mapping with 'model'")
    extra = set(item) - allowed
    if extra:
        raise DtmError(f"{where}: option(s) {sorted(map(str, extra))} not supported")
    return item


def _layer_count(model: Path) -> int | None:
    if not (model / "config.json").is_file():
        return None
    from dtm_fast.io.checkpoint import load_json_object

    value = load_json_object(model / "config.json").get("num_hidden_layers")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_slices(slices: Any, config_dir: Path, where: str) -> list[dict]:
    """Each slice as {"parameters", "sources": [{"path", "range", "parameters", "where"}]}, checked."""
    if not isinstance(slices, list) or not slices:
        raise DtmError(f"{where}: 'slices' must be a non-empty list")
    result = []
    for number, item in enumerate(slices):
        slice_where = f"{where}: slices[{number}]"
        if not isinstance(item, dict):
            raise DtmError(f"{slice_where}: expected a mapping with 'sources'")
        unknown = set(item) - {"sources", "parameters"}
        if unknown:
            raise DtmError(f"{slice_where}: unknown key(s) {sorted(map(str, unknown))} (a slice holds sources and "
                           "parameters)")
        read = []
        for index, source in enumerate(_entries(item.get("sources"), "sources", slice_where)):
            source_where = f"{slice_where}.sources[{index}]"
            _model_entry(source, {"model", "layer_range", "parameters"}, source_where)
            layer_range = source.get("layer_range")
            if layer_range is not None and (
                    not isinstance(layer_range, list) or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                    or not 0 <= layer_range[0] < layer_range[1]):
                raise DtmError(f"{source_where}.layer_range must be [first, end] with 0 <= first < end, got "
                               f"{layer_range!r}")
            path = resolve_model(source["model"], config_dir, source_where)
            layers = _layer_count(path)
            if layer_range is None:
                if layers is None:
                    raise DtmError(f"{source_where}: needs layer_range ({path} has no config.json to count its layers)")
                layer_range = [0, layers]
            if layers is not None and layer_range[1] > layers:
                raise DtmError(f"{source_where}.layer_range {layer_range} goes past the {layers} layers of {path}")
            read.append({"path": path, "range": tuple(layer_range), "where": source_where,
                         "parameters": _parameters(source.get("parameters"), source_where)})
        if len({s["range"][1] - s["range"][0] for s in read}) != 1:
            raise DtmError(f"{slice_where}: every source must give the same number of layers")
        result.append({"parameters": _parameters(item.get("parameters"), slice_where), "sources": read})
    return result


def _whole_model(slices: list[dict]) -> bool:
    """One slice of every layer of every source: the same merge as `models`."""
    if len(slices) != 1:
        return False
    return all(s["range"] == (0, _layer_count(s["path"])) for s in slices[0]["sources"])


def _slice_specs(slices: list[dict], base: Path | None, method, ignored: list[str]):
    """(models, specs): the distinct merged checkpoints, and each slice with indices into them."""
    from dtm_fast.merge.slice_spec import SliceSource, SliceSpec

    paths: list[Path] = []
    specs = []
    for item in slices:
        sources = []
        for source in item["sources"]:
            is_base = base is not None and source["path"].resolve() == base.resolve()
            if is_base:
                ignored += [f"{name} ({source['where']}, the base model)" for name in source["parameters"]]
                sources.append(SliceSource(-1, *source["range"], {}, True))
                continue
            resolved = [p.resolve() for p in paths]
            if source["path"].resolve() not in resolved:
                paths.append(source["path"])
                resolved.append(source["path"].resolve())
            sources.append(SliceSource(resolved.index(source["path"].resolve()), *source["range"],
                                       _usable(method, source["parameters"], "model", source["where"], ignored)))
        specs.append(SliceSpec(tuple(sources), _usable(method, item["parameters"], "merge", "slice", ignored)))
    return [{"path": path, "parameters": {}} for path in paths], tuple(specs)


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


def _model_entries(raw_models: Any, base: Path | None, method, path: Path, where: str, ignored: list[str]) -> list[dict]:
    models = []
    for index, item in enumerate(_entries(raw_models, "models", where)):
        item_where = f"{where}: models[{index}]"
        _model_entry(item, {"model", "parameters"}, item_where)
        model_path, adapter = resolve_reference(item["model"], path.parent, item_where)
        parameters = _parameters(item.get("parameters"), item_where)
        if base is not None and model_path.resolve() == base.resolve() and method.base_role != "ignored" \
                and adapter is None:
            ignored += [f"{name} (models[{index}], the base model)" for name in parameters]
            continue  # the task vectors' origin, not one of the merged models
        models.append({"path": model_path, "adapter": adapter,
                       "parameters": _usable(method, parameters, "model", item_where, ignored)})
    return models


def _module(document: dict, where: str) -> dict:
    """mergekit's `modules:` for a causal LM: its one module, `default`, is the whole model, so its
    models or slices are the merge's and its parameters sit between the slices' and the top level's."""
    if "modules" not in document:
        return document
    modules = document["modules"]
    if "models" in document or "slices" in document:
        raise DtmError(f"{where}: give either 'modules' or 'models' / 'slices', not both")
    if not isinstance(modules, dict) or set(modules) != {"default"}:
        names = sorted(map(str, modules)) if isinstance(modules, dict) else modules
        raise DtmError(f"{where}: modules {names!r}: dtm merges causal language models, whose one module is "
                       "'default'; multi-module models (vision-language and the like) are not supported")
    module = modules["default"]
    if not isinstance(module, dict) or set(module) - {"models", "slices", "parameters"} \
            or ("models" in module) == ("slices" in module):
        raise DtmError(f"{where}: modules.default must hold either models or slices (and optionally parameters)")
    result = {k: v for k, v in document.items() if k != "modules"}
    result.update({k: v for k, v in module.items() if k != "parameters"})
    if module.get("parameters") is not None:
        result["parameters"] = {**_parameters(document.get("parameters"), where),
                                **_parameters(module["parameters"], f"{where}: modules.default")}
    return result


def _slice_bases(document: dict, config_dir: Path, where: str, ignored: list[str]) -> dict:
    """A slice's own base_model, accepted where it is the merge's one base (dtm has a single base
    per merge); residual_weight, which mergekit reads but never uses, is ignored and named."""
    slices = document.get("slices")
    if not isinstance(slices, list):
        return document
    bases = {}
    for number, item in enumerate(slices):
        if isinstance(item, dict) and item.get("base_model") is not None:
            at = f"{where}: slices[{number}].base_model"
            bases[resolve_model(item["base_model"], config_dir, at).resolve()] = item["base_model"]
        if isinstance(item, dict) and "residual_weight" in item:
            ignored.append(f"residual_weight (slices[{number}], unused by mergekit too)")
    top = document.get("base_model")
    if top is not None:
        bases.setdefault(resolve_model(top, config_dir, f"{where}: base_model").resolve(), top)
    if len(bases) > 1:
        raise DtmError(f"{where}: the slices name different base models ({', '.join(map(str, bases.values()))}); "
                       "dtm merges with one base, so give the same base_model to every slice")
    result = dict(document)
    result["slices"] = [{k: v for k, v in item.items() if k not in ("base_model", "residual_weight")}
                        if isinstance(item, dict) else item for item in slices]
    if bases and top is None:
        result["base_model"] = next(iter(bases.values()))
    return result


def _tokenizer(document: dict, base: Path | None, inputs: list[Path], config_dir: Path, where: str):
    """(TokenizerSpec or None, directory whose tokenizer files are copied or None). `tokenizer:`
    wins over `tokenizer_source` (as in mergekit). base / a model with every input's tokenizer
    loadable is mergekit's vocabulary alignment; without loadable tokenizers it is a plain copy of
    that model's files (the same result where the vocabularies agree; the merge refuses otherwise)."""
    from dtm_fast.merge.vocab import SOURCE_BASE, TokenizerSpec, read_source, read_tokenizer_spec

    def resolve(name: str, at: str) -> Path:
        return resolve_model(name, config_dir, at)

    if document.get("tokenizer") is not None:
        return read_tokenizer_spec(document["tokenizer"], resolve, base, where), None
    value = document.get("tokenizer_source")
    if value is None:
        return None, None
    source = read_source(value, resolve, f"{where}: tokenizer_source")
    directories = inputs + ([source] if isinstance(source, Path) else [])
    loadable = all(any((p / name).is_file() for name in TOKENIZER_FILES) for p in directories)
    if source == "union" or loadable:
        return TokenizerSpec(source, (), None, base), None
    return None, None if source == SOURCE_BASE else source


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
    ignored: list[str] = []
    document = _slice_bases(_module(document, where), path.parent, where, ignored)
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
    declared_base = base  # mergekit's tokenizer base, even for a method that merges it as an input
    if "slices" in document and "models" in document:
        raise DtmError(f"{where}: give either 'models' or 'slices', not both")
    merge_parameters = _parameters(document.get("parameters"), where)
    slice_specs = None
    if "slices" in document:
        slices = _read_slices(document["slices"], path.parent, where)
        if _whole_model(slices):  # the usual SLERP config: one slice of whole models
            raw_models = [{"model": str(s["path"]), "parameters": s["parameters"]} for s in slices[0]["sources"]]
            merge_parameters = {**merge_parameters, **slices[0]["parameters"]}  # the slice's own come first
        else:
            raw_models = None
    else:
        raw_models = document.get("models")
    if "slices" in document and raw_models is None:
        models, slice_specs = _slice_specs(slices, base if method.base_role != "ignored" else None, method, ignored)
        if method.base_role == "ignored":
            base = None
        if not models:
            raise DtmError(f"{where}: the slices merge no model besides the base")
    else:
        models = _model_entries(raw_models, base, method, path, where, ignored)
        if base is not None and method.base_role == "ignored":
            if not any(m["path"].resolve() == base.resolve() for m in models):
                models.append({"path": base, "parameters": {}})  # mergekit merges the base as an input too
            base = None
    merge_parameters = _usable(method, merge_parameters, "merge", "parameters", ignored)
    if ignored:
        ui.warn(f"{where}: {method_name} does not use, and ignores: {', '.join(ignored)}")
    if method_name in ("dare_linear", "dare_ties") and "rescale" not in merge_parameters:
        merge_parameters["rescale"] = "l1"  # mergekit's default for DARE: match each delta's L1 norm
    inputs = ([base] if base is not None else []) + [m["path"] for m in models]
    tokenizer_spec, tokenizer_path = _tokenizer(document, declared_base, inputs, path.parent, where)
    values = {"method": method_name, "models": models, "output": output, "base": base, "slices": slice_specs,
              "parameters": merge_parameters, "dtype": document.get("out_dtype") or document.get("dtype"),
              "tokenizer_source": tokenizer_path, "tokenizer": tokenizer_spec, "chat_template": document.get("chat_template"),
              "mergekit_config": read_text(path, "mergekit config")}
    return MergeConfig.from_dict({**values, **options}, source=where)
