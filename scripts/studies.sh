#!/usr/bin/env bash
# The studies of issue 20 on this machine's CPU, resumable across sessions: SIB-200 (7
# languages) then the multi-task mix, each under ../shared/docs/study.md (selection on dev at
# seed 0 and K = 64, then the grid seed by seed), then the reports. Many CPU hours on 2 cores
# (the plan and the progress are in README.md's study section); with `--features cuda` and
# `device = "cuda"` in the experiment files it is an hour-scale job.
#
#   nohup nice -n 19 env BIN=... BIN_SELECTION=... scripts/studies.sh > studies.log 2>&1 &
# BIN: the grids' pinned binary (SIB-200's grid, the multi-task mix and the collapse grid);
# BIN_SELECTION: the binary the SIB-200 selection ran on, needed only while its record still
# has a method without a choice; REPORT_BIN: the binary that writes the reports, this
# checkout's release build by default. studies/PINNED names the commits and how to build them.
#
# The stores live in studies/<name>/ and their finished cells are committed (scripts/
# studies-save.sh), so a later session resumes where this one stopped. A cell's key includes
# the code version: resume with the binaries built from the pinned commits, or the grid starts
# afresh beside the old cells.
# The SIB-200 selection (benchmarks/sib200-multilingual.toml, experiment `sib200-study`) ran on
# 9d0f1ad; its grid (benchmarks/sib200-grid.toml) takes the choices from the selection's record
# (`[study] settings_from`) and runs on the faster grids' binary, like the multi-task study.
# While the record lacks a choice, the selection binary runs the selection file: once the record is
# complete, this script stops it (SIGINT: a cell it started beyond the selection is left
# unfinished, minutes of work at most), so no test cell comes from the selection's binary.
# Workers: one per core (WORKERS, default `nproc`), each with one compute thread, sharing the
# stores (each cell is claimed by one worker; a worker skips cells another holds). On these
# 2-core machines a second thread makes one process only 1.11x (MeTA-LoRA) to 1.32x (lora-k)
# faster, while two one-thread processes run at full speed side by side, so two workers finish
# the grid about 1.5-1.8x sooner (benchmarks/perf/README.md); the results are the same bits.
# The studies run in f32 (the default): the machines of this project are not all AMX machines,
# and `--matmul bf16` is part of the code version, so a study started in bf16 could not be
# resumed on a machine without AMX.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mlbench}
WORKERS=${WORKERS:-$(nproc)}
[ -x "$BIN" ] || cargo build --release --locked
# The grids' binary must be the pinned commit's build: its cells' keys carry the commit it
# reports (a target folder copied from another checkout can keep an old commit: session 13's
# "a055fa8" build reported 9d0f1ad).
pinned=$(awk '$1 == "grids" { print $2 }' studies/PINNED)
"$BIN" --version | grep -qE "\(git ${pinned}[0-9a-f]*\)$" || {
  echo "studies.sh: $BIN reports '$("$BIN" --version)', studies/PINNED pins the grids to $pinned" >&2
  exit 2
}
[ -d models/gemma-3-270m ] || scripts/fetch-models.sh gemma3 "$BIN"

# The SIB-200 selection, while its record has a method without a choice.
record=studies/sib200/selection/sib200-study.json
selection_left() { [ ! -f "$record" ] || grep -q '"chosen": null' "$record"; }
if selection_left; then
  [ -x "${BIN_SELECTION:-}" ] || {
    echo "studies.sh: the SIB-200 selection is not complete ($record): set BIN_SELECTION to its binary (studies/PINNED)" >&2
    exit 2
  }
  sel=()
  for _ in $(seq "$WORKERS"); do
    RAYON_NUM_THREADS=1 "$BIN_SELECTION" run benchmarks/sib200-multilingual.toml --store studies/sib200 &
    sel+=($!)
    sleep 5
  done
  while selection_left; do
    alive=0
    for p in "${sel[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 1 ] || break
    sleep 30
  done
  kill -INT "${sel[@]}" 2>/dev/null || true
  for p in "${sel[@]}"; do wait "$p" || true; done
  selection_left && { echo "studies.sh: the selection processes ended with the record incomplete" >&2; exit 1; }
fi

