#!/usr/bin/env bash
# The studies of issue 20 on this machine's CPU, resumable across sessions: SIB-200 (7
# languages) then the multi-task mix, each under ../shared/docs/study.md (selection on dev at
# seed 0 and K = 64, then the grid seed by seed), then the reports. Many CPU hours on 2 cores
# (the plan and the progress are in README.md's study section); with `--features cuda` and
# `device = "cuda"` in the experiment files it is an hour-scale job.
#
#   BIN=/path/to/pinned/mlbench scripts/studies.sh          # niced, in the background:
#   nohup nice -n 19 env BIN=... BIN_MULTITASK=... scripts/studies.sh > studies.log 2>&1 &
# (BIN_MULTITASK: the multi-task study's own pinned binary, BIN when unset; REPORT_BIN: the
# binary that writes the reports, this checkout's release build by default.)
#
# The stores live in studies/<name>/ and their finished cells are committed (scripts/
# studies-save.sh), so a later session resumes where this one stopped. A cell's key includes
# the code version: resume with a binary built from the commit that started the grid
# (studies/PINNED names it), or the grid starts afresh beside the old cells.
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
[ -d models/gemma-3-270m ] || scripts/fetch-models.sh gemma3 "$BIN"

# Each grid with the binary it is pinned to (studies/PINNED): a study's cells all come from one
# code version, but two studies need not share one.
BIN_MULTITASK=${BIN_MULTITASK:-$BIN}
[ -x "$BIN_MULTITASK" ] || { echo "no binary at $BIN_MULTITASK" >&2; exit 2; }
# SIB-200 runs in two passes: first its K = 16 and 64 cells for every method and seed (what the
# study needs before its verdicts can be read: issue 20's minimum), then the whole file (K = 8
# and 32). The first pass is the same file with `ks` cut to 16 and 64: a cell's key does not
# depend on the list, so both passes name the same cells (checked with --dry-run).
first=studies/.sib200-k16-k64.toml
mkdir -p studies
sed 's/^ks = \[8, 16, 32, 64\]$/ks = [16, 64]/' benchmarks/sib200-multilingual.toml >"$first.tmp"
grep -q '^ks = \[16, 64\]$' "$first.tmp" || { echo "studies.sh: ks line of the SIB-200 file changed" >&2; exit 2; }
mv "$first.tmp" "$first"
grids=("$first studies/sib200 $BIN"
  "benchmarks/sib200-multilingual.toml studies/sib200 $BIN"
  "benchmarks/multitask.toml studies/multitask $BIN_MULTITASK"
  "benchmarks/multitask-collapse.toml studies/multitask $BIN_MULTITASK")

# Cells of both grids still to run or running, and searched methods still waiting for their
# selection (their grid cells appear once it is complete).
left() {
  local g
  for g in "${grids[@]}"; do
    set -- $g
    "$3" -q run "$1" --store "$2" --dry-run
  done | grep -c -E 'to run|running|built once' || true
}

# One worker: runs both grids until nothing is left; when the other worker holds the last
# cells (or the selection it waits for), it checks again a minute later.
worker() {
  local g
  while :; do
    for g in "${grids[@]}"; do
      set -- $g
      RAYON_NUM_THREADS=1 "$3" run "$1" --store "$2" || return $?
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
