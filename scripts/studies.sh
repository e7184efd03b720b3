#!/usr/bin/env bash
# The studies of issue 20 on this machine's CPU, resumable across sessions: SIB-200 (7
# languages) then the multi-task mix, each under ../shared/docs/study.md (selection on dev at
# seed 0 and K = 64, then the grid seed by seed), then the reports. Many CPU hours on 2 cores
# (the plan and the progress are in README.md's study section); with `--features cuda` and
# `device = "cuda"` in the experiment files it is an hour-scale job.
#
#   BIN=/path/to/pinned/mlbench scripts/studies.sh          # niced, in the background:
#   nohup nice -n 19 env BIN=... scripts/studies.sh > studies.log 2>&1 &
#
# The stores live in studies/<name>/ and their finished cells are committed (scripts/
# studies-save.sh), so a later session resumes where this one stopped. A cell's key includes
# the code version: resume with a binary built from the commit that started the grid
# (studies/PINNED names it), or the grid starts afresh beside the old cells.
# The studies run in f32 (the default): the machines of this project are not all AMX machines,
# and `--matmul bf16` is part of the code version, so a study started in bf16 could not be
# resumed on a machine without AMX.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mlbench}
[ -x "$BIN" ] || cargo build --release --locked
[ -d models/gemma-3-270m ] || scripts/fetch-models.sh gemma3 "$BIN"

"$BIN" run benchmarks/sib200-multilingual.toml --store studies/sib200
"$BIN" run benchmarks/multitask.toml --store studies/multitask
scripts/study-reports.sh "$BIN"
