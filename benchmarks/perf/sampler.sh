#!/usr/bin/env bash
# Sampler speed: K=64 pools for all 205 SIB-200 languages, mlbench vs the obvious pandas code,
# same file, same machine, same run. Needs a release build and a Python with pandas + pyarrow
# (PY, default python3). Prints medians of N runs (default 7) of whole-process wall time.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
N=${N:-7}
bin=target/release/mlbench
[ -x "$bin" ] || cargo build --release --locked
data=datasets/sib200.parquet

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
wall() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }

"$bin" --quiet data sample --task sib200 --langs all --k 64 --seed 0 --out /tmp/mlbench-pools.parquet
"$PY" benchmarks/perf/sampler_pandas.py "$data" 64 >/dev/null
m=$(for _ in $(seq "$N"); do wall "$bin" --quiet data sample --task sib200 --langs all --k 64 --seed 0 --out /tmp/mlbench-pools.parquet; done | median)
p=$(for _ in $(seq "$N"); do wall "$PY" benchmarks/perf/sampler_pandas.py "$data" 64; done | median)
pin=$(for _ in $(seq "$N"); do "$PY" benchmarks/perf/sampler_pandas.py "$data" 64 | sed 's/.*pandas_in_process_s=\([0-9.]*\).*/\1/'; done | median)
echo "mlbench process wall (median of $N): ${m}s"
echo "pandas  process wall (median of $N): ${p}s"
echo "pandas  in-process, after imports:   ${pin}s"
echo "ratio pandas/mlbench, whole process: $(echo "$p / $m" | bc -l | cut -c1-5)x"
echo "ratio pandas in-process/mlbench whole process: $(echo "$pin / $m" | bc -l | cut -c1-5)x"
