#!/usr/bin/env bash
# GPU benchmark sweep: one prepared script for a machine with a GPU, total time well under 13 minutes.
#
#   bash bench/gpu.sh              # on the GPU machine (DEVICE=cuda): the sizes below
#   bash bench/gpu.sh --dry-run    # anywhere, on CPU: every step at a tiny size, to prove the script end to end
#                                  # (about 30 s of CPU time, most of it imports and Ray start-up; on a busy
#                                  # 2-core machine the wall time is minutes)
#   bash bench/gpu.sh --wheels     # here, with a package index: download into .whl/ the pure-Python packages a
#                                  # bare GPU image lacks (pydantic, open_clip, ...), to carry to that machine
#
# Steps (each under its own timeout, all under TOTAL_S; a failed or skipped step does not stop the others):
#   1. SAE training step vs dictionary_learning and sae-lens on the GPU: fp32, bf16 autocast, and the AuxK
#      variant (--dead-tokens 4096: every implementation runs AuxK on every step)  [bench/sae_train.py]
#   2. SAE encode / encode_sparse vs a plain matmul and the peers' encode, fp32 and bf16  [bench/sae_encode.py]
#   3. extraction, ViT-B-16 at 224 and 448 px in bf16 vs the plain open_clip loop  [bench/extract.py]; random init:
#      the machine cannot download weights (docs/backbones.md), so the figures are throughput, same arithmetic
#   4. served /v1/explain with serve.num_gpus=1, batching on vs off  [bench/serve_load.py]
# Steps 3-4 need Ray and open_clip on that machine and the benches' GPU flags; a step whose needs are missing is
# reported as SKIPPED with the reason. Exit status 0 when no step failed, timed out or ran out of budget. Logs and each step's JSON go to $OUT (default outputs/gpu-bench-<time>);
# the summary is printed at the end and written to $OUT/summary.txt.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --wheels) MODE=wheels ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run|--wheels]" >&2; exit 2 ;;
esac

if [[ $MODE == wheels ]]; then
  # Pure-Python needs of the benches that a bare CUDA image may lack (no Ray: its wheel alone is over the
  # 64 MiB a run may carry). Install there with: pip install --no-index --no-deps --target DIR .whl/*.whl
  PYV="${WHEELS_PYTHON_VERSION:-3.12}"
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude  # travels, never committed
  python3 -m pip download -c constraints.txt --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic pydantic-core annotated-types typing-inspection open_clip_torch ftfy wcwidth dictionary-learning==0.1.0
  du -sh .whl
  exit $?
fi

export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
if [[ $MODE == gpu ]] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/insight-site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/insight-site"
fi
PY="${PYTHON:-}"
[[ -z $PY && -x .venv/bin/python ]] && PY=.venv/bin/python
[[ -z $PY ]] && PY=python3
PEER_PY="${PEER_PYTHON:-}"  # the peers live in their own venv (bench/sae_train.py)
[[ -z $PEER_PY && -x .bench-venv/bin/python ]] && PEER_PY=.bench-venv/bin/python
[[ -z $PEER_PY ]] && PEER_PY=$PY

if [[ $MODE == dry ]]; then
  # tiny sizes; the peers' heavy imports are left out (sae_train skips them, sae_encode uses its formula copy of
  # dictionary_learning's encode), so the dry run proves this script and the benches, not the peers
  DEVICE="${DEVICE:-cpu}"
  TOTAL_S="${TOTAL_S:-900}"
  PEER_PY=$PY
  DEAD=256
  TRAIN="--d-in 64 --expansion 16 --batch 256 --steps 4 --warmup 1 --threads 1 --no-extras"
  ENCODE="--d-in 64 --batch 256 --repeats 3 --threads 1"
  EXTRACT_MODEL=tiny EXTRACT="--images 2 --views 2 --rounds 1 --batch 4 --threads 1"
  SERVE="--quick --latency-only --seconds 2"
  RAY_T=300  # Ray start-up and actor scheduling dominate at tiny sizes on a busy machine
else
  DEVICE="${DEVICE:-cuda}"
  TOTAL_S="${TOTAL_S:-540}"  # one device call may run 600 s
  DEAD=4096
  TRAIN="--steps 40"
  ENCODE="--batch 65536 --repeats 20"
  EXTRACT_MODEL=ViT-B-16 EXTRACT="--images 64 --views 4 --batch 64 --rounds 2"
  SERVE="--profile vit-b16 --clients 16 --seconds 10"
  RAY_T=150
fi
OUT="${OUT:-$ROOT/outputs/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

