#!/usr/bin/env bash
# Stages what a later session needs to resume and report the studies: the finished cells, the
# selection and declaration records, and the training runs' manifests, configurations and step
# logs (the report's budget facts and curves). Adapters, checkpoints, locks and evaluation
# outputs stay out of git (a cell in training when a session ends restarts its training).
#   scripts/studies-save.sh && git commit -m "studies: cells so far"
set -euo pipefail
cd "$(dirname "$0")/.."
for s in studies/*/; do
  [ -d "$s/cells" ] || continue
  git add -f "$s"cells/*/cell.json "$s"cells/*/*.parquet 2>/dev/null || true
  git add -f "$s"parts/*.parquet "$s"selection/*.json "$s"experiments/*.json 2>/dev/null || true
  git add -f "$s"work/*/train/manifest.json "$s"work/*/train/config.json \
    "$s"work/*/train/log.parquet 2>/dev/null || true
done
git add -u studies 2>/dev/null || true
git status --short studies | head
