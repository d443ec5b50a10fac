"""The thin layer over lm-evaluation-harness: build its task list, load a model as its `HFLM`, run
`simple_evaluate`, and read the reported number of each task out of its results."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.eval.config import EvalConfig, TaskSpec

logger = logging.getLogger(__name__)
_NOT_METRICS = {"alias", "name", "sample_len", "samples", " "}


@dataclass(frozen=True)
class TaskScore:
    metric: str  # lm_eval's key, "acc,none"
    value: float
    stderr: float | None
    samples: int | None


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise DtmError("dtm eval needs lm-evaluation-harness: pip install 'dtm_fast[eval]' (or lm_eval)") from None
    return lm_eval


def build_tasks(config: EvalConfig) -> tuple[list[Any], Any]:
    """lm_eval task entries (names of its built-in tasks, dicts for local files) and the TaskManager
    to resolve them with. Unknown built-in names are reported here, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    from dtm_fast.eval.tasks import local_task_config

    require_lm_eval()
    entries: list[Any] = []
    builtin = [task.name for task in config.tasks if task.file is None]
    # indexing lm_eval's ~15k built-in task files takes seconds; local files alone do not need it
    task_manager = TaskManager(include_defaults=bool(builtin))
    if builtin:
        known = set(task_manager.all_tasks)
        missing = [name for name in builtin if name not in known]
        if missing:
            raise DtmError(f"eval: lm_eval has no task {', '.join(map(repr, missing))}; check `lm_eval ls tasks`, "
                           "or give a local MMLU-format file (--task NAME=FILE.jsonl)")
    for task in config.tasks:
        entries.append(task.name if task.file is None else local_task_config(task.name, task.file, config.limit))
    return entries, task_manager


def hflm_arguments(config: EvalConfig) -> dict[str, Any]:
    return {"device": config.device, "batch_size": config.batch_size, "dtype": config.dtype}


def load_model(path: str, config: EvalConfig):
    from lm_eval.models.huggingface import HFLM

    try:
        return HFLM(pretrained=path, **hflm_arguments(config))
    except (OSError, ValueError) as error:  # missing files, or a name that is neither a directory nor a hub id
        raise DtmError(f"{path}: cannot load a model from it ({error})") from None


def run_harness(lm, tasks: list[Any], task_manager, config: EvalConfig) -> dict[str, Any]:
    """lm_eval's result dict for one model (per-sample logs dropped)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=config.num_fewshot, limit=config.limit,
        bootstrap_iters=config.bootstrap_iters, log_samples=False, random_seed=config.seed,
        numpy_random_seed=config.seed, torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    if results is None:
        raise DtmError("lm_eval returned no results (this process is not rank 0 of a distributed run)")
    return results


def _as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def task_score(results: dict[str, Any], task: TaskSpec) -> TaskScore:
    """The reported number of one task: the metric the user named, else the task's first metric."""
    section = results.get("results", {}).get(task.name) or results.get("groups", {}).get(task.name)
    if section is None:
        raise DtmError(f"eval: lm_eval returned no result for task {task.name!r}")
    metrics = [key for key, value in section.items()
               if key not in _NOT_METRICS and "_stderr" not in key and _as_float(value) is not None]
    if task.metric is not None:
        wanted = task.metric if "," in task.metric else f"{task.metric},none"
        if wanted not in metrics:
            raise DtmError(f"eval: task {task.name!r} has no metric {task.metric!r}; it reports "
                           f"{', '.join(metrics) or 'nothing'}")
        key = wanted
    elif metrics:
        key = metrics[0]
    else:
        raise DtmError(f"eval: task {task.name!r} reported no numeric metric")
    name, _, filter_name = key.partition(",")
    stderr = _as_float(section.get(f"{name}_stderr,{filter_name}"))
    samples = results.get("n-samples", {}).get(task.name, {}).get("effective")
    return TaskScore(metric=key, value=float(section[key]), stderr=stderr, samples=samples)
