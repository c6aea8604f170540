"""Ray job entrypoint: `python jobs/extract.py --config ... [--set k=v ...]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["extract", *sys.argv[1:]])
