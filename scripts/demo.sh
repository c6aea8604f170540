#!/usr/bin/env bash
# `make demo`: run what the pipeline has so far on the tiny profile, end to end.
set -euo pipefail
VENV=${1:-.venv}
mkdir -p outputs
echo "insight demo: extracting dense patch features from the bundled sample images (configs/tiny.yaml)" >&2
"$VENV/bin/insight" extract --config configs/tiny.yaml | tee outputs/demo-extract.json.tmp >&2 || true
mkdir -p outputs
tail -n 1 outputs/demo-extract.json.tmp > outputs/demo-extract.json
rm -f outputs/demo-extract.json.tmp
"$VENV/bin/python" - <<'PY'
import json
r = json.load(open("outputs/demo-extract.json"))
if not r.get("ok"):
    raise SystemExit(f"demo failed: {r.get('error')}")
print(f"demo: wrote {r['images']} image views x {r['grid'][0]}x{r['grid'][1]} patches = {r['tokens']} "
      f"{r['dim']}-d tokens to {r['cache']} ({r['status']}); MLflow run {r.get('run_id')}", flush=True)
print(json.dumps({"cache": r["cache"], "tokens": r["tokens"], "run_id": r.get("run_id")}))
PY
