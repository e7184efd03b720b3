#!/usr/bin/env bash
# The main job on a fresh machine: build mlbench, check the shipped datasets against their
# manifest, describe them, and draw the default few-shot pools (3 SIB-200 languages, K = 16 and
# 64, seed 0). Later stages (training, evaluation, reports) extend this script.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
cargo build --release --locked
bin=target/release/mlbench

"$bin" data verify
"$bin" data ls
"$bin" data describe --task sib200 --langs en,fr,sw --split train
mkdir -p runs
"$bin" data sample --task sib200 --langs en,fr,sw --k 16,64 --seed 0 --out runs/pools-sib200-en-fr-sw-seed0.parquet
