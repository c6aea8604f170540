#!/usr/bin/env bash
# The production topology on this machine (docs/cluster.md, "Run the same topology locally"):
# PostgreSQL + an S3 server (moto) + an MLflow server on them + a 3-node Ray cluster, all on
# 127.0.0.1. Prints the Ray dashboard and MLflow URLs and how to use them; `scripts/cluster-down.sh`
# stops it. Usage: scripts/cluster-up.sh [VENV] (default .venv); INSIGHT_CLUSTER_DIR picks the state folder.
set -euo pipefail
venv="${1:-.venv}"
exec "$venv/bin/python" -m insight.localcluster up
