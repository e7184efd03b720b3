#!/usr/bin/env bash
# Results-store speed: `mlbench compare` over a store of N cells (default 10,000; 100 nightly runs
# of 100 cells, each a copy of a real cell of results/readme-small) straight after the runs
# (one folder per cell) and after `mlbench merge` (one compacted part), next to the obvious
# polars code for the same mean-over-seeds table (store_peer.py). Needs a release build, the
# template store results/readme-small (scripts/main.sh writes it) and a Python with polars
# (PY, default python3). Prints medians of R runs (default 5) of whole-process wall time.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
N=${N:-10000}
R=${R:-5}
bin=target/release/mlbench
[ -x "$bin" ] || cargo build --release --locked
store=${STORE:-/tmp/mlbench-store-bench}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
wall() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
times() { for _ in $(seq "$R"); do wall "$@"; done | median; }

rm -rf "$store"
s=$(date +%s.%N)
"$PY" benchmarks/perf/store_synth.py results/readme-small "$store" "$N"
echo "synthetic store: $N cells in $(echo "$(date +%s.%N) - $s" | bc -l | cut -c1-6)s, $(du -sh "$store" | cut -f1)"
cmp=("$bin" --quiet compare --store "$store" --experiment bench --langs eng,swh,yor)
"${cmp[@]}" | head -4
c1=$(times "${cmp[@]}")
b1=$(times "${cmp[@]}" --baseline lora-full)
p1=$(times "$PY" benchmarks/perf/store_peer.py "$store")
s=$(date +%s.%N)
"$bin" merge --store "$store"
mt=$(echo "$(date +%s.%N) - $s" | bc -l)
c2=$(times "${cmp[@]}")
b2=$(times "${cmp[@]}" --baseline lora-full)
p2=$(times "$PY" benchmarks/perf/store_peer.py "$store")
h2=$(times "$bin" --quiet report --history --store "$store" --experiment bench --out /tmp/mlbench-history-bench)
printf '%-44s %8s %8s\n' "median wall, s ($R runs)" "per-cell" "merged"
printf '%-44s %8.3f %8.3f\n' "mlbench compare" "$c1" "$c2"
printf '%-44s %8.3f %8.3f\n' "mlbench compare --baseline (paired tests)" "$b1" "$b2"
printf '%-44s %8.3f %8.3f\n' "polars peer (same table, no paired tests)" "$p1" "$p2"
printf '%-44s %8.3f %8.3f\n' "ratio peer / mlbench compare" "$(echo "$p1 / $c1" | bc -l)" "$(echo "$p2 / $c2" | bc -l)"
printf '%-44s %8s %8.3f\n' "mlbench report --history (100 runs)" "" "$h2"
echo "mlbench merge: $(echo "$mt" | cut -c1-6)s"
