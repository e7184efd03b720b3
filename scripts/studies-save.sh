#!/usr/bin/env bash
# Stages what a later session needs to resume and report the studies: the finished cells (their
# cell.json carries the budget facts), the selection and declaration records, the step logs of
# the finished cells' training runs (the report's curves), and the last checkpoint of every run
# still in training (its config.json and checkpoint/ folder, about 9 MB for a LoRA r = 8 run:
# adapter and optimizer moments), so a cell stopped at a session's end resumes in the next one
# instead of starting again: a lora-full run is hours, longer than what a session leaves after
# its builds. Stop the workers with SIGINT first: each writes a checkpoint as it stops. Once a
# run's cell has finished, its checkpoint leaves the index again. Adapters, manifests, locks
# and evaluation outputs stay out of git: a run folder without its manifest is trained again when
# a grid cell needs it.
#   scripts/studies-save.sh && git commit -m "studies: cells so far"
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
files=()
gone=()
for s in studies/*/; do
  [ -d "$s/cells" ] || continue
  files+=("$s"cells/*/cell.json "$s"cells/*/*.parquet "$s"parts/*.parquet)
  files+=("$s"selection/*.json "$s"experiments/*.json)
  # Step logs of finished cells only (a run in progress rewrites its log).
  for c in "$s"cells/*/; do
    log="$s"work/$(basename "$c")/train/log.parquet
    [ -f "$log" ] && files+=("$log")
  done
  # Runs still in training: their configuration and last checkpoint; finished ones: neither.
  for w in "$s"work/*/; do
    t="$w"train
    if [ -d "$s"cells/$(basename "$w") ]; then
      gone+=("$t/config.json" "$t/checkpoint")
    elif [ -d "$t/checkpoint" ]; then
      files+=("$t/config.json")
      while IFS= read -r f; do files+=("$f"); done < <(find "$t/checkpoint" -type f)
    fi
  done
done
[ ${#gone[@]} -eq 0 ] || git rm -r -q --cached --ignore-unmatch -- "${gone[@]}" >/dev/null
[ ${#files[@]} -eq 0 ] || git add -f -- "${files[@]}"
git add -u studies 2>/dev/null || true
git status --short studies
