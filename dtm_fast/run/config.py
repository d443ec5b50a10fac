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

Sweeps: `seeds: [0, 1, 2]` repeats dispersal and training per seed (disperse.seed = train.seed = the
seed), `k: [2, 4, 8]` repeats the DTM arm per K (base and vanilla are shared), and `merge:` may be a
list of settings ({name, method, ...}) merged from the same sub-models. A swept axis adds a level to
the layout (seed-0/k-4/sub-1, merged-ties); an axis given as a single value adds none, so a run
without sweeps keeps the flat layout.

No heavy imports here: `dtm run --help` and `--dry-run` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dtm_fast import checks
from dtm_fast.errors import DtmError
from dtm_fast.io.text_files import load_yaml
from dtm_fast.run.grid import MAX_SEED, Cell, Job, MergeSection, MergeSetting, axis

TOP_LEVEL_KEYS = ("run_dir", "data", "k", "seeds", "base_model", "gguf_file", "vanilla", "disperse", "train",
                  "merge", "eval", "launch", "slurm")
# set by `dtm run` itself from the top level; a section that names them would contradict it
SET_BY_RUN = {
    "disperse": ("inputs", "output_dir", "k", "overwrite"),
    "train": ("model", "data", "output_dir", "gguf_file", "resume", "checkpoint_dir", "fresh", "overwrite"),
    "eval": ("models", "output_dir", "overwrite"),
}
MERGE_KEYS = ("method", "parameters", "weights", "lora_mode", "dtype", "max_memory", "max_shard_size", "backend",
              "seed")
# set per seed when `seeds` is swept
SET_BY_SEEDS = {"disperse": "seed", "train": "seed"}
LAUNCH_KEYS = ("nproc_per_node",)
SLURM_KEYS = ("partition", "account", "qos", "time", "nodes", "gpus_per_node", "cpus_per_task", "mem",
              "job_name", "setup", "extra_sbatch")


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
    ks: tuple[int, ...]
    base_model: Path
    gguf_file: str | None
    vanilla: bool
    disperse: dict[str, Any]   # DisperseConfig keys (checked by DisperseConfig)
    train: dict[str, Any]      # TrainConfig keys (checked by train.config.load_config)
    merges: tuple[MergeSetting, ...]
    eval: dict[str, Any]       # EvalConfig keys (checked by EvalConfig)
    nproc_per_node: int
    slurm: SlurmSection
    seeds: tuple[int, ...] | None = None  # None: not swept
    k_swept: bool = False
    merge_swept: bool = False

    @property
    def where(self) -> str:
        return str(self.config_path)

    @property
    def k(self) -> int:
        """The K of a run without a K sweep (the first K of a sweep)."""
        return self.ks[0]

    @property
    def merge(self) -> MergeSection:
        """The merge setting of a run without a merge sweep (the first of a sweep)."""
        return self.merges[0].section

    def seed_prefix(self, seed: int | None) -> str:
        return f"seed-{seed}/" if self.seeds is not None else ""

    def cells(self) -> list[Cell]:
        cells = []
        for seed in self.seeds if self.seeds is not None else (None,):
            for k in self.ks:
                cells.append(Cell(seed, k, self.seed_prefix(seed) + (f"k-{k}/" if self.k_swept else "")))
        return cells

    def jobs(self) -> list[Job]:
        """The training jobs: per seed, each cell's sub-models, then that seed's vanilla baseline."""
        jobs = []
        for seed in self.seeds if self.seeds is not None else (None,):
            seed_cells = [cell for cell in self.cells() if cell.seed == seed]
            for cell in seed_cells:
                jobs += [Job(f"{cell.prefix}sub-{i}", cell, i) for i in range(cell.k)]
            if self.vanilla:
                jobs.append(Job(f"{self.seed_prefix(seed)}vanilla", seed_cells[0], None))
        return jobs

    def job_names(self) -> list[str]:
        return [job.name for job in self.jobs()]

    def job(self, name: str) -> Job:
        return next(job for job in self.jobs() if job.name == name)

    def merged_name(self, cell: Cell, setting: MergeSetting) -> str:
        return f"{cell.prefix}merged" + (f"-{setting.name}" if self.merge_swept else "")


