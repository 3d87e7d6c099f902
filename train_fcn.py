#!/usr/bin/env python3
"""train_fcn.py: not yet available (see the open issues: `issues`)."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_fcn.py", description="Not yet available: this tool is being built.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parser.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    print("train_fcn.py is not yet available in this version of the toolkit.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
