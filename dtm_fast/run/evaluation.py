"""The evaluation stages of a run: which models it scores (base once; per seed the vanilla baseline;
per cell its sub-models, the ensemble and each merge setting's model), the EvalConfig they share, and
when each model's result and the report are current."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm_fast.errors import DtmError
from dtm_fast.run import stages

if TYPE_CHECKING:
    from dtm_fast.run.config import RunConfig
    from dtm_fast.run.grid import Cell

# keys of the run's eval section that dtm run reads itself (the rest are EvalConfig keys)
RUN_EVAL_KEYS = ("sub_models",)
RESULT_FILE = "result.json"


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

    adapters = stages.lora_training(config)
    base = str(stages.base_dir(config))
    adapter_base = base if adapters else None
    models = [EvalModel(ModelSpec("base", base, "base"), ("base",))]
    sub_models = _run_eval_settings(config)["sub_models"]
    for job in config.jobs():
        if job.portion is None:
            models.append(EvalModel(ModelSpec("vanilla", str(stages.job_dir(config, job.name)), "vanilla", adapter_base,
                                              id=job.name), (job.name,), job.cell.seed))
    for cell in config.cells():
        if sub_models:
            for i in range(cell.k):
                name = f"{cell.prefix}sub-{i}"
                models.append(EvalModel(ModelSpec(f"sub-{i}", str(stages.job_dir(config, name)), "sub", adapter_base,
                                                  id=name), (name,), cell.seed, cell.k))
        for setting in config.merges:
            name = config.merged_name(cell, setting)
            # exact-concat LoRA merges are an adapter too; materialize writes a full model
            merged_base = adapter_base if setting.section.lora_mode == "exact-concat" else None
            label = "merged" + (f"-{setting.name}" if config.merge_swept else "")
            models.append(EvalModel(ModelSpec(label, str(stages.job_dir(config, name)), "merged", merged_base, id=name),
                                    (name,), cell.seed, cell.k, setting.name))
        if config.eval.get("ensemble") is True:
            subs = [f"{cell.prefix}sub-{i}" for i in range(cell.k)]
            models.append(EvalModel(ModelSpec("ensemble", "+".join(str(stages.job_dir(config, n)) for n in subs), "ensemble",
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
                  output_dir=str(output_dir or stages.report_dir(config)), overwrite=True)
    try:
        return EvalConfig.from_dict(values)
    except DtmError as error:
        raise stages.reprefix(error, config.where, "eval") from None


def eval_settings_identity(config: RunConfig, hashes: stages.HashCache) -> dict[str, Any]:
    """What, besides the model, decides an evaluation's numbers."""
    evaluation = eval_config(config)
    tasks = [{"name": t.name, "metric": t.metric, "file": hashes.sha256(Path(t.file)) if t.file else None}
             for t in evaluation.tasks]
    operational = ("tasks", "batch_size", "device", "bootstrap_iters", *RUN_EVAL_KEYS)
    return {"settings": {k: v for k, v in config.eval.items() if k not in operational}, "tasks": tasks}


def eval_stage(model: EvalModel) -> str:
    return f"eval {model.spec.id}"


def eval_fingerprint(config: RunConfig, model: EvalModel, identities: dict[str, str], hashes: stages.HashCache) -> str:
    return stages.digest({**eval_settings_identity(config, hashes), "role": model.spec.role,
                   "models": {name: identities[name] for name in model.depends_on},
                   "base": identities["base"] if model.spec.base else None})


def eval_status(config: RunConfig, model: EvalModel, identities: dict[str, str], hashes: stages.HashCache) -> stages.Status:
    return stages.staged_status(config, eval_stage(model).replace(" ", "-"), eval_fingerprint(config, model, identities, hashes),
                          stages.eval_dir(config, model.spec.id) / RESULT_FILE)


def report_fingerprint(config: RunConfig, models: list[EvalModel], identities: dict[str, str]) -> str:
    return stages.digest({"models": [identities[eval_stage(m)] for m in models],
                   "bootstrap_iters": config.eval.get("bootstrap_iters"), "seed": config.eval.get("seed"),
                   "layout": [[m.spec.id, m.seed, m.k, m.merge] for m in models]})


def report_status(config: RunConfig, models: list[EvalModel], identities: dict[str, str]) -> stages.Status:
    return stages.staged_status(config, "report", report_fingerprint(config, models, identities),
                          stages.report_dir(config) / "report.json")
