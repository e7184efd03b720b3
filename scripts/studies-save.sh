#!/usr/bin/env bash
# Stages what a later session needs to resume and report the studies: the finished cells (their
# cell.json carries the budget facts), the selection and declaration records, and the step logs
# of the finished cells' training runs (the report's curves). Adapters, manifests, checkpoints,
# locks and evaluation outputs stay out of git: a run folder without its manifest is trained
# again when a grid cell needs it (a cell in training when a session ends restarts).
#   scripts/studies-save.sh && git commit -m "studies: cells so far"
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
files=()
for s in studies/*/; do
  [ -d "$s/cells" ] || continue
  files+=("$s"cells/*/cell.json "$s"cells/*/*.parquet "$s"parts/*.parquet)
  files+=("$s"selection/*.json "$s"experiments/*.json)
  # Step logs of finished cells only (a run in progress rewrites its log).
  for c in "$s"cells/*/; do
    log="$s"work/$(basename "$c")/train/log.parquet
    [ -f "$log" ] && files+=("$log")
  done
done
[ ${#files[@]} -eq 0 ] || git add -f -- "${files[@]}"
git add -u studies 2>/dev/null || true
git status --short studies
