#!/usr/bin/env bash
# Stops exactly what scripts/cluster-up.sh started (its processes are recorded in the state folder).
set -euo pipefail
venv="${1:-.venv}"
exec "$venv/bin/python" -m insight.localcluster down
