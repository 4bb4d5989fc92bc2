"""Ray job entry point for the eval stage: ``python pipelines/eval.py --model DIR --data URL --out URL``.

Thin on purpose: the flags are `veclip eval`'s; the work lives in ``veclip.eval``.
"""

import sys

from veclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
