"""Ray job entrypoint: `python jobs/train.py --config ... [--set k=v ...] [--resume]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
