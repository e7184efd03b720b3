#!/usr/bin/env bash
# Model speed and memory: mlbench (release build) against PyTorch + transformers + PEFT on the
# same HF folders, same shapes, same machine, one after the other. Peak RSS from GNU time.
# Needs: scripts/fetch-models.sh done, a Python with torch/transformers/peft (PY).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
STEPS=${STEPS:-3}
cargo build --release --examples --locked
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for m in ${MODELS:-models/smollm2-135m models/gemma-3-270m}; do
  echo "== $m: mlbench"
  /usr/bin/time -f "peak_rss_kb=%M wall_s=%e" target/release/examples/model_bench "$m" "$STEPS" 2>&1
  echo "== $m: pytorch+peft"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /usr/bin/time -f "peak_rss_kb=%M wall_s=%e" "$PY" benchmarks/perf/model_bench_torch.py "$m" "$STEPS" 2>&1 | grep -v Loading
done
