"""The stages of a DTM run, where each one writes, and whether its output is current.

    base       (only for a GGUF base) the de-quantised model as a Hugging Face directory
    disperse   <cell>/portions/portion-{i}.jsonl + manifest.json, one per cell (seed, K)
    train      <cell>/sub-{i}/ per portion; <seed>/vanilla/ on all portions of the seed's first K
    merge      <cell>/merged[-<setting>]/ (dtm_merge.json), one per cell and merge setting
    eval       eval/<model>/result.json: one model's scores and per-question values, per model
    report     report/report.{json,md,png}: every model, every interval, one table per swept axis

A stage is current when its output's manifest records exactly the inputs (by content hash) and the
parameters this config asks for. disperse and train use their own manifests (`manifest.json`,
`dtm_train.json`), so outputs made by `dtm disperse` / `dtm train` count too. The merge manifest
identifies its inputs by header only, which does not change when a sub-model is retrained, so merge
and eval also get a record under state/ that names the exact trained models they consumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import dumps_json, write_json as write_json_atomically
from dtm_fast.run.config import Cell, Job, MergeSetting, RunConfig

BASE_MANIFEST = "dtm_base.json"
# TrainConfig fields that change how a job runs or is checkpointed, never the weights it exports
TRAIN_OPERATIONAL_FIELDS = ("resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                            "max_shard_size_mb")
# keys of the run's eval section that dtm run reads itself (the rest are EvalConfig keys)
RUN_EVAL_KEYS = ("sub_models",)
RESULT_FILE = "result.json"


# ---- where things go -------------------------------------------------------------------------
def base_dir(config: RunConfig) -> Path:
    """The base model every stage reads: the user's directory, or its GGUF converted in the run."""
    return config.run_dir / "base" if config.gguf_file else config.base_model


def portions_dir(config: RunConfig, cell: Cell) -> Path:
    return config.run_dir / cell.prefix / "portions"


def job_dir(config: RunConfig, name: str) -> Path:
    return config.run_dir / name


def train_config_path(config: RunConfig, job: Job) -> Path:
    return config.run_dir / "train-configs" / f"{job.name}.yaml"


def checkpoints_dir(config: RunConfig, job: Job, fingerprint: str) -> Path:
    """Checkpoints of one job with one set of inputs and settings: a changed job writes beside the
    old ones instead of deleting them (and going back to the old settings resumes those)."""
    return config.run_dir / f"{job.name}.checkpoints-{fingerprint[:12]}"


def merged_dir(config: RunConfig, cell: Cell, setting: MergeSetting) -> Path:
    return config.run_dir / config.merged_name(cell, setting)


def eval_dir(config: RunConfig, model_id: str) -> Path:
    return config.run_dir / "eval" / model_id


def report_dir(config: RunConfig) -> Path:
    return config.run_dir / "report"


def state_dir(config: RunConfig) -> Path:
    return config.run_dir / "state"


def log_path(config: RunConfig) -> Path:
    """Where library log lines and progress bars of this run go (not the terminal)."""
    return config.run_dir / "logs" / "dtm-run.log"


# ---- content hashes, cached by (size, mtime) so a 7B base is hashed once per run directory ----------
class HashCache:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        loaded = read_json(path)
        if isinstance(loaded, dict):
            self.entries = loaded  # a damaged cache only costs a rehash

    def sha256(self, file: Path) -> str:
        from dtm_fast.io.hashing import file_sha256

        stat = file.stat()
        key = str(file.resolve())
        cached = self.entries.get(key)
        if isinstance(cached, list) and len(cached) == 3 and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = file_sha256(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._save()
        return digest

    def _save(self) -> None:
        if not self.path.parent.is_dir():
            return  # a dry run of a new run directory creates nothing
        write_json_atomically(self.path, self.entries, indent=None, durable=False)


def hash_cache(config: RunConfig) -> HashCache:
    return HashCache(state_dir(config) / "hashes.json")


def digest(value: Any) -> str:
    return hashlib.sha256(dumps_json(value, indent=None).encode()).hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file dtm wrote, or None when it is missing or damaged (then the stage reruns)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, value)


