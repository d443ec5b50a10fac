"""The alignment-tax report: every benchmark for base, vanilla SFT, each sub-model, the merged model
(and the ensemble), each with its difference to the base and to the vanilla baseline of its seed,
with a 95% paired bootstrap interval over the questions for every difference (eval/statistics.py).
Beside the reported metric, the continuous scores: the mean log-likelihood of the gold answer
(multiple-choice tasks) and acc_norm where the task has it, which move before an accuracy on a few
hundred questions does. With seeds, K values or merge settings swept (`dtm run`), one table per axis.

Written as report.json (every number, lm_eval's values unrounded), report.md and report.png."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from dtm_fast.eval.statistics import across_seeds, paired_bootstrap
from dtm_fast.io.atomic import write_bytes, write_json, write_text

# the order of the table's rows; the ensemble of the sub-models sits beside the merged model
ROW_ORDER = ("base", "vanilla", "sub", "merged", "ensemble", "model")
# Metrics in [0, 1] that read better as percentages (what papers print: MMLU 49.74).
PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "mc1", "mc2", "pass@1", "pass_at_1", "f1", "em",
                   "prompt_level_strict_acc", "inst_level_strict_acc"}
MEASURE_TITLES = {"acc_norm": "acc_norm", "gold_logprob": "log-likelihood of the gold answer (nats)"}
MARK = "*"


def is_percent(metric_key: str) -> bool:
    return metric_key.partition(",")[0] in PERCENT_METRICS


def display_value(value: float, metric_key: str) -> float:
    return value * 100 if is_percent(metric_key) else value


def _measure_key(task: dict[str, Any], measure: str) -> str:
    """The metric key a measure is displayed as (percent or not)."""
    return task["metric"] if measure == "value" else measure


def _format(value: float | None, key: str, signed: bool = False) -> str:
    if value is None:
        return "–"
    shown = display_value(value, key)
    digits = 2 if is_percent(key) else 3
    return f"{shown:+.{digits}f}" if signed else f"{shown:.{digits}f}"


def _interval_text(interval: dict[str, Any] | None, key: str) -> str:
    if interval is None:
        return "–"
    text = _format(interval["estimate"], key, signed=True)
    if interval.get("low") is not None:
        text += f" [{_format(interval['low'], key, True)}, {_format(interval['high'], key, True)}]"
        if interval.get("excludes_zero"):
            text += MARK
    return text


# ---- building ----------------------------------------------------------------------------------
def _paired(model: dict, other: dict, task: str, measure: str, iterations: int, seed: int) -> dict | None:
    mine, theirs = model["per_question"].get(task, {}), other["per_question"].get(task, {})
    if measure not in mine or measure not in theirs:
        return None
    if mine["keys"] != theirs["keys"]:
        return None  # not the same questions: no paired difference
    return paired_bootstrap(mine[measure], theirs[measure], iterations, seed).as_dict()


def _measures(models: list[dict], task: str) -> list[str]:
    measures = ["value"]
    for extra in ("acc_norm", "gold_logprob"):
        if all(extra in m["per_question"].get(task, {}) for m in models):
            measures.append(extra)
    return measures


def build_report(results: list[dict[str, Any]], task_names: list[str], settings: dict[str, Any],
                 versions: dict[str, str], bootstrap_iters: int, seed: int) -> dict[str, Any]:
    """results: one per model as evaluate_model returns it ({"id", "name", "role", "path", "seed",
    "k", "merge", "scores", "per_question"}), in evaluation order."""
    base = next((r for r in results if r["role"] == "base"), None)
    vanilla_of = {r.get("seed"): r for r in results if r["role"] == "vanilla"}
    tasks = [{"name": t, "metric": results[0]["scores"][t]["metric"], "measures": _measures(results, t)}
             for t in task_names]
    models = []
    for row in results:
        values = [row["scores"][t]["value"] for t in task_names]
        entry = {key: value for key, value in row.items() if key not in ("per_question", "lm_eval")}
        entry["mean"] = sum(values) / len(values)
        comparisons: dict[str, Any] = {}
        for label, other in (("to_base", base), ("to_vanilla", vanilla_of.get(row.get("seed")))):
            if other is None or other is row or (label == "to_vanilla" and row["role"] in ("base", "vanilla")):
                continue
            comparisons[label] = {"model": other["id"], "tasks": {
                task["name"]: {measure: _paired(row, other, task["name"], measure, bootstrap_iters, seed)
                               for measure in task["measures"]} for task in tasks}}
        entry["comparisons"] = comparisons
        if base is not None:
            entry["delta_to_base"] = {t: row["scores"][t]["value"] - base["scores"][t]["value"] for t in task_names}
            entry["mean_delta_to_base"] = sum(entry["delta_to_base"].values()) / len(task_names)
        models.append(entry)
    models.sort(key=lambda entry: ROW_ORDER.index(entry["role"]))  # stable: keeps the order given
    report = {"tool": "dtm_fast", **versions, "base": base["id"] if base else None, "tasks": tasks,
              "models": models, "settings": {**settings, "bootstrap_iters": bootstrap_iters, "bootstrap_seed": seed}}
    report["axes"] = _axes(models, tasks)
    return report


def _arm(model: dict) -> tuple:
    """What a model is apart from its seed: the rows of the across-seeds table."""
    return (model["role"], model.get("k"), model.get("merge"), model["name"] if model["role"] == "sub" else None)


def _arm_label(model: dict) -> str:
    parts = [model["name"]]
    if model.get("k") is not None:
        parts.append(f"K={model['k']}")
    return " ".join(parts)


def _axes(models: list[dict], tasks: list[dict]) -> dict[str, Any]:
    """One table per swept axis: across seeds (mean, spread, t interval), by K, by merge setting."""
    seeds = sorted({m.get("seed") for m in models if m.get("seed") is not None})
    ks = sorted({m.get("k") for m in models if m.get("k") is not None})
    merges = list(dict.fromkeys(m.get("merge") for m in models if m.get("merge") is not None))
    axes: dict[str, Any] = {}
    compared = [m for m in models if m["role"] in ("base", "vanilla", "merged", "ensemble")]
    if len(seeds) > 1:
        rows = []
        for arm in dict.fromkeys(_arm(m) for m in compared):
            members = [m for m in compared if _arm(m) == arm]
            row = {"arm": _arm_label(members[0]), "role": arm[0], "k": arm[1], "merge": arm[2],
                   "seeds": [m.get("seed") for m in members], "tasks": {}}
            for task in tasks:
                row["tasks"][task["name"]] = {}
                for measure in task["measures"]:
                    scores = [_score(m, task["name"], measure) for m in members]
                    deltas = [((m.get("comparisons", {}).get("to_vanilla") or {}).get("tasks", {})
                               .get(task["name"], {}).get(measure) or {}).get("estimate") for m in members]
                    row["tasks"][task["name"]][measure] = {
                        "score": across_seeds(scores).as_dict(),
                        "delta_to_vanilla": across_seeds(deltas).as_dict() if all(d is not None for d in deltas) else None}
            rows.append(row)
        axes["seed"] = {"seeds": seeds, "rows": rows}
    for axis, values, field in (("k", ks, "k"), ("merge", merges, "merge")):
        if len(values) > 1:
            rows = []
            for value in values:
                members = [m for m in models if m["role"] == "merged" and m.get(field) == value]
                row = {field: value, "tasks": {}}
                for task in tasks:
                    row["tasks"][task["name"]] = {measure: _pooled(members, task["name"], measure)
                                                  for measure in task["measures"]}
                rows.append(row)
            axes[axis] = {"values": values, "rows": rows}
    return axes


def _score(model: dict, task: str, measure: str) -> float:
    score = model["scores"][task]
    return score["value"] if measure == "value" else score[measure]


def _pooled(members: list[dict], task: str, measure: str) -> dict[str, Any]:
    """Merged models of one K or one merge setting (one per seed, or per other axis value): their
    mean score and difference to vanilla; across seeds a t interval, for one model its bootstrap."""
    scores = [_score(m, task, measure) for m in members]
    deltas = [((m.get("comparisons", {}).get("to_vanilla") or {}).get("tasks", {}).get(task, {}).get(measure))
              for m in members]
    summary: dict[str, Any] = {"score": across_seeds(scores).as_dict(), "models": [m["id"] for m in members]}
    if all(d is not None for d in deltas) and deltas:
        if len(deltas) == 1:
            summary["delta_to_vanilla"] = deltas[0]
        else:
            seeds = across_seeds([d["estimate"] for d in deltas])
            summary["delta_to_vanilla"] = {"estimate": seeds.mean, **{k: v for k, v in seeds.as_dict().items()
                                                                      if k in ("low", "high", "excludes_zero")}}
    return summary


# ---- showing ----------------------------------------------------------------------------------
def _comparison(model: dict, label: str, task: str, measure: str) -> dict | None:
    return ((model.get("comparisons", {}).get(label) or {}).get("tasks", {}).get(task, {}) or {}).get(measure)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table, on screen and in report.md: one row per model; per task its reported
    metric and each continuous score, each with its difference to base [95% interval]."""
    columns = ["model", "role"]
    for task in report["tasks"]:
        for measure in task["measures"]:
            label = task["metric"].partition(",")[0] if measure == "value" else (
                "gold logprob" if measure == "gold_logprob" else measure)
            columns.append(f"{task['name']} {label}")
    rows = []
    for model in report["models"]:
        cells = [model["id"], model["role"]]
        for task in report["tasks"]:
            for measure in task["measures"]:
                key = _measure_key(task, measure)
                text = _format(_score(model, task["name"], measure), key)
                delta = _comparison(model, "to_base", task["name"], measure)
                if delta is not None:
                    text += f" ({_interval_text(delta, key)})"
                cells.append(text)
        rows.append(cells)
    return columns, rows


