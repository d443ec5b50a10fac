"""`dtm disperse`: split instruction data into K portions (random, k-means or by a column)."""

from __future__ import annotations

import argparse

from dtm_fast.data.records import FORMATS
from dtm_fast.disperse.config import EMBED_TARGETS, METHOD_NAMES, OUTPUT_FORMATS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="DATA",
                        help="data files (.jsonl .json .parquet .csv) or saved `datasets` directories")
    parser.add_argument("-o", "--output", required=True, help="output directory for portion-{i}.jsonl + manifest.json")
    parser.add_argument("-k", "--k", type=int, required=True, help="number of portions (sub-models)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="random",
                        help="random: seeded, sizes differ by at most one; kmeans: clusters of sentence "
                             "embeddings; field: whole groups of one column packed into K portions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default=None, help="record format (default: detected)")
    parser.add_argument("--first-turn-only", action="store_true",
                        help="keep only the first user turn and its reply (as the DTM paper did)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="original",
                        help="original: the input records as they were; messages: {\"messages\": [...]}")
    kmeans = parser.add_argument_group("kmeans")
    kmeans.add_argument("--encoder", help="sentence-transformers directory or Hugging Face model directory "
                                          "(mean-pooled hidden states, e.g. the base model)")
    kmeans.add_argument("--embed", choices=EMBED_TARGETS, default="instruction", help="what to embed")
    kmeans.add_argument("--balance", action="store_true", help="equalise portion sizes (differ by at most one)")
    kmeans.add_argument("--max-length", type=int, default=256, help="encoder truncation length in tokens")
    kmeans.add_argument("--batch-size", type=int, default=32)
    kmeans.add_argument("--device", default="cpu", help="device for the encoder (cpu, cuda, cuda:1)")
    parser.add_argument("--field", help="field method: the column to group by (e.g. source)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous dispersal in --output")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui
    from dtm_fast.disperse import DisperseConfig, disperse

    ui.configure(json_output=args.json, quiet=args.quiet)
    config = DisperseConfig(
        inputs=tuple(args.inputs), output_dir=args.output, k=args.k, method=args.method, seed=args.seed,
        format=args.format, first_turn_only=args.first_turn_only, output_format=args.output_format,
        embed=args.embed, encoder=args.encoder, balance=args.balance, embed_max_length=args.max_length,
        embed_batch_size=args.batch_size, device=args.device, field=args.field, overwrite=args.overwrite)
    result = disperse(config)
    if result.reused:
        ui.info(f"{result.output_dir} is already current (same inputs and parameters); nothing written")
    rows = []
    for portion in result.manifest["portions"]:
        groups = portion.get("by_group")
        group_text = ", ".join(f"{name} {count}" for name, count in list(groups.items())[:4]) if groups else ""
        rows.append([portion["file"], portion["records"], portion["mean_user_chars"],
                     portion["mean_assistant_chars"], group_text])
    ui.table(f"dtm disperse: {result.manifest['records']} records -> {config.k} portions ({config.method})",
             ["portion", "records", "mean prompt chars", "mean reply chars", "groups"], rows)
    if not result.reused:
        ui.info(f"wrote {len(result.portion_files)} portions and {result.output_dir}/manifest.json")
    return 0
