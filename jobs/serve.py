"""Ray job entrypoint: `python jobs/serve.py --model models:/insight@champion --no-blocking [--config ...]`.

On a cluster, Serve applications outlive the job that deployed them, so `insight submit serve
-- --no-blocking` deploys (or updates) the application and returns.
"""

import os
import sys

# Python puts this script's folder first on sys.path, and this script is named serve.py: `import
# serve.app` would find this file instead of the serve/ package (the Serve application) of the
# working directory, as it did for every `insight submit serve` that uploads the project.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from insight.cli import main  # noqa: E402 - after the path fix above

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
