"""Ray job entrypoint: `python jobs/evaluate.py --model ... [--dataset FILE] [--config ...] [--set k=v ...]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
