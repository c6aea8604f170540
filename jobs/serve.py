"""Ray job entrypoint: `python jobs/serve.py --model models:/insight@champion --no-blocking [--config ...]`.

On a cluster, Serve applications outlive the job that deployed them, so `insight submit serve
-- --no-blocking` deploys (or updates) the application and returns.
"""

import sys

from insight.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
