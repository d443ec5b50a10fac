"""The configuration of a whole DTM experiment (`dtm.yaml`): data, K, the base model, and one section
per stage. Each section is checked by that stage's own config class, so a key a stage does not know
is named with the section it sits in. Relative paths are read relative to the YAML file's folder,
so `dtm run path/to/dtm.yaml` means the same thing from any working directory.

    run_dir: runs/tulu-k4          # everything the run writes goes here
    data: [data/tulu.jsonl]        # instruction records (any format `dtm disperse` reads)
    k: 4
    base_model: models/llama-2-7b  # a Hugging Face directory, or the folder holding gguf_file
    gguf_file: null
    vanilla: true                  # also train the full-data baseline
    disperse: {method: random, seed: 0, first_turn_only: true}
    train: {finetuning: lora, max_steps: 1000, ...}    # any `dtm train` key but model/data/output_dir
    merge: {method: linear, parameters: {}, lora_mode: materialize}
    eval: {tasks: [mmlu, gsm8k], batch_size: 16, device: cuda}
    launch: {nproc_per_node: 8}
    slurm: {partition: gpu, gpus_per_node: 8, time: "24:00:00"}

No heavy imports here: `dtm run --help` and `--dry-run` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dtm_fast.errors import DtmError

TOP_LEVEL_KEYS = ("run_dir", "data", "k", "base_model", "gguf_file", "vanilla", "disperse", "train", "merge",
                  "eval", "launch", "slurm")
# set by `dtm run` itself from the top level; a section that names them would contradict it
SET_BY_RUN = {
    "disperse": ("inputs", "output_dir", "k", "overwrite"),
    "train": ("model", "data", "output_dir", "gguf_file", "resume", "checkpoint_dir"),
    "eval": ("models", "output_dir", "overwrite"),
}
MERGE_KEYS = ("method", "parameters", "weights", "lora_mode", "dtype", "max_memory", "max_shard_size", "backend",
              "seed")
LAUNCH_KEYS = ("nproc_per_node",)
SLURM_KEYS = ("partition", "account", "qos", "time", "nodes", "gpus_per_node", "cpus_per_task", "mem",
              "job_name", "setup", "extra_sbatch")


@dataclass(frozen=True)
class MergeSection:
    method: str = "linear"
    parameters: dict[str, Any] = field(default_factory=dict)  # the method's global parameters
    weights: tuple[float, ...] | None = None   # one per sub-model (linear, task_arithmetic, ...)
    lora_mode: str = "materialize"              # LoRA sub-models: materialize | exact-concat | factor-average
    dtype: str | None = None                    # None: the inputs' dtype
    max_memory: str = "2GiB"
    max_shard_size: str = "5GB"
    backend: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class SlurmSection:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 16
    mem: str | None = None
    job_name: str = "dtm"
    setup: tuple[str, ...] = ()        # shell lines run first in every job (module load, source venv)
    extra_sbatch: tuple[str, ...] = ()  # further "#SBATCH" options, e.g. "--constraint=h100"


@dataclass(frozen=True)
class RunConfig:
    config_path: Path          # the YAML file (or "<python>" when built in code)
    run_dir: Path
    data: tuple[Path, ...]
    k: int
    base_model: Path
    gguf_file: str | None
    vanilla: bool
    disperse: dict[str, Any]   # DisperseConfig keys (checked by DisperseConfig)
    train: dict[str, Any]      # TrainConfig keys (checked by train.config.load_config)
    merge: MergeSection
    eval: dict[str, Any]       # EvalConfig keys (checked by EvalConfig)
    nproc_per_node: int
    slurm: SlurmSection

    @property
    def where(self) -> str:
        return str(self.config_path)

    def job_names(self) -> list[str]:
        """The training jobs: one per sub-model, then the vanilla baseline."""
        return [f"sub-{i}" for i in range(self.k)] + (["vanilla"] if self.vanilla else [])


def _close_key_hint(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _check_keys(values: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in known:
            raise DtmError(f"{where}: unknown key {key!r}; {_close_key_hint(str(key), known)}")


def _section(values: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    section = values.get(name) or {}
    if not isinstance(section, Mapping):
        raise DtmError(f"{where}: '{name}' must be a mapping of keys to values, got {section!r}")
    for key in SET_BY_RUN.get(name, ()):
        if key in section:
            raise DtmError(f"{where}: '{name}.{key}' is set by dtm run itself (from the top-level keys "
                           "data, k, base_model, run_dir); remove it from the section")
    return dict(section)


def _path(value: Any, field_name: str, where: str, root: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise DtmError(f"{where}: '{field_name}' must be a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path)


def _whole_number(values: Mapping[str, Any], key: str, default: int, where: str, minimum: int = 1) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DtmError(f"{where}: '{key}' must be a whole number >= {minimum}, got {value!r}")
    return value


def _merge_section(values: Mapping[str, Any], where: str, k: int) -> MergeSection:
    where = f"{where}: merge"
    _check_keys(values, MERGE_KEYS, where)
    section = dict(values)
    if "parameters" in section and not isinstance(section["parameters"], Mapping):
        raise DtmError(f"{where}.parameters must be a mapping, got {section['parameters']!r}")
    weights = section.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != k or \
                not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise DtmError(f"{where}.weights must list {k} numbers (one per sub-model), got {weights!r}")
        section["weights"] = tuple(float(w) for w in weights)
    for key in ("max_memory", "max_shard_size"):
        if key in section:
            section[key] = str(section[key])
    from dtm_fast.merge.config import LORA_MODES

    if section.get("lora_mode", "materialize") not in LORA_MODES:
        raise DtmError(f"{where}.lora_mode must be one of {', '.join(LORA_MODES)}, got {section['lora_mode']!r}")
    return MergeSection(**section)


def _slurm_section(values: Mapping[str, Any], where: str) -> SlurmSection:
    where = f"{where}: slurm"
    _check_keys(values, SLURM_KEYS, where)
    section = dict(values)
    for key in ("setup", "extra_sbatch"):
        value = section.get(key, ())
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise DtmError(f"{where}.{key} must be a list of text lines, got {value!r}")
        section[key] = tuple(value)
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        _whole_number(section, key, 1, where, minimum=0 if key == "gpus_per_node" else 1)
    return SlurmSection(**section)


def parse_run_config(values: Mapping[str, Any], config_path: Path, run_dir: str | None = None) -> RunConfig:
    """Check `values` (the YAML mapping) and build the RunConfig; `run_dir` overrides the file's."""
    where = str(config_path)
    if not isinstance(values, Mapping):
        raise DtmError(f"{where}: expected a mapping of config keys to values")
    _check_keys(values, TOP_LEVEL_KEYS, where)
    root = config_path.parent
    for required in ("data", "k", "base_model"):
        if required not in values:
            raise DtmError(f"{where}: '{required}' is required")
    if run_dir is None:
        if "run_dir" not in values:
            raise DtmError(f"{where}: 'run_dir' is required (or pass --output DIR)")
        run_path = _path(values["run_dir"], "run_dir", where, root)
    else:
        run_path = Path(run_dir).expanduser().absolute()
    data = values["data"]
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not data:
        raise DtmError(f"{where}: 'data' must list at least one data file, got {values['data']!r}")
    data_paths = []
    for index, item in enumerate(data):
        path = _path(item, f"data[{index}]", where, root)
        if not path.exists():
            raise DtmError(f"{where}: data[{index}]: {path}: no such file or directory")
        data_paths.append(path.absolute())
    k = _whole_number(values, "k", 0, where)
    base_model = _path(values["base_model"], "base_model", where, root).absolute()
    if not base_model.is_dir():
        raise DtmError(f"{where}: base_model: {base_model} is not a directory (a Hugging Face model directory, "
                       "or the folder holding gguf_file)")
    gguf_file = values.get("gguf_file")
    if gguf_file is not None and not (base_model / str(gguf_file)).is_file():
        raise DtmError(f"{where}: gguf_file: {base_model / str(gguf_file)}: no such file")
    if gguf_file is None and not (base_model / "config.json").is_file():
        ggufs = sorted(p.name for p in base_model.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]}: set gguf_file" if ggufs else ""
        raise DtmError(f"{where}: base_model: {base_model} has no config.json{hint}")
    vanilla = values.get("vanilla", True)
    if not isinstance(vanilla, bool):
        raise DtmError(f"{where}: 'vanilla' must be true or false, got {vanilla!r}")
    launch = _section(values, "launch", where)
    _check_keys(launch, LAUNCH_KEYS, f"{where}: launch")
    config = RunConfig(
        config_path=config_path, run_dir=run_path, data=tuple(data_paths), k=k, base_model=base_model,
        gguf_file=str(gguf_file) if gguf_file is not None else None, vanilla=vanilla,
        disperse=_section(values, "disperse", where), train=_section(values, "train", where),
        merge=_merge_section(_section(values, "merge", where), where, k),
        eval=_section(values, "eval", where), nproc_per_node=_whole_number(launch, "nproc_per_node", 1, where),
        slurm=_slurm_section(_section(values, "slurm", where), where))
    check_sections(config)
    return config


def check_sections(config: RunConfig) -> None:
    """Build every stage's own config once, so a bad key or value fails before any work starts."""
    from dtm_fast.run import stages

    stages.disperse_config(config)
    for name in config.job_names():
        stages.train_config(config, name)
    stages.merge_config(config, [config.run_dir / name for name in config.job_names()[:config.k]])
    stages.eval_config(config)


def load_run_config(path: str | Path, run_dir: str | None = None) -> RunConfig:
    import yaml

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DtmError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DtmError(f"{path}: not valid YAML ({error})") from None
    return parse_run_config(values, path, run_dir)


def describe(config: RunConfig) -> dict[str, Any]:
    """A plain-data view of the config (for the run manifest)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        return value

    return {item.name: plain(getattr(config, item.name)) for item in dataclasses.fields(config)}
