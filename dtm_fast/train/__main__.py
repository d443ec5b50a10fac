"""`python -m dtm_fast.train CONFIG [--key value ...]`: the entry torchrun starts on every rank."""

from __future__ import annotations

import argparse
import logging
import sys

from dtm_fast.errors import DtmError
from dtm_fast.train import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtm_fast.train", description="train one DTM sub-model")
    cli.configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return cli.run(args)
    except DtmError as error:
        print(f"dtm train: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dtm train: interrupted; the last complete checkpoint is kept (resume: true continues)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
