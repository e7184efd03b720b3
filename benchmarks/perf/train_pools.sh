#!/usr/bin/env bash
# Training throughput the way a study trains (issue 16): real SIB-200 few-shot pools (7
# languages, K = 64, seed 0), Gemma 3 270M, f32 on the CPU, mlbench against the same work
# written for PyTorch + transformers + PEFT (train_pools_peft.py: same pool ids, prompts,
# encoding and hyper-parameters), one tool after the other, ROUNDS times.
#   lora-k:    PASSES over the 448 pool examples in batches of 8 (passes = 1: 56 steps);
#   meta-lora: ITERS meta-iterations of 7 tasks x (3 inner steps on 4 support + 4 query).
# Reports training seconds without model loading (mlbench: manifest.json `wall_seconds`; the
# peer times its loop), tokens per second over the tokens each tool ran (no padding), and peak
# RSS of the whole process (/usr/bin/time). Run it on an otherwise idle machine.
#
#   PY=/path/to/venv/bin/python benchmarks/perf/train_pools.sh
#   MLBENCH_ARGS="--set share_prefix=false" ...     # mlbench without shared prefixes
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/gemma-3-270m}
BIN=${BIN:-target/release/mlbench}
PY=${PY:-python3}
OUT=${OUT:-target/perf-train-pools}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
PASSES=${PASSES:-1}
ITERS=${ITERS:-4}
METHODS=${METHODS:-"lora-k meta-lora"}
LANGS=${LANGS:-eng_Latn,fra_Latn,hin_Deva,quy_Latn,swh_Latn,yor_Latn,zho_Hans}
read -r -a EXTRA <<< "${MLBENCH_ARGS:-}"
[ -x "$BIN" ] || cargo build --release --locked
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"
"$BIN" data sample --task sib200 --langs "$LANGS" --k 64 --seed 0 --out "$OUT/pools.parquet" -q

for round in $(seq 1 "$ROUNDS"); do
  for m in $METHODS; do
    case $m in
      lora-k) mset=(--set "passes=$PASSES"); pset=(--passes "$PASSES") ;;
      meta-lora) mset=(--set "meta_iterations=$ITERS"); pset=(--meta-iterations "$ITERS") ;;
      *) echo "unknown method $m" >&2; exit 2 ;;
    esac
    run="$OUT/$m-$round"
    echo "== round $round: $m, mlbench" >&2
    /usr/bin/time -f "%M" -o "$run.mlbench.rss" "$BIN" train --method "$m" --model "$MODEL" \
      --task sib200 --langs "$LANGS" --k 64 --seed 0 "${mset[@]}" "${EXTRA[@]}" -q --out "$run"
    echo "== round $round: $m, pytorch+peft" >&2
    /usr/bin/time -f "%M" -o "$run.peer.rss" "$PY" benchmarks/perf/train_pools_peft.py \
      --model "$MODEL" --task-file datasets/tasks/sib200.toml --data datasets/sib200.parquet \
      --pools "$OUT/pools.parquet" --method "$m" "${pset[@]}" --threads "$THREADS" > "$run.peer.json"
  done
done

python3 - "$OUT" "$ROUNDS" $METHODS <<'EOF'
import json, pathlib, sys
out, rounds, methods = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
print("| method | round | mlbench s | peer s | speed-up | mlbench tokens/s | peer tokens/s | mlbench peak RSS | peer peak RSS | RSS ratio |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for m in methods:
    for r in range(1, rounds + 1):
        run = out / f"{m}-{r}"
        man = json.loads((run / "manifest.json").read_text())
        mb_s = man["wall_seconds"]
        mb_tok = sum(b["tokens"] for b in man["budget"].values())
        peer = json.loads((out / f"{m}-{r}.peer.json").read_text())
        rss = [int((out / f"{m}-{r}.{w}.rss").read_text().split()[-1]) / 1e6 for w in ("mlbench", "peer")]
        print(f"| {m} | {r} | {mb_s:.1f} | {peer['train_seconds']:.1f} | {peer['train_seconds'] / mb_s:.2f}x "
              f"| {mb_tok / mb_s:.0f} | {peer['tokens_per_s']:.0f} | {rss[0]:.2f} GB | {rss[1]:.2f} GB "
              f"| {rss[0] / rss[1]:.2f} |")
EOF