def vanilla_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Differences to the vanilla baseline of the same seed (merged vs vanilla: the DTM question)."""
    columns = ["model", "vs"]
    for task in report["tasks"]:
        for measure in task["measures"]:
            columns.append(f"{task['name']} {'gold logprob' if measure == 'gold_logprob' else measure if measure != 'value' else task['metric'].partition(',')[0]}")
    rows = []
    for model in report["models"]:
        comparison = model.get("comparisons", {}).get("to_vanilla")
        if not comparison:
            continue
        cells = [model["id"], comparison["model"]]
        for task in report["tasks"]:
            for measure in task["measures"]:
                cells.append(_interval_text(_comparison(model, "to_vanilla", task["name"], measure),
                                            _measure_key(task, measure)))
        rows.append(cells)
    return (columns, rows) if rows else None


def axis_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    axes = report.get("axes", {})
    for task in report["tasks"]:
        for measure in task["measures"]:
            key = _measure_key(task, measure)
            what = f"{task['name']} {task['metric'].partition(',')[0] if measure == 'value' else MEASURE_TITLES[measure]}"
            if "seed" in axes:
                rows = []
                for row in axes["seed"]["rows"]:
                    cell = row["tasks"][task["name"]][measure]
                    score = cell["score"]
                    spread = f" ± {_format(score['std'], key)}" if score["std"] is not None else ""
                    interval = f" [{_format(score['low'], key)}, {_format(score['high'], key)}]" if score["low"] is not None else ""
                    delta = cell["delta_to_vanilla"]
                    delta_text = "–" if delta is None else _interval_text({"estimate": delta["mean"], **delta}, key)
                    rows.append([row["arm"], f"{_format(score['mean'], key)}{spread}{interval}", delta_text])
                tables.append((f"across seeds {axes['seed']['seeds']}: {what} (mean ± sd [95% t interval])",
                               ["model", "score", "Δ vanilla (mean [95% t interval])"], rows))
            for axis in ("k", "merge"):
                if axis in axes:
                    rows = []
                    for row in axes[axis]["rows"]:
                        cell = row["tasks"][task["name"]][measure]
                        rows.append([str(row[axis]), _format(cell["score"]["mean"], key),
                                     _interval_text(cell.get("delta_to_vanilla"), key)])
                    tables.append((f"by {'K' if axis == 'k' else 'merge setting'}: {what} of the merged model",
                                   [axis, "score", "Δ vanilla [95%]"], rows))
    return tables


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_sentence(report: dict[str, Any]) -> str:
    """What the numbers do and do not show, said plainly."""
    settings = report["settings"]
    return (f"Each difference is paired on the same questions with a 95% bootstrap interval over those questions "
            f"({settings.get('bootstrap_iters')} resamples, seed {settings.get('bootstrap_seed')}); {MARK} marks an "
            "interval that excludes zero. The intervals cover question sampling only: with one training seed they "
            "say nothing about how much another seed would move a model.")


def to_markdown(report: dict[str, Any]) -> str:
    columns, rows = table_rows(report)
    lines = ["# Alignment-tax report", ""]
    if report["base"]:
        lines.append(f"Scores in percent where the metric is a rate (log-likelihoods in nats); in brackets the "
                     f"difference to the base model `{report['base']}` with its 95% interval (positive: better).")
    else:
        lines.append("No base model was given, so no differences to it are shown.")
    settings = report["settings"]
    lines += ["", f"lm_eval {report.get('lm_eval_version', '?')}, limit {settings.get('limit') or 'none (full tasks)'}, "
                  f"few-shot {settings.get('num_fewshot') if settings.get('num_fewshot') is not None else 'task default'}, "
                  f"seed {settings.get('seed')}", ""]
    lines += _markdown_table(columns, rows)
    vanilla = vanilla_rows(report)
    if vanilla:
        lines += ["", "## Difference to the vanilla baseline (same seed)", ""] + _markdown_table(*vanilla)
    for title, table_columns, table_rows_ in axis_tables(report):
        lines += ["", f"## {title}", ""] + _markdown_table(table_columns, table_rows_)
    lines += ["", summary_sentence(report)]
    return "\n".join(lines) + "\n"


def chart_png(report: dict[str, Any]) -> bytes:
    """Per task and measure, each model's difference to base with its interval; a solid bar is
    an interval that excludes zero, a hatched one an interval that does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, measure) for task in report["tasks"] for measure in task["measures"]]
    models = [m for m in report["models"] if m["role"] != "base"] if report["base"] else report["models"]
    figure, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.2 * len(panels)), 4.8), squeeze=False)
    for axis, (task, measure) in zip(axes[0], panels):
        key = _measure_key(task, measure)
        names = [m["id"] for m in models]
        for position, model in enumerate(models):
            if report["base"]:
                delta = _comparison(model, "to_base", task["name"], measure) or {}
                value = display_value(delta.get("estimate", 0.0), key)
                error = None
                if delta.get("low") is not None:
                    error = [[value - display_value(delta["low"], key)], [display_value(delta["high"], key) - value]]
                axis.bar(position, value, yerr=error, capsize=3, color="tab:blue" if delta.get("excludes_zero") else "white",
                         edgecolor="tab:blue", hatch=None if delta.get("excludes_zero") else "//")
            else:
                axis.bar(position, display_value(_score(model, task["name"], measure), key), color="tab:blue")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        title = task["metric"].partition(",")[0] if measure == "value" else MEASURE_TITLES[measure]
        axis.set_title(f"{task['name']}: {title}" + (" - base" if report["base"] else ""), fontsize=9)
    figure.suptitle("DTM alignment tax: difference to base, 95% paired bootstrap (solid: excludes 0)", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md and report.png in output_dir; each file appears complete or not at all."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "markdown": output / "report.md", "png": output / "report.png"}
    write_json(paths["json"], report)
    write_text(paths["markdown"], to_markdown(report))
    write_bytes(paths["png"], chart_png(report))
    return paths
