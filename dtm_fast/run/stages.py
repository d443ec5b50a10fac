"""The stages of a DTM run, where each one writes, and whether its output is current.

    base       (only for a GGUF base) the de-quantised model as a Hugging Face directory
    disperse   portions/portion-{i}.jsonl + manifest.json
    train      sub-{i}/ for each portion, vanilla/ on all portions (dtm_train.json in each)
    merge      merged/ (dtm_merge.json)
    eval       report/report.{json,md,png}

A stage is current when its output's manifest records exactly the inputs (by content hash) and the
parameters this config asks for. disperse and train use their own manifests (`manifest.json`,
`dtm_train.json`), so outputs made by `dtm disperse` / `dtm train` count too. The merge manifest
identifies its inputs by header only, which does not change when a sub-model is retrained, so merge
and eval also get a record under state/ that names the exact trained models they consumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.run.config import RunConfig

BASE_MANIFEST = "dtm_base.json"
# TrainConfig fields that change how a job runs or is checkpointed, never the weights it exports
TRAIN_OPERATIONAL_FIELDS = ("resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                            "max_shard_size_mb")


# ---- where things go -------------------------------------------------------------------------
def base_dir(config: RunConfig) -> Path:
    """The base model every stage reads: the user's directory, or its GGUF converted in the run."""
    return config.run_dir / "base" if config.gguf_file else config.base_model


def portions_dir(config: RunConfig) -> Path:
    return config.run_dir / "portions"


def job_dir(config: RunConfig, name: str) -> Path:
    return config.run_dir / name


def train_config_path(config: RunConfig, name: str) -> Path:
    return config.run_dir / "train-configs" / f"{name}.yaml"


def materialized_dir(config: RunConfig, name: str) -> Path:
    """LoRA jobs: the adapter applied to the base as a full model, for the evaluation to load."""
    return config.run_dir / "materialized" / name


def merged_dir(config: RunConfig) -> Path:
    return config.run_dir / "merged"


def report_dir(config: RunConfig) -> Path:
    return config.run_dir / "report"


def state_dir(config: RunConfig) -> Path:
    return config.run_dir / "state"


# ---- content hashes, cached by (size, mtime) so a 7B base is hashed once per run directory ----------
class HashCache:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except json.JSONDecodeError:
                self.entries = {}  # a damaged cache only costs a rehash

    def sha256(self, file: Path) -> str:
        from dtm_fast.train.manifest import file_sha256

        stat = file.stat()
        key = str(file.resolve())
        cached = self.entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = file_sha256(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._save()
        return digest

    def _save(self) -> None:
        if not self.path.parent.is_dir():
            return  # a dry run of a new run directory creates nothing
        temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.entries))
        os.replace(temporary, self.path)


def hash_cache(config: RunConfig) -> HashCache:
    return HashCache(state_dir(config) / "hashes.json")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path)


# ---- each stage's own config --------------------------------------------------------------------
def _reprefix(error: DtmError, where: str, section: str) -> DtmError:
    message = str(error)
    for prefix in (f"{section}: ", "config: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return DtmError(f"{where}: {section}: {message}")


def disperse_config(config: RunConfig):
    from dtm_fast.disperse.config import DisperseConfig

    values = dict(config.disperse)
    if isinstance(values.get("encoder"), str) and not Path(values["encoder"]).is_absolute():
        values["encoder"] = str(config.config_path.parent / values["encoder"])
    values.update(inputs=tuple(str(p) for p in config.data), output_dir=str(portions_dir(config)), k=config.k,
                  overwrite=True)  # the run owns portions/: a stale dispersal there is replaced
    try:
        return DisperseConfig.from_dict(values)
    except DtmError as error:
        raise _reprefix(error, config.where, "disperse") from None


def train_config(config: RunConfig, name: str, resume: bool = False):
    """The TrainConfig of job `name` (sub-{i} or vanilla): every path absolute, so the YAML written
    for it runs from any directory (a SLURM node's included)."""
    from dtm_fast.train.config import FIELD_NAMES, load_config

    for key in config.train:
        if key not in FIELD_NAMES:
            import difflib

            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(FIELD_NAMES)}"
            raise DtmError(f"{config.where}: train: unknown key {key!r}; {hint}")
    if name == "vanilla":
        data = [str(portions_dir(config) / f"portion-{i}.jsonl") for i in range(config.k)]
    else:
        data = [str(portions_dir(config) / f"portion-{int(name.split('-')[1])}.jsonl")]
    values = dict(config.train)
    values.update(model=str(base_dir(config)), data=data, output_dir=str(job_dir(config, name)), resume=resume)
    try:
        return load_config(None, values)
    except DtmError as error:
        raise _reprefix(error, config.where, "train") from None


