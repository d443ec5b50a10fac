"""`python -m dtm_fast.train CONFIG [--key value ...]`: the entry torchrun starts on every rank."""

from __future__ import annotations

import argparse
import logging
import sys

from dtm_fast.errors import debug_requested, run_guarded
from dtm_fast.train import cli


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="python -m dtm_fast.train", description="train one DTM sub-model")
    cli.configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return run_guarded("train", lambda: cli.run(args), argv, debug)


if __name__ == "__main__":
    sys.exit(main())
