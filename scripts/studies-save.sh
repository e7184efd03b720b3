#!/usr/bin/env bash
# Stages what a later session needs to resume and report the studies: the finished cells (their
# cell.json carries the budget facts), the selection and declaration records, and the training
# runs' step logs (the report's curves). Adapters, manifests, checkpoints, locks and evaluation
# outputs stay out of git: a run folder without its manifest is trained again when a grid cell
# needs it (a cell in training when a session ends restarts its training).
#   scripts/studies-save.sh && git commit -m "studies: cells so far"
set -euo pipefail
cd "$(dirname "$0")/.."
for s in studies/*/; do
  [ -d "$s/cells" ] || continue
  git add -f "$s"cells/*/cell.json "$s"cells/*/*.parquet 2>/dev/null || true
  git add -f "$s"parts/*.parquet "$s"selection/*.json "$s"experiments/*.json 2>/dev/null || true
  git add -f "$s"work/*/train/log.parquet 2>/dev/null || true
done
git add -u studies 2>/dev/null || true
git status --short studies | head