def lora_training(config: RunConfig) -> bool:
    return config.train.get("finetuning", "full") == "lora"


def materialize_config(config: RunConfig, name: str):
    """One LoRA adapter merged onto the base alone: W + (alpha / r) B A, a model lm_eval can load."""
    from dtm_fast.merge.config import MergeConfig, ModelInput, parse_size

    return MergeConfig(method="linear", models=(ModelInput(job_dir(config, name)),),
                       output=materialized_dir(config, name), base=base_dir(config), lora_mode="materialize",
                       max_memory=parse_size(config.merge.max_memory, f"{config.where}: merge.max_memory"),
                       backend=config.merge.backend, overwrite=True, source=f"{config.where}: eval of {name}")


def merge_config(config: RunConfig, models: list[Path], resume: bool = False):
    from dtm_fast.merge.config import DTYPE_NAMES, MergeConfig, ModelInput, parse_size
    from dtm_fast.merge.methods import METHODS

    section = config.merge
    where = f"{config.where}: merge"
    if section.method not in METHODS:
        raise DtmError(f"{where}.method: unknown merge method {section.method!r}; choose one of {', '.join(METHODS)}")
    if section.dtype is not None and section.dtype not in DTYPE_NAMES:
        raise DtmError(f"{where}.dtype must be one of bfloat16, float16, float32, got {section.dtype!r}")
    weights = section.weights or (None,) * len(models)
    inputs = tuple(ModelInput(path, {} if weight is None else {"weight": weight}) for path, weight in zip(models, weights))
    needs_base = METHODS[section.method].needs_base or lora_training(config)
    return MergeConfig(
        method=section.method, models=inputs, output=merged_dir(config),
        base=base_dir(config) if needs_base else None, parameters=dict(section.parameters),
        dtype=DTYPE_NAMES[section.dtype] if section.dtype else None,
        max_memory=parse_size(section.max_memory, f"{where}.max_memory"),
        max_shard_size=parse_size(section.max_shard_size, f"{where}.max_shard_size"),
        backend=section.backend, seed=section.seed, lora_mode=section.lora_mode, resume=resume, overwrite=True,
        source=where)


def eval_config(config: RunConfig):
    from dtm_fast.eval.config import EvalConfig, ModelSpec, TaskSpec

    values = dict(config.eval)
    tasks = values.get("tasks")
    if not tasks:
        raise DtmError(f"{config.where}: eval.tasks must list at least one benchmark (an lm_eval task such as "
                       "mmlu, or a local MMLU-format jsonl file)")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    resolved = []
    for index, task in enumerate(tasks):
        spec = TaskSpec.parse(task) if isinstance(task, str) else TaskSpec(**task) if isinstance(task, dict) else None
        if spec is None:
            raise DtmError(f"{config.where}: eval.tasks[{index}]: expected a task name or file, got {task!r}")
        if spec.file:
            file = Path(spec.file).expanduser()
            file = file if file.is_absolute() else config.config_path.parent / file
            if not file.is_file():
                raise DtmError(f"{config.where}: eval.tasks[{index}]: {file}: no such file")
            spec = TaskSpec(name=spec.name, file=str(file), metric=spec.metric)
        resolved.append(spec)
    evaluated = materialized_dir if lora_training(config) else job_dir
    models = [ModelSpec("base", str(base_dir(config)), "base")]
    if config.vanilla:
        models.append(ModelSpec("vanilla", str(evaluated(config, "vanilla")), "vanilla"))
    models += [ModelSpec(f"sub-{i}", str(evaluated(config, f"sub-{i}")), "sub") for i in range(config.k)]
    models.append(ModelSpec("merged", str(merged_dir(config)), "merged"))
    values.update(tasks=tuple(resolved), models=tuple(models), output_dir=str(report_dir(config)), overwrite=True)
    try:
        return EvalConfig.from_dict(values)
    except DtmError as error:
        raise _reprefix(error, config.where, "eval") from None


# ---- is it current? -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    current: bool
    detail: str = ""          # why not, or how it resumes
    identity: str | None = None  # when current: the hash downstream stages record as their input


def base_status(config: RunConfig, hashes: HashCache) -> Status:
    if not config.gguf_file:
        from dtm_fast.train.manifest import model_files

        files = {p.name: hashes.sha256(p) for p in model_files(config.base_model, None)}
        return Status(True, "the base model as given", _digest(files))
    source = config.base_model / config.gguf_file
    manifest = read_json(base_dir(config) / BASE_MANIFEST)
    expected = {"gguf": str(source), "sha256": hashes.sha256(source)}
    if manifest is None or manifest.get("source") != expected:
        return Status(False, "converts the GGUF to a Hugging Face directory")
    return Status(True, "converted", _digest(manifest))


