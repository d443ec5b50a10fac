"""`dtm bench merge`: dtm merge against mergekit and the I/O floor, on the same synthetic inputs, in one run.

    dtm bench merge                          # issue 3's 1.32 GB Llama, 4 fine-tunes + base
    dtm bench merge --preset small --repeats 2 --methods linear ties
    dtm bench merge --preset 70b-slice --max-memory 1GiB --no-mergekit

Measured per repetition (repetitions interleave all configurations, so drift hits them alike): the
floor (read every input once from the page cache + write the output's bytes), `dtm merge` per
method and backend, and `mergekit-yaml` per method when installed; each merge is its own process,
timed from launch to exit, with the peak RSS the kernel reports for it. Reported: medians, the
spread of the repetitions (how noisy the machine was), GB/s of input+output bytes, and ratios to
mergekit and to the floor, as a table, results.json and chart.png in the output directory.
"""

from __future__ import annotations

import argparse

from dtm_fast.bench.merge_models import PRESETS
from dtm_fast.bench.merge_runs import METHODS

DEFAULT_WORKDIR = "/tmp/dtm-bench-merge"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    parser.add_argument("--models", type=int, default=4, help="fine-tunes merged besides the base (default 4)")
    parser.add_argument("--noise", type=float, default=1e-3, help="std of the fine-tunes' difference from the base")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--backends", nargs="+", choices=["cpu", "reference", "triton"], default=None,
                        help="dtm backends to time (default: cpu and reference, plus triton with CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every dtm run and the floor")
    parser.add_argument("--mergekit-repeats", type=int, default=1,
                        help="repetitions of every mergekit run (default 1: mergekit's ties takes minutes)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is installed")
    parser.add_argument("--max-memory", default=None, help="passed to dtm merge (its default otherwise)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"where the synthetic models and merge outputs go (default {DEFAULT_WORKDIR})")
    parser.add_argument("--output", default=None,
                        help="directory for results.json, chart.png and logs (default bench/results/merge-PRESET)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="plain one-line logs")


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui
    from dtm_fast.bench.merge_report import Measurements, report
    from dtm_fast.errors import DtmError

    ui.configure(json_output=args.json, quiet=args.quiet)
    if args.repeats < 1 or args.mergekit_repeats < 1 or args.models < 1:
        raise DtmError("--repeats, --mergekit-repeats and --models must be at least 1")
    measurements = Measurements.collect(args)
    report(measurements, args)
    return 0
