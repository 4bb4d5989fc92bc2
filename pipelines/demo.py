"""Ray job entry point for the main job: ``python pipelines/demo.py --out URL``.

Thin on purpose: the work lives in ``veclip.demo``.
"""

import sys

from veclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
