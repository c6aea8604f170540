#!/usr/bin/env bash
# `make demo`: the whole platform end to end on real bundled images with real
# pretrained weights (offline backbone when OpenCLIP weights are unavailable).
set -euo pipefail
VENV=${1:-.venv}
CONFIG=${DEMO_CONFIG:-configs/quickstart.yaml}
echo "insight demo: $CONFIG -> extract, sweep, concepts, evaluate, serve, report (progress on stderr)" >&2
exec "$VENV/bin/insight" quickstart --config "$CONFIG"
