"""The `dtm` command line. Sub-command modules define their arguments without heavy imports, so
`dtm --help` and `dtm <command> --help` stay instant; each command imports torch and friends only
inside its run()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dtm_fast import __version__
from dtm_fast.errors import debug_requested, run_guarded

# (name, module, one-line help). Each module defines configure(parser) and run(args) -> int.
COMMANDS = [
    ("merge", "dtm_fast.merge.cli", "merge checkpoints (HF dirs, LoRA adapters, or a mergekit YAML) with bounded memory"),
    ("disperse", "dtm_fast.disperse.cli", "split instruction data into K portions (random, k-means, or by a column)"),
    ("eval", "dtm_fast.eval.cli", "evaluate models with lm-evaluation-harness and write the alignment-tax report"),
    ("train", "dtm_fast.train.cli", "fine-tune one sub-model (full or LoRA) on one data portion; FSDP2 over many GPUs"),
    ("bench", "dtm_fast.bench.cli", "benchmarks: merge and train throughput against peer tools"),
    ("run", "dtm_fast.run.cli", "the whole DTM experiment from one YAML file (resumable; --dry-run, --emit slurm)"),
    ("demo", "dtm_fast.demo.cli", "the whole DTM experiment on an embedded small model and data set, minutes on a CPU"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtm",
        description="Disperse-Then-Merge instruction tuning and streaming model merging.",
    )
    parser.add_argument("--version", action="version", version=f"dtm_fast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an internal error (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(message)s",
    )
    return run_guarded(args.command, lambda: args._module.run(args), argv, debug)


if __name__ == "__main__":
    sys.exit(main())
