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
from typing import TYPE_CHECKING, Any

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import dumps_json, write_json as write_json_atomically

if TYPE_CHECKING:  # config.py imports this module to check a config's sections
    from dtm_fast.run.config import RunConfig
    from dtm_fast.run.grid import Cell, Job, MergeSetting

BASE_MANIFEST = "dtm_base.json"
# TrainConfig fields that change how a job runs or is checkpointed, never the weights it exports
TRAIN_OPERATIONAL_FIELDS = ("resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                            "max_shard_size_mb", "fresh", "overwrite", "compile", "peak_tflops")


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
def reprefix(error: DtmError, where: str, section: str) -> DtmError:
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
        raise reprefix(error, config.where, "disperse") from None


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
        raise reprefix(error, config.where, "train") from None
    except (TypeError, ValueError) as error:  # a value of a shape the trainer's checks do not expect
        raise DtmError(f"{config.where}: train: a value has the wrong type ({error})") from None


def lora_training(config: RunConfig) -> bool:
    return config.train.get("finetuning", "full") == "lora"


def merge_config(config: RunConfig, cell: Cell, setting: MergeSetting, resume: bool = False):
    """The merge stage's MergeConfig, built the one way every merge is (MergeConfig.from_dict)."""
    from dtm_fast.merge.config import MergeConfig
    from dtm_fast.merge.methods import METHODS

    section = setting.section
    where = f"{config.where}: merge" + (f"[{setting.name}]" if config.merge_swept else "")
    if section.method not in METHODS:
        raise DtmError(f"{where}.method: unknown merge method {section.method!r}; choose one of {', '.join(METHODS)}")
    models = [job_dir(config, f"{cell.prefix}sub-{i}") for i in range(cell.k)]
    weights = section.weights or (None,) * len(models)
    needs_base = METHODS[section.method].needs_base or lora_training(config)
    return MergeConfig.from_dict({
        "method": section.method, "output": merged_dir(config, cell, setting),
        "models": [{"path": path, "parameters": {} if weight is None else {"weight": weight}}
                   for path, weight in zip(models, weights)],
        "base": base_dir(config) if needs_base else None, "parameters": dict(section.parameters),
        "dtype": section.dtype, "max_memory": section.max_memory, "max_shard_size": section.max_shard_size,
        "backend": section.backend, "seed": section.seed, "lora_mode": section.lora_mode, "resume": resume,
        "overwrite": True}, source=where)


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


def staged_status(config: RunConfig, stage: str, fingerprint: str, output_file: Path) -> Status:
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
    return staged_status(config, merge_stage(config, cell, setting),
                          merge_fingerprint(config, cell, setting, identities),
                          merged_dir(config, cell, setting) / "dtm_merge.json")


def record_stage(config: RunConfig, stage: str, fingerprint: str, complete: bool) -> None:
    write_json(state_dir(config) / f"{stage.replace(' ', '-')}.json", {"fingerprint": fingerprint, "complete": complete})
