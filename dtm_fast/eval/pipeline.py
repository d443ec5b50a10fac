"""`evaluate(config)`: every model on every task through lm_eval, one model in memory at a time (the
ensemble holds its K sub-models together), then the alignment-tax report.

Each model's full lm_eval result is kept in results/<name>.json beside the report, so every number
in the report can be traced to what lm_eval returned.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

from dtm_fast import __version__
from dtm_fast.errors import DtmError
from dtm_fast.eval.config import ENSEMBLE_NAME, EvalConfig
from dtm_fast.eval.harness import build_tasks, hflm_arguments, load_model, require_lm_eval, run_harness, task_score
from dtm_fast.eval.report import build_report, write_report

logger = logging.getLogger(__name__)


def _check_output(config: EvalConfig) -> None:
    output = Path(config.output_dir)
    if (output / "report.json").exists() and not config.overwrite:
        raise DtmError(f"{output}: already holds a report; pass --overwrite to replace it, or choose another --output")
    for model in config.models:
        if Path(model.path).resolve() == output.resolve():
            raise DtmError(f"{output}: is the directory of model {model.name!r}; choose another --output")
        # "owner/name" may be a model in the Hugging Face cache; anything else must be a local directory
        looks_local = model.path.startswith((".", "/", "~")) or model.path.count("/") != 1
        if looks_local and not Path(model.path).expanduser().is_dir():
            raise DtmError(f"{model.path}: no such model directory (model {model.name!r})")


def _save_raw(results: dict[str, Any], output_dir: Path, name: str) -> None:
    raw_dir = output_dir / "results"
    raw_dir.mkdir(parents=True, exist_ok=True)
    kept = {key: results[key] for key in ("results", "groups", "configs", "versions", "n-shot", "n-samples",
                                           "higher_is_better", "config") if key in results}
    temporary = raw_dir / f".{name}.json.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(kept, indent=2, default=str) + "\n")
    os.replace(temporary, raw_dir / f"{name}.json")


def _score_model(lm, name: str, role: str, path: str, tasks: tuple[list[Any], Any],
                 config: EvalConfig) -> dict[str, Any]:
    results = run_harness(lm, *tasks, config)
    _save_raw(results, Path(config.output_dir), name)
    scores = {}
    for task in config.tasks:
        score = task_score(results, task)
        scores[task.name] = {"metric": score.metric, "value": score.value, "stderr": score.stderr,
                             "samples": score.samples}
    logger.info("%s: %s", name, ", ".join(f"{t} {s['value']:.4f}" for t, s in scores.items()))
    return {"name": name, "role": role, "path": path, "scores": scores}


def _release(lm) -> None:
    del lm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate config.models (and the sub-model ensemble) on config.tasks; write and return the report."""
    lm_eval = require_lm_eval()
    _check_output(config)
    tasks = build_tasks(config)  # bad task names and bad task files fail here, before any model loads
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for model in config.models:
        logger.info("evaluating %s (%s): %s", model.name, model.role, model.path)
        lm = load_model(model.path, config)
        rows.append(_score_model(lm, model.name, model.role, model.path, tasks, config))
        _release(lm)
    if config.ensemble:
        from dtm_fast.eval.ensemble import LogitEnsembleLM

        paths = [m.path for m in config.sub_models]
        logger.info("evaluating the logit ensemble of %d sub-models", len(paths))
        lm = LogitEnsembleLM(paths, **hflm_arguments(config))
        rows.append(_score_model(lm, ENSEMBLE_NAME, "ensemble", "+".join(paths), tasks, config))
        _release(lm)
    settings = {"limit": config.limit, "num_fewshot": config.num_fewshot, "seed": config.seed,
                "device": config.device, "dtype": config.dtype, "batch_size": config.batch_size,
                "task_files": {t.name: t.file for t in config.tasks if t.file}}
    versions = {"tool_version": __version__, "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
    base = config.base.name if config.base else None
    report = build_report(rows, [t.name for t in config.tasks], base, settings, versions)
    report["files"] = {kind: str(path) for kind, path in write_report(report, config.output_dir).items()}
    return report
