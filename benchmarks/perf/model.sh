#!/usr/bin/env bash
# Model speed and memory: mlbench (release build) against PyTorch + transformers + PEFT on the
# same HF folders, same shapes, same machine, one after the other. Peak RSS from GNU time.
# Needs: scripts/fetch-models.sh done, a Python with torch/transformers/peft (PY).
# GPU: MLBENCH_DEVICE=cuda (and MLBENCH_DTYPE=bf16 if wanted) applies to both tools; mlbench then
# needs a `--features cuda` build. BENCH_BIN=path/to/model_bench skips the cargo build (for a
# machine without Rust, e.g. the binary from scripts/gpu-build.sh). MLBENCH_MATMUL=bf16 runs the
# frozen-weight products in bf16 in both tools (mlbench on AMX tiles, PyTorch under CPU autocast).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
STEPS=${STEPS:-3}
export MLBENCH_DEVICE=${MLBENCH_DEVICE:-cpu} MLBENCH_DTYPE=${MLBENCH_DTYPE:-f32}
if [ -z "${BENCH_BIN:-}" ]; then
  feat=(); [ "$MLBENCH_DEVICE" = cpu ] || feat=(--features cuda)
  cargo build --release --examples --locked "${feat[@]}"
  BENCH_BIN=target/release/examples/model_bench
fi
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
timed=(); [ -x /usr/bin/time ] && timed=(/usr/bin/time -f "peak_rss_kb=%M wall_s=%e")
for m in ${MODELS:-models/smollm2-135m models/gemma-3-270m}; do
  echo "== $m: mlbench ($MLBENCH_DEVICE, $MLBENCH_DTYPE, matmul ${MLBENCH_MATMUL:-f32})"
  "${timed[@]}" "$BENCH_BIN" "$m" "$STEPS" 2>&1
  echo "== $m: pytorch+peft ($MLBENCH_DEVICE, $MLBENCH_DTYPE, matmul ${MLBENCH_MATMUL:-f32})"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "${timed[@]}" "$PY" benchmarks/perf/model_bench_torch.py "$m" "$STEPS" 2>&1 | grep -v Loading
done
