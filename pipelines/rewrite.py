"""Ray job entry point for the rewrite stage:

    ray job submit -- python pipelines/rewrite.py --input s3://b/raw --output s3://b/enriched --mode both

Thin on purpose: the flags are `veclip rewrite`'s; the work lives in ``veclip.rewrite``.
"""

import sys

from veclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["rewrite", *sys.argv[1:]]))
