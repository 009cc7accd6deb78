"""``python -m fsmis_bench.preparation {prepare,supervoxels,check-data} ...``

The same subcommands as ``fsmis-bench``, usable before (or without) the main CLI.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FsmisError
from .commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsmis_bench.preparation")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FsmisError as error:
        print(f"error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"  hint: {error.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
