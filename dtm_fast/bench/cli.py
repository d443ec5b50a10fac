"""`dtm bench merge|train|kernels`: each benchmark module defines configure(parser) and run(args) -> int and
keeps its heavy imports inside run()."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = [
    ("merge", "dtm_fast.bench.merge", "merge throughput and peak memory against mergekit and the I/O floor"),
    ("train", "dtm_fast.bench.train", "training tokens/s and packing efficiency against transformers' Trainer"),
    ("kernels", "dtm_fast.bench.kernels", "the chunk operations alone, per backend and instruction set, in GB/s"),
]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name, help_text in BENCHMARKS:
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        bench_parser.set_defaults(_bench_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # a benchmark not written yet shows no options
        module.configure(bench_parser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(args._bench_module).run(args)
