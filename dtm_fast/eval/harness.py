"""The thin layer over lm-evaluation-harness: build its task list, load a model (a full model, a LoRA
adapter applied to its base in memory, the logit ensemble, or vLLM), run `simple_evaluate`, and read
each task's reported number and its per-question values out of the result."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.eval.config import EvalConfig, ModelSpec, TaskSpec

logger = logging.getLogger(__name__)
_NOT_METRICS = {"alias", "name", "sample_len", "samples", " "}
ADAPTER_CONFIG = "adapter_config.json"


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
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    from dtm_fast.eval.tasks import local_task_config

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


def choose_backend(requested: str, device: str, ensemble: bool, vllm_installed: bool | None = None) -> str:
    """hf or vllm. "auto" takes vLLM only where it can run (installed, a CUDA device) and the model is
    not the logit ensemble; "vllm" asked for where it cannot run is an error saying why."""
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    on_cuda = device.startswith("cuda")
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        if not vllm_installed:
            raise DtmError("eval: backend vllm needs the vllm package: pip install 'dtm_fast[vllm]'")
        if not on_cuda:
            raise DtmError(f"eval: backend vllm runs on CUDA devices only, not {device!r}; use backend: hf")
        if ensemble:
            raise DtmError("eval: the logit ensemble runs on the hf backend only")
        return "vllm"
    return "vllm" if vllm_installed and on_cuda and not ensemble else "hf"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, "auto")


def _adapter_on_base(spec: ModelSpec, config: EvalConfig):
    """A LoRA adapter applied to its base through peft and folded into the weights in memory, so it
    scores like the full model it stands for without a copy on disk."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = spec.base
    if base is None:
        try:
            base = json.loads((Path(spec.path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DtmError(f"{spec.path}: a LoRA adapter whose adapter_config.json names no base model; give "
                           "its base (--base, or ModelSpec.base)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_torch_dtype(config.dtype))
        model = PeftModel.from_pretrained(model, spec.path).merge_and_unload()
    except (OSError, ValueError) as error:
        raise DtmError(f"{spec.path}: cannot apply the adapter to {base} ({error})") from None
    tokenizer_source = spec.path if (Path(spec.path) / "tokenizer_config.json").is_file() else base
    return model.to(config.device).eval(), AutoTokenizer.from_pretrained(tokenizer_source)


def hflm_arguments(config: EvalConfig) -> dict[str, Any]:
    return {"device": config.device, "batch_size": config.batch_size, "dtype": config.dtype}


def load_model(spec: ModelSpec, config: EvalConfig, sub_paths: list[str] | None = None):
    """The lm_eval model object for one ModelSpec (sub_paths: the ensemble's members)."""
    backend = choose_backend(config.backend, config.device, sub_paths is not None)
    if config.device == "cpu":
        from dtm_fast.threads import configure_cpu_threads

        configure_cpu_threads()
    if sub_paths is not None:
        from dtm_fast.eval.ensemble import LogitEnsembleLM

        return LogitEnsembleLM(sub_paths, **hflm_arguments(config))
    if backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        if is_adapter(spec.path):
            return VLLM(pretrained=spec.base, lora_local_path=spec.path, batch_size=config.batch_size,
                        dtype=config.dtype, enable_lora=True)
        return VLLM(pretrained=spec.path, batch_size=config.batch_size, dtype=config.dtype)
    from dtm_fast.eval.continuation_lm import ContinuationLM

    try:
        if is_adapter(spec.path):
            model, tokenizer = _adapter_on_base(spec, config)
            return ContinuationLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size,
                                  device=config.device)
        return ContinuationLM(pretrained=spec.path, **hflm_arguments(config))
    except (OSError, ValueError) as error:  # missing files, or a name that is neither a directory nor a hub id
        raise DtmError(f"{spec.path}: cannot load a model from it ({error})") from None


def run_harness(lm, tasks: list[Any], task_manager, config: EvalConfig, cache_requests: bool) -> dict[str, Any]:
    """lm_eval's result dict for one model, with its per-sample logs."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=config.num_fewshot, limit=config.limit,
        bootstrap_iters=0, log_samples=True, cache_requests=cache_requests,
        apply_chat_template=config.apply_chat_template, fewshot_as_multiturn=config.fewshot_as_multiturn,
        random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
        fewshot_random_seed=config.seed)
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
    if samples is None:  # a group: the questions of its subtasks
        samples = sum(results.get("n-samples", {}).get(sub, {}).get("effective", 0)
                      for sub in subtasks_of(results, task.name)) or None
    return TaskScore(metric=key, value=float(section[key]), stderr=stderr, samples=samples)


def subtasks_of(results: dict[str, Any], name: str) -> list[str]:
    """The leaf tasks whose samples make up `name` (itself when it is a task, not a group)."""
    groups = results.get("group_subtasks", {})
    if name not in groups or not groups[name]:
        return [name]
    leaves = []
    for sub in groups[name]:
        leaves += subtasks_of(results, sub)
    return leaves


def per_question(results: dict[str, Any], task: TaskSpec, metric_key: str) -> dict[str, list]:
    """Per question of one task (a group: of all its subtasks), in a fixed order: "keys"
    (subtask:doc_id), the reported metric's value, acc_norm where the task has it, and for
    multiple-choice tasks the log-likelihood of the gold answer (the continuous score)."""
    metric, _, filter_name = metric_key.partition(",")
    keys, values, norms, gold = [], [], [], []
    for subtask in subtasks_of(results, task.name):
        samples = results.get("samples", {}).get(subtask, [])
        for sample in sorted(samples, key=lambda s: s.get("doc_id", 0)):
            if sample.get("filter", "none") != filter_name:
                continue
            keys.append(f"{subtask}:{sample.get('doc_id')}")
            values.append(_as_float(sample.get(metric)))
            norms.append(_as_float(sample.get("acc_norm")))
            gold.append(_gold_loglikelihood(sample))
    columns: dict[str, list] = {"keys": keys, "value": values}
    if norms and all(v is not None for v in norms):
        columns["acc_norm"] = norms
    if gold and all(v is not None for v in gold):
        columns["gold_logprob"] = gold
    return columns


def _gold_loglikelihood(sample: dict[str, Any]) -> float | None:
    """The summed log-probability of the gold choice, for a multiple-choice sample scored by
    log-likelihood (resps: one [(loglik, is_greedy)] per choice); None for other tasks."""
    target, responses = sample.get("target"), sample.get("resps")
    if isinstance(target, bool) or not isinstance(target, int) or not isinstance(responses, list):
        return None
    if not 0 <= target < len(responses):
        return None
    try:
        return float(responses[target][0][0])
    except (TypeError, IndexError, ValueError):
        return None
