"""Evaluation through lm-evaluation-harness and the alignment-tax report.

    from dtm_fast.eval import EvalConfig, ModelSpec, evaluate
    report = evaluate(EvalConfig(
        models=(ModelSpec("base", "base/", "base"), ModelSpec("merged", "merged/", "merged")),
        tasks=("mmlu=data/mmlu.jsonl",), output_dir="report"))
    report["models"][1]["delta_to_base"]["mmlu"]

Importing this package loads neither torch nor lm_eval; `evaluate` does.
"""

from dtm_fast.eval.config import EvalConfig, ModelSpec, TaskSpec


def evaluate(config: EvalConfig) -> dict:
    from dtm_fast.eval.pipeline import evaluate as run_evaluation

    return run_evaluation(config)


__all__ = ["EvalConfig", "ModelSpec", "TaskSpec", "evaluate"]
