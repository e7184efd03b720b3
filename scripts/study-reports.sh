#!/usr/bin/env bash
# Reports of the studies from whatever cells have finished (scripts/studies.sh runs them):
# reports/sib200-multilingual/, reports/multitask/ and reports/multitask-collapse/ (setup block,
# verdicts, accuracy and budget tables, efficiency plot, diagnostics, every selection candidate;
# HTML, PNG/SVG, Markdown, CSV, LaTeX), and the first two against lora-k at equal K
# (reports/*-vs-lora-k/). An experiment with no finished cell yet is named and skipped.
#   scripts/study-reports.sh [MLBENCH_BINARY]    (default: this checkout's release build)
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mlbench}
[ -x "$BIN" ] || cargo build --release --locked

# finished STORE EXPERIMENT [METHOD]: whether STORE holds a finished cell of EXPERIMENT (of
# METHOD, when named).
finished() {
  python3 - "$@" <<'PY'
import glob, json, sys
store, exp = sys.argv[1], sys.argv[2]
method = sys.argv[3] if len(sys.argv) > 3 else None
for f in glob.glob(f"{store}/cells/*/cell.json"):
    c = json.load(open(f))["cell"]
    if c["experiment"] == exp and method in (None, c["method"]):
        sys.exit(0)
sys.exit(1)
PY
}

# report STORE EXPERIMENT OUT [--reference METHOD]: the comparison report of EXPERIMENT's cells
# in STORE (against METHOD when named, which must have a finished cell: else no report yet).
report() {
  local store=$1 exp=$2 out=$3
  shift 3
  if ! finished "$store" "$exp"; then
    echo "study-reports.sh: no finished cell of $exp in $store yet: no report of $out" >&2
    return 0
  fi
  if [ "${1:-}" = --reference ] && ! finished "$store" "$exp" "$2"; then
    echo "study-reports.sh: no finished $2 cell of $exp in $store yet: no report of $out" >&2
    return 0
  fi
  "$BIN" compare --store "$store" --experiment "$exp" --out "$out" "$@"
}
report studies/sib200 sib200-grid reports/sib200-multilingual
report studies/multitask multitask-study reports/multitask
report studies/multitask multitask-collapse reports/multitask-collapse
# The second question of the study: is MeTA-LoRA better than LoRA on the same K examples? The
# same cells with lora-k as the reference, paired at equal K (superior: the interval's lower
# bound above 0).
report studies/sib200 sib200-grid reports/sib200-multilingual-vs-lora-k --reference lora-k
report studies/multitask multitask-study reports/multitask-vs-lora-k --reference lora-k
# The README's copies of the report tables (tests/docs.rs holds them equal to the files).
scripts/readme-includes.sh
