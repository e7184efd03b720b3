#!/usr/bin/env bash
# Reports of the studies from whatever cells have finished (scripts/studies.sh runs them):
# reports/sib200-multilingual/, reports/multitask/, reports/mgsm/ (tables, plots, HTML).
#   scripts/study-reports.sh [MLBENCH_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mlbench}
if [ -d results/sib200/cells ]; then
  "$BIN" compare --store results/sib200 --experiment sib200-multilingual --baseline lora-full \
    --out reports/sib200-multilingual
fi
if [ -d results/multitask/cells ]; then
  "$BIN" compare --store results/multitask --experiment multitask --baseline lora-full \
    --out reports/multitask
fi
for run in shots0 shots3 adapters-shots3; do
  if [ -f "results/mgsm/$run/metrics.md" ]; then
    mkdir -p reports/mgsm
    cp "results/mgsm/$run/metrics.md" "reports/mgsm/$run.md"
  fi
done
