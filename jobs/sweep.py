"""Ray job entrypoint: `python jobs/sweep.py --config ... [--set k=v ...] [--resume]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["sweep", *sys.argv[1:]])