FAILURES=0
say() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, last JSON line to $OUT/NAME.json, a status line in the summary
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - START)))
  if ((left < 10)); then
    say "SKIPPED $name: the total budget (${TOTAL_S}s) is spent"
    FAILURES=$((FAILURES + 1))
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  grep '^{' "$OUT/$name.log" | tail -1 >"$OUT/$name.json" || true
  local took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    say "OK      $name (${took}s)"
  elif ((rc == 124 || rc == 137)); then
    say "TIMEOUT $name after ${took}s (log: $name.log)"
    FAILURES=$((FAILURES + 1))
  else
    say "FAILED  $name rc=$rc (${took}s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-200)"
    FAILURES=$((FAILURES + 1))
  fi
}

# needs FLAG... -- SCRIPT: true when the bench's --help lists every flag
has_flags() {
  local script=$1 help
  shift
  help=$("$PY" "$script" --help 2>/dev/null) || return 1
  local f
  for f in "$@"; do grep -q -- "$f" <<<"$help" || return 1; done
}

say "# GPU benchmark sweep ($MODE, device $DEVICE) $(date -u +%FT%TZ)"
say "host: $(uname -m), $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPU: {gpu}")
EOF
if [[ $DEVICE == cuda ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "no CUDA device: run with --dry-run (or DEVICE=cpu) on a machine without one"
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$SUMMARY"

# 1. SAE training step against both peers
run sae_train_fp32 120 "$PEER_PY" bench/sae_train.py --device "$DEVICE" $TRAIN
run sae_train_bf16 120 "$PEER_PY" bench/sae_train.py --device "$DEVICE" --autocast bf16 $TRAIN
run sae_train_auxk 120 "$PEER_PY" bench/sae_train.py --device "$DEVICE" --dead-tokens "$DEAD" $TRAIN

# 2. SAE inference
run sae_encode_fp32 60 "$PEER_PY" bench/sae_encode.py --device "$DEVICE" $ENCODE
run sae_encode_bf16 60 "$PEER_PY" bench/sae_encode.py --device "$DEVICE" --dtype bfloat16 $ENCODE

# 3. extraction at 224 and 448 px, bf16, against the plain open_clip loop
if ! "$PY" -c 'import ray, open_clip' 2>/dev/null; then
  say "SKIPPED extract: ray or open_clip is not importable here"
elif [[ $DEVICE == cuda ]] && ! has_flags bench/extract.py --image-size --device --precision; then
  say "SKIPPED extract: bench/extract.py has no --image-size/--device/--precision flags yet"
elif [[ $DEVICE == cuda ]]; then
  for px in 224 448; do
    run "extract_${px}" "$RAY_T" "$PY" bench/extract.py --model "$EXTRACT_MODEL" --image-size "$px" --device cuda \
      --precision bf16 $EXTRACT
  done
else
  run extract_tiny "$RAY_T" "$PY" bench/extract.py --model "$EXTRACT_MODEL" $EXTRACT
fi

# 4. served /v1/explain, batching on vs off
if ! "$PY" -c 'import ray.serve' 2>/dev/null; then
  say "SKIPPED serve: ray[serve] is not importable here"
elif [[ $DEVICE == cuda ]] && ! has_flags bench/serve_load.py --num-gpus; then
  say "SKIPPED serve: bench/serve_load.py has no --num-gpus flag yet (serve.num_gpus=1)"
elif [[ $DEVICE == cuda ]]; then
  run serve_gpu "$RAY_T" "$PY" bench/serve_load.py --num-gpus 1 $SERVE
else
  run serve_tiny "$RAY_T" "$PY" bench/serve_load.py $SERVE
fi

# summary: the headline figures of each step's JSON
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\n# figures (all files in {out.name}/)")
for f in sorted(out.glob("*.json")):
    text = f.read_text().strip()
    if not text:
        continue
    try:
        r = json.loads(text)
    except json.JSONDecodeError:
        print(f"{f.stem}: unreadable JSON")
        continue
    load = r.get("loadavg") or r.get("load_avg")
    if r.get("bench") == "sae_train":
        print(f"{f.stem}: tokens/s {r['tokens_per_s']} ratio {r['ratio_tokens_per_s']} FVU {r['fvu']} "
              f"dead/step {r.get('dead_per_step')} autocast {r.get('autocast')} load {load}")
    elif r.get("bench") == "sae_encode":
        print(f"{f.stem}: ms {r['median_ms']} ratios {r['ratios']} agree {r['agree']} load {load}")
    elif r.get("bench") == "extract":
        print(f"{f.stem}: {r.get('model')} {r.get('image_size')}px plain {r.get('plain_open_clip_images_per_s')} "
              f"insight {r.get('insight_images_per_s')} img/s, median ratio {r.get('ratio_median')} load {load}")
    else:
        keys = [k for k in r if any(s in k for s in ("p50", "overhead", "throughput", "gain", "batch"))]
        print(f"{f.stem}: " + ", ".join(f"{k}={r[k]}" for k in keys[:10]) if keys else f"{f.stem}: {text[:300]}")
EOF
say "total $(($(date +%s) - START))s, $FAILURES step(s) failed, timed out or ran out of budget; outputs in $OUT"
((FAILURES == 0))
