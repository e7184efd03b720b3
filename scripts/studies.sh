#!/usr/bin/env bash
# The committed studies (issue 7) on this machine's CPU, resumable: rerun it after an
# interruption and finished cells are skipped (a cell in training resumes from its checkpoint).
# Runs in order: SIB-200 multilingual (seed 0 of every cell first), the multi-task mix, MGSM
# zero- and 3-shot, then writes the reports under reports/. Takes many hours on 2 cores;
# `--features cuda` and `device = "cuda"` in the experiment files make it an hour-scale job.
#
#   BIN=target/release/mlbench scripts/studies.sh
#
# Keep BIN the same binary for the whole study: a cell's key includes the code version, so a
# rebuilt binary starts the grid afresh (the store keeps both; `compare` shows each cell's
# newest result).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mlbench}
[ -x "$BIN" ] || cargo build --release --locked
[ -d models/gemma-3-270m ] || scripts/fetch-models.sh gemma3 "$BIN"

"$BIN" run benchmarks/sib200-multilingual.toml --store results/sib200
"$BIN" run benchmarks/multitask.toml --store results/multitask
for shots in 0 3; do
  out=results/mgsm/shots$shots
  [ -f "$out/metrics.parquet" ] ||
    "$BIN" eval --model models/gemma-3-270m --task mgsm --langs en,fr,zh,sw --shots "$shots" \
      --limit 25 --out "$out"
done
# MGSM as a held-out task for two adapters trained on the multi-task mix (3-shot): lora-full,
# and meta-lora at K = 64 (its run is the meta-lora+tta cell's, which the runner shares).
key() {
  "$BIN" -q run benchmarks/multitask.toml --store results/multitask --dry-run |
    awk -v c="$1" '$2 == c {print $1}'
}
w=results/multitask/work
full=$w/$(key lora-full/full/s0)/train/adapter
meta=$w/$(key meta-lora+tta/k64/s0)/train/adapter
out=results/mgsm/adapters-shots3
[ -f "$out/metrics.parquet" ] ||
  "$BIN" eval --model models/gemma-3-270m --no-base --adapters "lora-full=$full,meta-lora-k64=$meta" \
    --task mgsm --langs en,fr,zh,sw --shots 3 --limit 25 --out "$out"
scripts/study-reports.sh "$BIN"
