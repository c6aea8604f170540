#!/usr/bin/env bash
# `make demo`: the whole platform end to end on real bundled images with real
# pretrained weights (offline backbone when OpenCLIP weights are unavailable).
set -euo pipefail
VENV=${1:-.venv}
CONFIG=${DEMO_CONFIG:-configs/quickstart.yaml}
echo "insight demo: $CONFIG -> extract, sweep, concepts, evaluate, serve, report (progress on stderr)" >&2
"$VENV/bin/insight" quickstart --config "$CONFIG"
# What next (README, "After make demo"): every command takes the same --config, whose workdir holds the store.
cat >&2 <<EOF
next: open the "report" file of the JSON line above; then, with the same --config:
  $VENV/bin/insight ui --config $CONFIG       # MLflow on this config's store
  $VENV/bin/insight serve --config $CONFIG    # serve the champion on http://127.0.0.1:8000
EOF
