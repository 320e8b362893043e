"""`python -m duoserve.bench ...`, the same command as `duoserve bench ...`."""

from __future__ import annotations

import argparse
import sys

from duoserve.bench.cli import DESCRIPTION, configure_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duoserve.bench", description=DESCRIPTION)
    configure_parser(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