# ---- each stage's own config --------------------------------------------------------------------
def _reprefix(error: DtmError, where: str, section: str) -> DtmError:
    message = str(error)
    for prefix in (f"{section}: ", "config: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return DtmError(f"{where}: {section}: {message}")


def disperse_config(config: RunConfig, cell: Cell):
    from dtm_fast.disperse.config import DisperseConfig

    values = dict(config.disperse)
    if isinstance(values.get("encoder"), str) and not Path(values["encoder"]).is_absolute():
        values["encoder"] = str(config.config_path.parent / values["encoder"])
    if cell.seed is not None:
        values["seed"] = cell.seed
    values.update(inputs=tuple(str(p) for p in config.data), output_dir=str(portions_dir(config, cell)), k=cell.k,
                  overwrite=True)  # the run owns portions/: a stale dispersal there is replaced
    try:
        return DisperseConfig.from_dict(values)
    except DtmError as error:
        raise _reprefix(error, config.where, "disperse") from None


def train_config(config: RunConfig, job: Job, resume: bool = False, checkpoint_dir: Path | None = None):
    """The TrainConfig of one job: every path absolute, so the YAML written for it runs from any
    directory (a SLURM node's included)."""
    from dtm_fast.train.config import FIELD_NAMES, load_config

    for key in config.train:
        if key not in FIELD_NAMES:
            import difflib

            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(FIELD_NAMES)}"
            raise DtmError(f"{config.where}: train: unknown key {key!r}; {hint}")
    portions = portions_dir(config, job.cell)
    indices = range(job.cell.k) if job.portion is None else [job.portion]
    values = dict(config.train)
    if job.cell.seed is not None:
        values["seed"] = job.cell.seed
    values.update(model=str(base_dir(config)), data=[str(portions / f"portion-{i}.jsonl") for i in indices],
                  output_dir=str(job_dir(config, job.name)), resume=resume)
    if checkpoint_dir is not None:
        values["checkpoint_dir"] = str(checkpoint_dir)
    try:
        return load_config(None, values)
    except DtmError as error:
        raise _reprefix(error, config.where, "train") from None
    except (TypeError, ValueError) as error:  # a value of a shape the trainer's checks do not expect
        raise DtmError(f"{config.where}: train: a value has the wrong type ({error})") from None


def lora_training(config: RunConfig) -> bool:
    return config.train.get("finetuning", "full") == "lora"


def merge_config(config: RunConfig, cell: Cell, setting: MergeSetting, resume: bool = False):
    from dtm_fast.merge.config import DTYPE_NAMES, MergeConfig, ModelInput, parse_size
    from dtm_fast.merge.methods import METHODS

    section = setting.section
    where = f"{config.where}: merge" + (f"[{setting.name}]" if config.merge_swept else "")
    if section.method not in METHODS:
        raise DtmError(f"{where}.method: unknown merge method {section.method!r}; choose one of {', '.join(METHODS)}")
    if section.dtype is not None and section.dtype not in DTYPE_NAMES:
        raise DtmError(f"{where}.dtype must be one of bfloat16, float16, float32, got {section.dtype!r}")
    models = [job_dir(config, f"{cell.prefix}sub-{i}") for i in range(cell.k)]
    weights = section.weights or (None,) * len(models)
    inputs = tuple(ModelInput(path, {} if weight is None else {"weight": weight}) for path, weight in zip(models, weights))
    needs_base = METHODS[section.method].needs_base or lora_training(config)
    return MergeConfig(
        method=section.method, models=inputs, output=merged_dir(config, cell, setting),
        base=base_dir(config) if needs_base else None, parameters=dict(section.parameters),
        dtype=DTYPE_NAMES[section.dtype] if section.dtype else None,
        max_memory=parse_size(section.max_memory, f"{where}.max_memory"),
        max_shard_size=parse_size(section.max_shard_size, f"{where}.max_shard_size"),
        backend=section.backend, seed=section.seed, lora_mode=section.lora_mode, resume=resume, overwrite=True,
        source=where)


@dataclass(frozen=True)
class EvalModel:
    """One model the run evaluates, with the stages whose outputs it is made of."""

    spec: Any                 # eval.config.ModelSpec
    depends_on: tuple[str, ...]
    seed: int | None = None
    k: int | None = None
    merge: str | None = None
    cell: Cell | None = None   # the ensemble: the cell whose sub-models it averages


def _run_eval_settings(config: RunConfig) -> dict[str, Any]:
    settings = {key: config.eval[key] for key in RUN_EVAL_KEYS if key in config.eval}
    sub_models = settings.get("sub_models", True)
    if not isinstance(sub_models, bool):
        raise DtmError(f"{config.where}: eval.sub_models must be true or false, got {sub_models!r}")
    return {"sub_models": sub_models}


