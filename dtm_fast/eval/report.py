"""The alignment-tax report: every benchmark for base, vanilla SFT, each sub-model, the merged model
(and the ensemble), with the difference of each to the base model; written as report.json (all
numbers exactly as lm_eval returned them), report.md (the table) and report.png (the chart)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# the order of the table's rows; the ensemble of the sub-models sits beside the merged model
ROW_ORDER = ("base", "vanilla", "sub", "merged", "ensemble", "model")

# Metrics in [0, 1] that read better as percentages (what papers print: MMLU 49.74).
PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "mc1", "mc2", "pass@1", "pass_at_1", "f1", "em",
                   "prompt_level_strict_acc", "inst_level_strict_acc"}


def is_percent(metric_key: str) -> bool:
    return metric_key.partition(",")[0] in PERCENT_METRICS


def display_value(value: float, metric_key: str) -> float:
    return value * 100 if is_percent(metric_key) else value


def build_report(rows: list[dict[str, Any]], task_names: list[str], base_name: str | None,
                 settings: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    """rows: [{"name", "role", "path", "scores": {task: {"metric", "value", "stderr", "samples"}}}]
    in evaluation order. Adds the per-task difference to the base and the means."""
    base_scores = next((row["scores"] for row in rows if row["name"] == base_name), None)
    models = []
    for row in rows:
        values = [row["scores"][task]["value"] for task in task_names]
        entry = {**row, "mean": sum(values) / len(values)}
        if base_scores is not None:
            entry["delta_to_base"] = {task: row["scores"][task]["value"] - base_scores[task]["value"] for task in task_names}
            entry["mean_delta_to_base"] = sum(entry["delta_to_base"].values()) / len(task_names)
        models.append(entry)
    models.sort(key=lambda entry: ROW_ORDER.index(entry["role"]))  # stable: keeps the order given
    metrics = {task: rows[0]["scores"][task]["metric"] for task in task_names}
    return {"tool": "dtm_fast", **versions, "base": base_name,
            "tasks": [{"name": task, "metric": metrics[task]} for task in task_names],
            "models": models, "settings": settings}


def _cell(value: float, metric_key: str, delta: float | None) -> str:
    text = f"{display_value(value, metric_key):.2f}"
    if delta is not None:
        text += f" ({display_value(delta, metric_key):+.2f})"
    return text


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table shown on screen and in report.md: one row per model, one column per task."""
    tasks = report["tasks"]
    columns = ["model", "role"] + [f"{t['name']} ({t['metric'].partition(',')[0]})" for t in tasks] + ["mean"]
    # the mean is shown in percent only when every task is a percentage metric
    mean_key = "acc,none" if all(is_percent(t["metric"]) for t in tasks) else "value"
    rows = []
    for model in report["models"]:
        deltas = model.get("delta_to_base")
        show_delta = deltas is not None and model["name"] != report["base"]
        cells = [_cell(model["scores"][t["name"]]["value"], t["metric"], deltas[t["name"]] if show_delta else None)
                 for t in tasks]
        cells.append(_cell(model["mean"], mean_key, model.get("mean_delta_to_base") if show_delta else None))
        rows.append([model["name"], model["role"], *cells])
    return columns, rows


def to_markdown(report: dict[str, Any]) -> str:
    columns, rows = table_rows(report)
    lines = ["# Alignment-tax report", ""]
    if report["base"]:
        lines.append(f"Scores in percent where the metric is a rate; in brackets the difference to the base "
                     f"model `{report['base']}` (positive: better than base).")
    else:
        lines.append("No base model was given, so no differences are shown.")
    settings = report["settings"]
    lines += ["", f"lm_eval {report.get('lm_eval_version', '?')}, limit {settings.get('limit') or 'none (full tasks)'}, "
                  f"few-shot {settings.get('num_fewshot') if settings.get('num_fewshot') is not None else 'task default'}, seed {settings.get('seed')}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t["name"] for t in report["tasks"]]
    metrics = {t["name"]: t["metric"] for t in report["tasks"]}
    models = report["models"]
    panels = 2 if report["base"] else 1
    figure, axes = plt.subplots(1, panels, figsize=(max(6, 1.6 * len(tasks) * panels + 3), 4.5), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(tasks))
    for index, model in enumerate(models):
        offsets = x - 0.4 + width * (index + 0.5)
        values = [display_value(model["scores"][t]["value"], metrics[t]) for t in tasks]
        axes[0][0].bar(offsets, values, width, label=f"{model['name']} ({model['role']})")
        if panels == 2:
            deltas = [display_value(model["delta_to_base"][t], metrics[t]) for t in tasks]
            axes[0][1].bar(offsets, deltas, width)
    percent = all(is_percent(metrics[t]) for t in tasks)
    axes[0][0].set_title("score" + (" (%)" if percent else ""))
    if panels == 2:
        axes[0][1].set_title(f"difference to base ({report['base']})")
        axes[0][1].axhline(0, color="black", linewidth=0.8)
    for axis in axes[0]:
        axis.set_xticks(x)
        axis.set_xticklabels(tasks, rotation=20, ha="right")
    figure.suptitle("DTM alignment tax")
    # the legend goes below the panels, where it cannot cover a bar
    figure.legend(loc="lower center", ncol=min(len(models), 4), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06 * ((len(models) + 3) // 4) + 0.02, 1, 1))
    figure.savefig(path, dpi=120, format="png")  # the temporary name does not end in .png
    plt.close(figure)


def _replace_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md and report.png in output_dir; each file appears complete or not at all."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "markdown": output / "report.md", "png": output / "report.png"}
    _replace_atomically(paths["json"], lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    _replace_atomically(paths["markdown"], lambda p: p.write_text(to_markdown(report)))
    _replace_atomically(paths["png"], lambda p: write_chart(report, p))
    return paths