# SIB-200's grid runs in two passes: first its K = 16 and 64 cells for every method and seed
# (what the study needs before its verdicts can be read: issue 20's minimum), then the whole
# file (K = 8 and 32). The first pass is the same file with `ks` cut to 16 and 64: a cell's key
# does not depend on the list, so both passes name the same cells (checked with --dry-run).
first=studies/.sib200-grid-k16-k64.toml
mkdir -p studies
sed 's/^ks = \[8, 16, 32, 64\]$/ks = [16, 64]/' benchmarks/sib200-grid.toml >"$first.tmp"
grep -q '^ks = \[16, 64\]$' "$first.tmp" || { echo "studies.sh: ks line of the SIB-200 grid file changed" >&2; exit 2; }
mv "$first.tmp" "$first"
# The multi-task grid's tuned MeTA-LoRA cells at K = 64 (meta-lora, meta-lora+tta sharing its
# training run, stage2-only) come first in their own pass: with the collapse grid's untuned
# cells they say whether tuning removes the collapse. The pass's file is the grid's without
# `lora-full` (its method table dropped, `stage2-only` the reference so the file is valid); a
# cell's key depends on neither, so both name the same cells (checked with --dry-run, like
# SIB-200's first pass).
meta64=studies/.multitask-k64-meta.toml
sed -e 's/^methods = \[.*\]$/methods = ["meta-lora", "meta-lora+tta", "stage2-only"]/' \
  -e 's/^ks = \[16, 64\]$/ks = [64]/' -e 's/^reference = "lora-full"$/reference = "stage2-only"/' \
  benchmarks/multitask.toml | awk '/^\[/ { skip = ($0 == "[method.lora-full]") } !skip' >"$meta64.tmp"
grep -q '^ks = \[64\]$' "$meta64.tmp" && grep -q '^methods = \["meta-lora", ' "$meta64.tmp" &&
  grep -q '^reference = "stage2-only"$' "$meta64.tmp" ||
  { echo "studies.sh: methods, ks or reference line of the multi-task grid file changed" >&2; exit 2; }
mv "$meta64.tmp" "$meta64"
# Then the rest of the multi-task grid at K = 64 (base, lora-full and lora-k, three seeds: the
# verdicts against lora-full at K = 64) before its K = 16 cells: the grid's file with `ks`
# cut to 64, the same cells (checked with --dry-run).
mt64=studies/.multitask-k64.toml
sed 's/^ks = \[16, 64\]$/ks = [64]/' benchmarks/multitask.toml >"$mt64.tmp"
grep -q '^ks = \[64\]$' "$mt64.tmp" || { echo "studies.sh: ks line of the multi-task grid file changed" >&2; exit 2; }
mv "$mt64.tmp" "$mt64"

# Order (session 16): what the issue needs first, then the most answer per CPU hour: SIB-200
# at K = 16 and 64 (the minimum for its verdicts), the collapse grid (9 cells, about 3
# worker-hours) and the tuned multi-task MeTA-LoRA cells at K = 64 (9 cells, 6 trainings: the
# collapse question answered whole), SIB-200 at K = 8 and 32 (about 4.5), the multi-task grid
# at K = 64 (session 18: its reference and lora-k first), then at K = 16.
grids=("$first studies/sib200"
  "benchmarks/multitask-collapse.toml studies/multitask"
  "$meta64 studies/multitask"
  "benchmarks/sib200-grid.toml studies/sib200"
  "$mt64 studies/multitask"
  "benchmarks/multitask.toml studies/multitask")

# Cells of the grids still to run or running, and methods still waiting for their selection
# (their grid cells appear once it is complete).
left() {
  local g
  for g in "${grids[@]}"; do
    set -- $g
    "$BIN" -q run "$1" --store "$2" --dry-run
  done | grep -c -E 'to run|running|built once' || true
}

# One worker: runs both grids until nothing is left; when the other worker holds the last
# cells (or the selection it waits for), it checks again a minute later.
worker() {
  local g
  while :; do
    for g in "${grids[@]}"; do
      set -- $g
      RAYON_NUM_THREADS=1 "$BIN" run "$1" --store "$2" || return $?
    done
    [ "$(left)" -eq 0 ] && return 0
    sleep 60
  done
}

pids=()
for _ in $(seq "$WORKERS"); do
  worker &
  pids+=($!)
  sleep 5 # the first worker claims its cell before the next one looks
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
[ "$status" -eq 0 ] || exit "$status"
# The reports come from this checkout's code (reports do not enter the cells' keys, and later
# code reports more: every selection candidate, for one), not from the grids' pinned binaries.
scripts/study-reports.sh "${REPORT_BIN:-target/release/mlbench}"