def disperse_status(config: RunConfig) -> Status:
    from dtm_fast.disperse.pipeline import MANIFEST_NAME, is_current

    disperse = disperse_config(config)
    if not is_current(disperse):
        return Status(False, f"splits {len(config.data)} file(s) into {config.k} portions ({disperse.method})")
    return Status(True, "", _digest(read_json(portions_dir(config) / MANIFEST_NAME)))


def _train_inputs(config: RunConfig, name: str, hashes: HashCache) -> dict[str, Any]:
    """What the trainer records under "inputs" in dtm_train.json, computed with the cache."""
    from dtm_fast.train.manifest import model_files

    train = train_config(config, name)
    model = Path(train.model)
    return {"model": {"path": str(model.resolve()),
                      "files": {p.name: hashes.sha256(p) for p in model_files(model, train.gguf_file)}},
            "data": [{"path": str(Path(item).resolve()), "sha256": hashes.sha256(Path(item))} for item in train.data]}


def _comparable(train_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_dict.items() if k not in TRAIN_OPERATIONAL_FIELDS}


def train_status(config: RunConfig, name: str, hashes: HashCache) -> Status:
    from dtm_fast.train.checkpoint import complete_checkpoints
    from dtm_fast.train.manifest import MANIFEST_NAME

    train = train_config(config, name)
    manifest_path = job_dir(config, name) / MANIFEST_NAME
    manifest = read_json(manifest_path)
    if manifest is not None and _comparable(manifest.get("config", {})) == _comparable(train.to_dict()) \
            and manifest.get("inputs") == _train_inputs(config, name, hashes):
        return Status(True, "", hashes.sha256(manifest_path))
    checkpoints = complete_checkpoints(train.checkpoints_path)
    if checkpoints and _checkpoints_match(config, name):
        return Status(False, f"resumes from its checkpoint at step {checkpoints[-1][0]}")
    return Status(False, "trains" if manifest is None else "retrains (its inputs or settings changed)")


def _checkpoints_match(config: RunConfig, name: str) -> bool:
    """A checkpoint may only be resumed by the job that wrote it: its record must match."""
    record = read_json(state_dir(config) / f"train-{name}.json")
    return record is not None and record.get("fingerprint") == train_fingerprint(config, name)


def train_fingerprint(config: RunConfig, name: str) -> str:
    """Identifies a training job before it has a manifest: settings + portion contents + base."""
    train = train_config(config, name)
    return _digest({"config": _comparable(train.to_dict()), "inputs": _train_inputs(config, name, hash_cache(config))})


def _staged_status(config: RunConfig, stage: str, fingerprint: str, output_file: Path) -> Status:
    record = read_json(state_dir(config) / f"{stage}.json")
    if record is not None and record.get("fingerprint") == fingerprint and record.get("complete") \
            and output_file.is_file():
        return Status(True, "", fingerprint)
    if record is not None and record.get("fingerprint") == fingerprint:
        return Status(False, "reruns (its output is missing)" if record.get("complete") else
                      "continues an interrupted run")
    return Status(False, "runs" if record is None else "reruns (its inputs or settings changed)")


def merge_fingerprint(config: RunConfig, identities: dict[str, str]) -> str:
    return _digest({"merge": asdict(config.merge), "models": [identities[f"sub-{i}"] for i in range(config.k)],
                    "base": identities["base"], "lora": lora_training(config)})


def merge_status(config: RunConfig, identities: dict[str, str]) -> Status:
    return _staged_status(config, "merge", merge_fingerprint(config, identities), merged_dir(config) / "dtm_merge.json")


def eval_fingerprint(config: RunConfig, identities: dict[str, str], hashes: HashCache) -> str:
    evaluation = eval_config(config)
    tasks = [{"name": t.name, "metric": t.metric, "file": hashes.sha256(Path(t.file)) if t.file else None}
             for t in evaluation.tasks]
    settings = {k: v for k, v in config.eval.items() if k != "tasks"}
    return _digest({"settings": settings, "tasks": tasks, "models": identities})


def eval_status(config: RunConfig, identities: dict[str, str], hashes: HashCache) -> Status:
    return _staged_status(config, "eval", eval_fingerprint(config, identities, hashes),
                          report_dir(config) / "report.json")


def record_stage(config: RunConfig, stage: str, fingerprint: str, complete: bool) -> None:
    write_json(state_dir(config) / f"{stage}.json", {"fingerprint": fingerprint, "complete": complete})
