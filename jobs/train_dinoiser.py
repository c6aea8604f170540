"""Ray job entrypoint: `python jobs/train_dinoiser.py --config ... [--set k=v ...]`."""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["train-dinoiser", *sys.argv[1:]])
