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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


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
    from dtm_fast.eval.report import table_rows

    ui.configure(json_output=args.json, quiet=args.quiet)
    config = EvalConfig(models=model_specs(args), tasks=tuple(args.task), output_dir=args.output,
                        ensemble=args.ensemble, limit=args.limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
                        overwrite=args.overwrite)
    report = evaluate(config)
    columns, rows = table_rows(report)
    ui.table("alignment tax" + (f" (difference to {report['base']})" if report["base"] else ""), columns, rows)
    ui.info(f"wrote {report['files']['json']}, {report['files']['markdown']} and {report['files']['png']}")
    return 0