def eval_models(config: RunConfig) -> list[EvalModel]:
    """base once; per seed the vanilla baseline (shared by every K); per cell its sub-models (unless
    eval.sub_models is false), the ensemble (eval.ensemble) and each merge setting's model."""
    from dtm_fast.eval.config import ModelSpec

    adapters = lora_training(config)
    base = str(base_dir(config))
    adapter_base = base if adapters else None
    models = [EvalModel(ModelSpec("base", base, "base"), ("base",))]
    sub_models = _run_eval_settings(config)["sub_models"]
    for job in config.jobs():
        if job.portion is None:
            models.append(EvalModel(ModelSpec("vanilla", str(job_dir(config, job.name)), "vanilla", adapter_base,
                                              id=job.name), (job.name,), job.cell.seed))
    for cell in config.cells():
        if sub_models:
            for i in range(cell.k):
                name = f"{cell.prefix}sub-{i}"
                models.append(EvalModel(ModelSpec(f"sub-{i}", str(job_dir(config, name)), "sub", adapter_base,
                                                  id=name), (name,), cell.seed, cell.k))
        for setting in config.merges:
            name = config.merged_name(cell, setting)
            # exact-concat LoRA merges are an adapter too; materialize writes a full model
            merged_base = adapter_base if setting.section.lora_mode == "exact-concat" else None
            label = "merged" + (f"-{setting.name}" if config.merge_swept else "")
            models.append(EvalModel(ModelSpec(label, str(job_dir(config, name)), "merged", merged_base, id=name),
                                    (name,), cell.seed, cell.k, setting.name))
        if config.eval.get("ensemble") is True:
            subs = [f"{cell.prefix}sub-{i}" for i in range(cell.k)]
            models.append(EvalModel(ModelSpec("ensemble", "+".join(str(job_dir(config, n)) for n in subs), "ensemble",
                                              id=f"{cell.prefix}ensemble"), tuple(subs), cell.seed, cell.k, cell=cell))
    return models


def eval_config(config: RunConfig, output_dir: Path | None = None):
    """The run's EvalConfig: every model of eval_models, tasks with paths resolved."""
    from dtm_fast.eval.config import EvalConfig, TaskSpec

    values = {key: value for key, value in config.eval.items() if key not in RUN_EVAL_KEYS}
    tasks = values.get("tasks")
    if not tasks:
        raise DtmError(f"{config.where}: eval.tasks must list at least one benchmark (an lm_eval task such as "
                       "mmlu, or a local MMLU-format jsonl file)")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list):
        raise DtmError(f"{config.where}: eval.tasks must be a list of benchmarks, got {tasks!r}")
    resolved = []
    for index, task in enumerate(tasks):
        if isinstance(task, str):
            spec = TaskSpec.parse(task)
        elif isinstance(task, dict) and set(task) <= {"name", "file", "metric"} and "name" in task:
            spec = TaskSpec(**task)
        else:
            raise DtmError(f"{config.where}: eval.tasks[{index}]: expected a task name, a file, or "
                           f"{{name, file, metric}}, got {task!r}")
        if spec.file:
            file = Path(spec.file).expanduser()
            file = file if file.is_absolute() else config.config_path.parent / file
            if not file.is_file():
                raise DtmError(f"{config.where}: eval.tasks[{index}]: {file}: no such file")
            spec = TaskSpec(name=spec.name, file=str(file), metric=spec.metric)
        resolved.append(spec)
    _run_eval_settings(config)
    values.update(tasks=tuple(resolved), models=tuple(m.spec for m in eval_models(config)),
                  output_dir=str(output_dir or report_dir(config)), overwrite=True)
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
        return Status(True, "the base model as given", digest(files))
    source = config.base_model / config.gguf_file
    manifest = read_json(base_dir(config) / BASE_MANIFEST)
    expected = {"gguf": str(source), "sha256": hashes.sha256(source)}
    if not isinstance(manifest, dict) or manifest.get("source") != expected:
        return Status(False, "converts the GGUF to a Hugging Face directory")
    return Status(True, "converted", digest(manifest))


def disperse_status(config: RunConfig, cell: Cell) -> Status:
    from dtm_fast.disperse.pipeline import MANIFEST_NAME, is_current

    disperse = disperse_config(config, cell)
    if not is_current(disperse):
        return Status(False, f"splits {len(config.data)} file(s) into {cell.k} portions ({disperse.method})")
    return Status(True, "", digest(read_json(portions_dir(config, cell) / MANIFEST_NAME)))


def _train_inputs(config: RunConfig, job: Job, hashes: HashCache) -> dict[str, Any]:
    """What the trainer records under "inputs" in dtm_train.json, computed with the cache."""
    from dtm_fast.train.manifest import model_files

    train = train_config(config, job)
    model = Path(train.model)
    return {"model": {"path": str(model.resolve()),
                      "files": {p.name: hashes.sha256(p) for p in model_files(model, train.gguf_file)}},
            "data": [{"path": str(Path(item).resolve()), "sha256": hashes.sha256(Path(item))} for item in train.data]}


def _comparable(train_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_dict.items() if k not in TRAIN_OPERATIONAL_FIELDS}


