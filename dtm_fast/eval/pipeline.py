"""`evaluate(config)`: every model on every task through lm_eval, one model in memory at a time (the
ensemble holds its K sub-models together), then the alignment-tax report.

`evaluate_model` is one model's evaluation: its scores, its per-question values (what the paired
bootstrap resamples) and lm_eval's per-sample log (samples/<model>/<task>.jsonl), written so that
`dtm run` can keep each model's result and resume model by model. lm_eval's request cache is shared
by every model evaluated into one folder: it holds dill pickles, so dtm records the hash of each cache
file it wrote and refuses to let lm_eval load one it did not write.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

from dtm_fast import __version__
from dtm_fast.errors import DtmError
from dtm_fast.eval.config import ENSEMBLE_NAME, EvalConfig, ModelSpec
from dtm_fast.eval.harness import build_tasks, load_model, per_question, require_lm_eval, run_harness, task_score
from dtm_fast.eval.report import build_report, write_report
from dtm_fast.io.atomic import dumps_json, write_json, write_text
from dtm_fast.io.hashing import file_sha256
from dtm_fast.io.owned_dir import check_replaceable, check_separate

logger = logging.getLogger(__name__)
TOOL = "dtm eval"
CACHE_INDEX = "written-by-dtm.json"


def _check_models_exist(config: EvalConfig) -> None:
    for model in config.models:
        for path in model.path.split("+") if model.role == "ensemble" else [model.path]:
            # "owner/name" may be a model in the Hugging Face cache; anything else must be a local directory
            looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
            if looks_local and not Path(path).expanduser().is_dir():
                raise DtmError(f"{path}: no such model directory (model {model.name!r})")


class RequestCache:
    """lm_eval's request cache in `folder`, loaded only when every file in it is one dtm wrote."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index_path = folder / CACHE_INDEX

    def _index(self) -> dict[str, str]:
        import json

        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def activate(self) -> None:
        from lm_eval.caching import cache

        self.folder.mkdir(parents=True, exist_ok=True)
        index = self._index()
        for path in self.folder.glob("*.pickle"):
            if index.get(path.name) != file_sha256(path):
                raise DtmError(f"{path}: a request-cache file dtm did not write (or that changed since); lm_eval "
                               "would unpickle it, which can run code: remove it, or the folder, and rerun")
        cache.PATH = str(self.folder)

    def record(self) -> None:
        index = {path.name: file_sha256(path) for path in sorted(self.folder.glob("*.pickle"))}
        write_json(self.index_path, index)


def evaluate_model(model: ModelSpec, config: EvalConfig, tasks: tuple[list[Any], Any], samples_dir: Path,
                   cache: RequestCache | None, sub_paths: list[str] | None = None) -> dict[str, Any]:
    """One model on every task: {"id", "name", "role", "path", "scores", "per_question"}; lm_eval's
    per-sample log goes to samples_dir/<task>.jsonl."""
    logger.info("evaluating %s (%s): %s", model.id, model.role, model.path)
    lm = load_model(model, config, sub_paths)
    if cache is not None:
        cache.activate()
    try:
        results = run_harness(lm, *tasks, config, cache_requests=cache is not None)
    finally:
        _release(lm)
    if cache is not None:
        cache.record()
    scores, questions = {}, {}
    for task in config.tasks:
        score = task_score(results, task)
        columns = per_question(results, task, score.metric)
        entry = {"metric": score.metric, "value": score.value, "stderr": score.stderr, "samples": score.samples}
        for measure in ("acc_norm", "gold_logprob"):
            if measure in columns:
                entry[measure] = sum(columns[measure]) / len(columns[measure])
        scores[task.name] = entry
        questions[task.name] = columns
    samples_dir.mkdir(parents=True, exist_ok=True)
    for name, samples in results.get("samples", {}).items():
        write_text(samples_dir / f"{name}.jsonl", "".join(dumps_json(sample, indent=None) for sample in samples))
    logger.info("%s: %s", model.id, ", ".join(f"{t} {s['value']:.4f}" for t, s in scores.items()))
    kept = {key: results[key] for key in ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples",
                                          "higher_is_better", "config") if key in results}
    return {"id": model.id, "name": model.name, "role": model.role, "path": model.path, "scores": scores,
            "per_question": questions, "lm_eval": json.loads(dumps_json(kept))}


def _release(lm) -> None:
    del lm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def report_settings(config: EvalConfig) -> dict[str, Any]:
    return {"limit": config.limit, "num_fewshot": config.num_fewshot, "seed": config.seed,
            "device": config.device, "dtype": config.dtype, "batch_size": config.batch_size,
            "apply_chat_template": config.apply_chat_template, "fewshot_as_multiturn": config.fewshot_as_multiturn,
            "backend": config.backend, "task_files": {t.name: t.file for t in config.tasks if t.file}}


def versions() -> dict[str, str]:
    lm_eval = require_lm_eval()
    return {"tool_version": __version__, "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


def finish_report(results: list[dict[str, Any]], config: EvalConfig) -> dict[str, Any]:
    report = build_report(results, [t.name for t in config.tasks], report_settings(config), versions(),
                          config.bootstrap_iters, config.seed)
    report["files"] = {kind: str(path) for kind, path in write_report(report, config.output_dir).items()}
    return report


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate config.models (and the sub-model ensemble) on config.tasks; write and return the report."""
    require_lm_eval()
    output = Path(config.output_dir)
    check_separate(output, [(f"model {m.name!r}", Path(m.path)) for m in config.models if Path(m.path).exists()])
    if (output / "report.json").exists() and not config.overwrite:
        raise DtmError(f"{output}: already holds a report; pass --overwrite to replace it, or choose another --output")
    check_replaceable(output, TOOL, overwrite=True, replace_own=True)
    _check_models_exist(config)
    tasks = build_tasks(config)  # bad task names and bad task files fail here, before any model loads
    output.mkdir(parents=True, exist_ok=True)
    cache = RequestCache(output / "request-cache")
    results = []
    for model in config.models:
        result = evaluate_model(model, config, tasks, output / "samples" / model.id, cache)
        (output / "results").mkdir(exist_ok=True)
        write_json(output / "results" / f"{model.id}.json", result)
        results.append(result)
    if config.ensemble:
        paths = [m.path for m in config.sub_models]
        ensemble = ModelSpec(ENSEMBLE_NAME + "-of-subs", "+".join(paths), "ensemble")
        result = evaluate_model(ensemble, config, tasks, output / "samples" / ENSEMBLE_NAME, cache, sub_paths=paths)
        result.update(id=ENSEMBLE_NAME, name=ENSEMBLE_NAME)
        write_json(output / "results" / f"{ENSEMBLE_NAME}.json", result)
        results.append(result)
    return finish_report(results, config)
