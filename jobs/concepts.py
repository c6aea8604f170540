"""Ray job entrypoint: `python jobs/concepts.py --model models:/insight@champion --config ... [--set k=v ...]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["concepts", *sys.argv[1:]])
