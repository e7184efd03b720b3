#!/usr/bin/env bash
# Trainer speed per method (issue 4): a real model, 3 SIB-200 languages, K = 64, seed 0.
# Every method runs a short, fixed amount of work; figures come from each run's manifest.json
# (trainer wall time without model loading; examples and tokens that reached a gradient).
# Equal examples seen: meta-lora sees 3 tasks x (s=3 x 4 support + 4 query) = 48 example
# presentations per meta-iteration, so lora-k gets passes = 48 * ITERS / 192 over its 192 pool
# examples.
#   MODEL=models/gemma-3-270m DEVICE=cpu DTYPE=f32 ITERS=1 benchmarks/perf/train.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/gemma-3-270m}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-f32}
ITERS=${ITERS:-1}
BIN=${BIN:-target/release/mlbench}
OUT=${OUT:-target/perf-train}
PY=${PY:-python3}
METHODS=${METHODS:-"lora-k meta-lora stage2-only lora-per-task-k stage1-only"}
[ -x "$BIN" ] || cargo build --release --locked
export RAYON_NUM_THREADS=${THREADS:-2}
rm -rf "$OUT"
mkdir -p "$OUT"
common=(--model "$MODEL" --task sib200 --langs en,fr,sw --k 64 --seed 0 --device "$DEVICE" --dtype "$DTYPE" -q)
lora_passes=$(awk "BEGIN { print 48 * $ITERS / 192 }")
for m in $METHODS; do
  case $m in
    meta-lora|stage2-only|meta-lora+tta) extra=(--set "meta_iterations=$ITERS") ;;
    lora-k|lora-full) extra=(--set "passes=$lora_passes") ;;
    # One optimizer step per task (batch 8 of its 64 examples).
    lora-per-task-k) extra=(--set "passes=0.125") ;;
    # One stage-1 step on each task's whole pool.
    stage1-only) extra=(--set "inner_steps=1") ;;
  esac
  echo "== $m ${extra[*]}" >&2
  "$BIN" train --method "$m" "${common[@]}" "${extra[@]}" --out "$OUT/$m"
done
"$PY" benchmarks/perf/train_report.py "$OUT" $METHODS
