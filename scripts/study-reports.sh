#!/usr/bin/env bash
# Reports of the studies from whatever cells have finished (scripts/studies.sh runs them):
# reports/sib200-multilingual/, reports/multitask/ and reports/multitask-collapse/ (setup
# block, verdicts, accuracy and budget tables, efficiency plot, diagnostics, every selection
# candidate; HTML, PNG/SVG, Markdown, CSV, LaTeX). An experiment with no finished cell yet is
# named and skipped.
#   scripts/study-reports.sh [MLBENCH_BINARY]    (default: this checkout's release build)
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mlbench}
[ -x "$BIN" ] || cargo build --release --locked

# report STORE EXPERIMENT OUT: the comparison report of EXPERIMENT's cells in STORE.
report() {
  local cells=("$1"/cells/*/cell.json)
  if [ ${#cells[@]} -eq 0 ] || ! grep -q -E "\"experiment\": ?\"$2\"" "${cells[@]}"; then
    echo "study-reports.sh: no finished cell of $2 in $1 yet: no report" >&2
    return 0
  fi
  "$BIN" compare --store "$1" --experiment "$2" --out "$3"
}
report studies/sib200 sib200-study reports/sib200-multilingual
report studies/multitask multitask-study reports/multitask
report studies/multitask multitask-collapse reports/multitask-collapse