def _close_key_hint(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _check_keys(values: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in known:
            raise DtmError(f"{where}: unknown key {key!r}; {_close_key_hint(str(key), known)}")


def _section(values: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    section = values.get(name)
    section = {} if section is None else section
    if not isinstance(section, Mapping):
        raise DtmError(f"{where}: '{name}' must be a mapping of keys to values, got {section!r}")
    for key in section:
        if not isinstance(key, str):
            raise DtmError(f"{where}: {name}: a key must be text, got {key!r}")
    for key in SET_BY_RUN.get(name, ()):
        if key in section:
            raise DtmError(f"{where}: '{name}.{key}' is set by dtm run itself (from the top-level keys "
                           "data, k, base_model, run_dir); remove it from the section")
    return dict(section)


def _path(value: Any, field_name: str, where: str, root: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise DtmError(f"{where}: '{field_name}' must be a path, got {value!r}")
    if not value.isprintable():
        raise DtmError(f"{where}: '{field_name}' is {value!r}, which holds a control character (a newline, a "
                       "tab); a path with one is almost always a quoting mistake in the YAML")
    path = Path(value).expanduser()
    # normpath, not resolve: "../runs" reads as it is meant, a symlinked model keeps its own name
    return Path(os.path.normpath(path if path.is_absolute() else (root / path)))


def _whole_number(values: Mapping[str, Any], key: str, default: int, where: str, minimum: int = 1,
                  maximum: int = 1_000_000) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise DtmError(f"{where}: '{key}' must be a whole number >= {minimum}, got {value!r}")
    return value


def _merge_section(values: Any, where: str, k: int | None) -> MergeSection:
    """One merge setting; `k` is the number of sub-models it merges (None in a K sweep: weights
    cannot be given, since their count differs per K)."""
    if not isinstance(values, Mapping):
        raise DtmError(f"{where} must be a mapping of keys to values, got {values!r}")
    _check_keys(values, MERGE_KEYS, where)
    section = dict(values)
    if not isinstance(section.get("method", "linear"), str):
        raise DtmError(f"{where}.method must be the name of a merge method, got {section['method']!r}")
    if "parameters" in section and not isinstance(section["parameters"], Mapping):
        raise DtmError(f"{where}.parameters must be a mapping, got {section['parameters']!r}")
    weights = section.get("weights")
    if weights is not None:
        if k is None:
            raise DtmError(f"{where}.weights cannot be given when k is swept (each K merges another number of "
                           "sub-models); remove it or give a single k")
        if not isinstance(weights, list) or len(weights) != k or \
                not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise DtmError(f"{where}.weights must list {k} numbers (one per sub-model), got {weights!r}")
        if not all(math.isfinite(w) for w in weights):
            raise DtmError(f"{where}.weights must be finite numbers, got {weights!r}")
        section["weights"] = tuple(float(w) for w in weights)
    for key in ("max_memory", "max_shard_size"):
        if key in section:
            if isinstance(section[key], bool) or not isinstance(section[key], (str, int, float)):
                raise DtmError(f"{where}.{key} must be a size such as 2GiB, got {section[key]!r}")
            section[key] = str(section[key])
    for key in ("dtype", "backend", "lora_mode"):
        if key in section and section[key] is not None and not isinstance(section[key], str):
            raise DtmError(f"{where}.{key} must be text, got {section[key]!r}")
    if "seed" in section:
        checks.whole_number(section["seed"], f"{where}.seed", minimum=0, maximum=MAX_SEED)
    from dtm_fast.merge.config import LORA_MODES

    if section.get("lora_mode", "materialize") not in LORA_MODES:
        raise DtmError(f"{where}.lora_mode must be one of {', '.join(LORA_MODES)}, got {section['lora_mode']!r}")
    return MergeSection(**section)


def _merge_settings(values: Any, where: str, k: int | None) -> tuple[tuple[MergeSetting, ...], bool]:
    """`merge:` as one mapping (not swept) or a list of settings, each with an optional `name`."""
    if values is None:
        values = {}
    if isinstance(values, Mapping):
        return (MergeSetting("default", _merge_section(values, f"{where}: merge", k)),), False
    if not isinstance(values, list) or not values:
        raise DtmError(f"{where}: 'merge' must be a mapping, or a non-empty list of mappings (one per merge "
                       f"setting), got {values!r}")
    settings = []
    for index, item in enumerate(values):
        place = f"{where}: merge[{index}]"
        if not isinstance(item, Mapping):
            raise DtmError(f"{place} must be a mapping of keys to values, got {item!r}")
        item = dict(item)
        name = item.pop("name", item.get("method", "linear"))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise DtmError(f"{place}.name must be a short name of letters, digits, '-', '_' or '.', got {name!r}")
        settings.append(MergeSetting(name, _merge_section(item, place, k)))
    names = [setting.name for setting in settings]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DtmError(f"{where}: two merge settings are named {duplicates[0]!r}; give each a distinct 'name'")
    return tuple(settings), True


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
    for key in ("partition", "account", "qos", "time", "mem", "job_name"):
        if key in section and section[key] is not None and not isinstance(section[key], (str, int)):
            raise DtmError(f"{where}.{key} must be text, got {section[key]!r}")
        if isinstance(section.get(key), int):
            section[key] = str(section[key])
    return SlurmSection(**section)


def parse_run_config(values: Mapping[str, Any], config_path: Path, run_dir: str | None = None) -> RunConfig:
    """Check `values` (the YAML mapping) and build the RunConfig; `run_dir` overrides the file's.
    Every error names the config file."""
    return checks.prefixed(f"{config_path}: ", lambda: _parse(values, config_path, run_dir))


def _parse(values: Mapping[str, Any], config_path: Path, run_dir: str | None) -> RunConfig:
    where = str(config_path)
    if not isinstance(values, Mapping):
        raise DtmError(f"{where}: expected a mapping of config keys to values, got {type(values).__name__}")
    _check_keys(values, TOP_LEVEL_KEYS, where)
    root = config_path.parent
    for required in ("data", "k", "base_model"):
        if required not in values:
            raise DtmError(f"{where}: '{required}' is required")
    if run_dir is None:
        if "run_dir" not in values:
            raise DtmError(f"{where}: 'run_dir' is required (or pass --output DIR)")
        run_path = _path(values["run_dir"], "run_dir", where, root).absolute()
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
    ks, k_swept = axis(values, "k", where, minimum=1, maximum=100_000)
    seeds = None
    if "seeds" in values:
        seeds, _ = axis(values, "seeds", where, minimum=0, maximum=MAX_SEED)
    base_model = _path(values["base_model"], "base_model", where, root).absolute()
    if not base_model.is_dir():
        raise DtmError(f"{where}: base_model: {base_model} is not a directory (a Hugging Face model directory, "
                       "or the folder holding gguf_file)")
    gguf_file = values.get("gguf_file")
    if gguf_file is not None and not isinstance(gguf_file, str):
        raise DtmError(f"{where}: 'gguf_file' must be a file name, got {gguf_file!r}")
    if gguf_file is not None and not (base_model / gguf_file).is_file():
        raise DtmError(f"{where}: gguf_file: {base_model / gguf_file}: no such file")
    if gguf_file is None and not (base_model / "config.json").is_file():
        ggufs = sorted(p.name for p in base_model.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]}: set gguf_file" if ggufs else ""
        raise DtmError(f"{where}: base_model: {base_model} has no config.json{hint}")
    vanilla = values.get("vanilla", True)
    if not isinstance(vanilla, bool):
        raise DtmError(f"{where}: 'vanilla' must be true or false, got {vanilla!r}")
    launch = _section(values, "launch", where)
    _check_keys(launch, LAUNCH_KEYS, f"{where}: launch")
    sections = {name: _section(values, name, where) for name in ("disperse", "train", "eval")}
    if seeds is not None:
        for section, key in SET_BY_SEEDS.items():
            if key in sections[section]:
                raise DtmError(f"{where}: '{section}.{key}' is set per seed by 'seeds'; remove it from the section")
    merges, merge_swept = _merge_settings(values.get("merge"), where, None if k_swept else ks[0])
    config = RunConfig(
        config_path=config_path, run_dir=run_path, data=tuple(data_paths), ks=ks, base_model=base_model,
        gguf_file=gguf_file, vanilla=vanilla, disperse=sections["disperse"], train=sections["train"],
        merges=merges, eval=sections["eval"],
        nproc_per_node=_whole_number(launch, "nproc_per_node", 1, where, maximum=4096),
        slurm=_slurm_section(_section(values, "slurm", where), where), seeds=seeds, k_swept=k_swept,
        merge_swept=merge_swept)
    check_sections(config)
    return config


def check_sections(config: RunConfig) -> None:
    """Build every stage's own config once, so a bad key or value fails before any work starts."""
    from dtm_fast.run import evaluation, stages

    for cell in config.cells():
        stages.disperse_config(config, cell)
        for setting in config.merges:
            stages.merge_config(config, cell, setting)
    for job in config.jobs():
        stages.train_config(config, job)
    evaluation.eval_config(config)


def load_run_config(path: str | Path, run_dir: str | None = None) -> RunConfig:
    path = Path(path).expanduser().absolute()
    values = load_yaml(path, "config file")
    return parse_run_config({} if values is None else values, path, run_dir)


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
