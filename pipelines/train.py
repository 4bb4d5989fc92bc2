"""Ray job entry point for the training stage:

    ray job submit -- python pipelines/train.py --data s3://b/enriched --output s3://b/runs --caption-mode mix

Thin on purpose: the flags are `veclip train`'s; the work lives in ``veclip.train``.
"""

import sys

from veclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
