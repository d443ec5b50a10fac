"""`dtm eval`: evaluate several models with lm-evaluation-harness and write the alignment-tax report."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="[NAME=]MODEL",
                        help="further models to evaluate (Hugging Face directories); NAME defaults to the directory name")
    roles = parser.add_argument_group("the DTM experiment's models ([NAME=]PATH)")
    roles.add_argument("--base", help="the base model; every score is also shown as a difference to it")
    roles.add_argument("--vanilla", help="vanilla SFT on all the data")
    roles.add_argument("--sub", action="append", default=[], help="a sub-model (repeat for each)")
    roles.add_argument("--merged", help="the merged model")
    parser.add_argument("--ensemble", action="store_true",
                        help="also evaluate the logit ensemble of the --sub models (averaged logits)")
    parser.add_argument("-t", "--task", action="append", default=[], required=True, metavar="TASK",
                        help="an lm_eval task or group (mmlu, arc_challenge:acc_norm), or a local MMLU-format "
                             "jsonl ([NAME=]FILE.jsonl[:METRIC]); repeat for several")
    parser.add_argument("-o", "--output", required=True, help="report directory (report.json, .md, .png)")
    parser.add_argument("--limit", type=int, help="at most this many questions per task (smoke tests)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=batch_size, default=8, help="rows per forward pass, or auto")
    parser.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
                        help="wrap prompts in the tokenizer's chat template (or the named one)")
    parser.add_argument("--fewshot-as-multiturn", action="store_true",
                        help="with --apply-chat-template: few-shot examples as earlier turns")
    parser.add_argument("--backend", choices=("hf", "vllm", "auto"), default="hf",
                        help="hf (transformers), vllm (the vllm extra, CUDA), auto: vllm where it can run")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="resamples of the paired bootstrap behind every interval (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def batch_size(text: str):
    """An argparse type: a whole number, or auto / auto:N (checked by EvalConfig)."""
    return int(text) if text.lstrip("-").isdigit() else text


def _spec(text: str, role: str, default_name: str):
    from dtm_fast.eval.config import ModelSpec

    name, equals, path = text.partition("=")
    if not equals:
        name, path = default_name or Path(text.rstrip("/")).name, text
    return ModelSpec(name=name, path=path, role=role)


def model_specs(args: argparse.Namespace) -> tuple:
    specs = []
    if args.base:
        specs.append(_spec(args.base, "base", "base"))
    if args.vanilla:
        specs.append(_spec(args.vanilla, "vanilla", "vanilla"))
    specs += [_spec(text, "sub", f"sub-{index}") for index, text in enumerate(args.sub)]
    if args.merged:
        specs.append(_spec(args.merged, "merged", "merged"))
    specs += [_spec(text, "model", "") for text in args.models]
    return tuple(specs)


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui
    from dtm_fast.eval import EvalConfig, evaluate

    ui.configure(json_output=args.json, quiet=args.quiet)
    config = EvalConfig(models=model_specs(args), tasks=tuple(args.task), output_dir=args.output,
                        ensemble=args.ensemble, limit=args.limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
                        overwrite=args.overwrite, apply_chat_template=args.apply_chat_template,
                        fewshot_as_multiturn=args.fewshot_as_multiturn, backend=args.backend,
                        bootstrap_iters=args.bootstrap_iters)
    with ui.library_output_to(Path(config.output_dir) / "dtm-eval.log"):
        report = evaluate(config)
    show_report(report)
    return 0


def show_report(report: dict) -> None:
    """The report's tables on screen, the sentence that says what they show, and where the files are."""
    from dtm_fast import ui
    from dtm_fast.eval.report import axis_tables, summary_sentence, table_rows, vanilla_rows

    columns, rows = table_rows(report)
    ui.table("alignment tax" + (f" (difference to {report['base']})" if report["base"] else ""), columns, rows)
    vanilla = vanilla_rows(report)
    if vanilla:
        ui.table("difference to vanilla (same seed)", *vanilla)
    for title, table_columns, table_rows_ in axis_tables(report):
        ui.table(title, table_columns, table_rows_)
    ui.info(summary_sentence(report))
    files = report.get("files", {})
    if files:
        ui.info(f"wrote {files['json']}, {files['markdown']} and {files['png']}")
