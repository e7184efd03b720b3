#!/usr/bin/env bash
# Reports of the studies from whatever cells have finished (scripts/studies.sh runs them):
# reports/sib200-multilingual/ and reports/multitask/ (setup block, verdicts, accuracy and
# budget tables, efficiency plot, diagnostics; HTML, PNG/SVG, Markdown, CSV, LaTeX).
#   scripts/study-reports.sh [MLBENCH_BINARY]    (default: this checkout's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mlbench}
[ -x "$BIN" ] || cargo build --release --locked
if [ -d studies/sib200/cells ]; then
  "$BIN" compare --store studies/sib200 --experiment sib200-study --out reports/sib200-multilingual
fi
if [ -d studies/multitask/cells ]; then
  "$BIN" compare --store studies/multitask --experiment multitask-study --out reports/multitask
fi
