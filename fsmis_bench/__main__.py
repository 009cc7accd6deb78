"""``python -m fsmis_bench ...``: the ``fsmis-bench`` command, for an environment without its
console script (a venv that reaches fsmis-bench through a ``.pth`` file, a source checkout)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