def train_fingerprint(config: RunConfig, job: Job, hashes: HashCache) -> str:
    """Identifies a training job before it has a manifest: settings + portion contents + base."""
    return digest({"config": _comparable(train_config(config, job).to_dict()),
                   "inputs": _train_inputs(config, job, hashes)})


def train_status(config: RunConfig, job: Job, hashes: HashCache) -> Status:
    from dtm_fast.train.checkpoint import complete_checkpoints
    from dtm_fast.train.manifest import MANIFEST_NAME

    train = train_config(config, job)
    manifest_path = job_dir(config, job.name) / MANIFEST_NAME
    manifest = read_json(manifest_path)
    if isinstance(manifest, dict) and _comparable(manifest.get("config", {})) == _comparable(train.to_dict()) \
            and manifest.get("inputs") == _train_inputs(config, job, hashes):
        return Status(True, "", hashes.sha256(manifest_path))
    checkpoints = complete_checkpoints(checkpoints_dir(config, job, train_fingerprint(config, job, hashes)))
    if checkpoints:
        return Status(False, f"resumes from its checkpoint at step {checkpoints[-1][0]}")
    return Status(False, "trains" if manifest is None else "retrains (its inputs or settings changed)")


def _staged_status(config: RunConfig, stage: str, fingerprint: str, output_file: Path) -> Status:
    record = read_json(state_dir(config) / f"{stage}.json")
    record = record if isinstance(record, dict) else None
    if record is not None and record.get("fingerprint") == fingerprint and record.get("complete") \
            and output_file.is_file():
        return Status(True, "", fingerprint)
    if record is not None and record.get("fingerprint") == fingerprint:
        return Status(False, "reruns (its output is missing)" if record.get("complete") else
                      "continues an interrupted run")
    return Status(False, "runs" if record is None else "reruns (its inputs or settings changed)")


def merge_stage(config: RunConfig, cell: Cell, setting: MergeSetting) -> str:
    return config.merged_name(cell, setting)


def merge_fingerprint(config: RunConfig, cell: Cell, setting: MergeSetting, identities: dict[str, str]) -> str:
    return digest({"merge": asdict(setting.section),
                   "models": [identities[f"{cell.prefix}sub-{i}"] for i in range(cell.k)],
                   "base": identities["base"], "lora": lora_training(config)})


def merge_status(config: RunConfig, cell: Cell, setting: MergeSetting, identities: dict[str, str]) -> Status:
    return _staged_status(config, merge_stage(config, cell, setting),
                          merge_fingerprint(config, cell, setting, identities),
                          merged_dir(config, cell, setting) / "dtm_merge.json")


def eval_settings_identity(config: RunConfig, hashes: HashCache) -> dict[str, Any]:
    """What, besides the model, decides an evaluation's numbers."""
    evaluation = eval_config(config)
    tasks = [{"name": t.name, "metric": t.metric, "file": hashes.sha256(Path(t.file)) if t.file else None}
             for t in evaluation.tasks]
    operational = ("tasks", "batch_size", "device", "bootstrap_iters", *RUN_EVAL_KEYS)
    return {"settings": {k: v for k, v in config.eval.items() if k not in operational}, "tasks": tasks}


def eval_stage(model: EvalModel) -> str:
    return f"eval {model.spec.id}"


def eval_fingerprint(config: RunConfig, model: EvalModel, identities: dict[str, str], hashes: HashCache) -> str:
    return digest({**eval_settings_identity(config, hashes), "role": model.spec.role,
                   "models": {name: identities[name] for name in model.depends_on},
                   "base": identities["base"] if model.spec.base else None})


def eval_status(config: RunConfig, model: EvalModel, identities: dict[str, str], hashes: HashCache) -> Status:
    return _staged_status(config, eval_stage(model).replace(" ", "-"), eval_fingerprint(config, model, identities, hashes),
                          eval_dir(config, model.spec.id) / RESULT_FILE)


def report_fingerprint(config: RunConfig, models: list[EvalModel], identities: dict[str, str]) -> str:
    return digest({"models": [identities[eval_stage(m)] for m in models],
                   "bootstrap_iters": config.eval.get("bootstrap_iters"), "seed": config.eval.get("seed"),
                   "layout": [[m.spec.id, m.seed, m.k, m.merge] for m in models]})


def report_status(config: RunConfig, models: list[EvalModel], identities: dict[str, str]) -> Status:
    return _staged_status(config, "report", report_fingerprint(config, models, identities),
                          report_dir(config) / "report.json")


def record_stage(config: RunConfig, stage: str, fingerprint: str, complete: bool) -> None:
    write_json(state_dir(config) / f"{stage.replace(' ', '-')}.json", {"fingerprint": fingerprint, "complete": complete})
