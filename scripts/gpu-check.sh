#!/usr/bin/env bash
# Runs ON a lent GPU machine (no Rust, no network), from the repo root, with gpu-bundle/ (made
# here by scripts/gpu-build.sh) carried along. Writes everything to $OUT/gpu-check.log:
#   1. finds the CUDA runtime libraries (driver libcuda, and cudart/cublas/cublasLt/curand/nvrtc
#      from the machine's PyTorch wheels) and sets LD_LIBRARY_PATH; nvidia-smi;
#   2. the carried test binaries with MLBENCH_TEST_DEVICE=cuda (pass/fail per binary);
#   3. the model speed benchmark, mlbench then PyTorch + PEFT, on the same card, for SmolLM2-135M
#      and Gemma 3 270M with the real configs and tokenizers but RANDOM weights made here (the
#      real f32 folders are far over the 64 MiB carry limit; speed does not depend on the values).
# Env: STEPS (default 5), DTYPES (default "f32 bf16"), MODELS (default "smollm2-135m gemma-3-270m"),
#      TESTS (carried test binaries to run, default all carried: model golden train eval model_cli),
#      SKIP_TESTS=1 / SKIP_BENCH=1, TEST_DEVICE / BENCH_DEVICE (default cuda), TEST_TIMEOUT (s per test binary, default 150), PY (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-5}
TEST_DEVICE=${TEST_DEVICE:-cuda} BENCH_DEVICE=${BENCH_DEVICE:-cuda}  # cpu: dry run on a machine without a GPU
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start )) s] $*"; }

main() {

# --- the bundle ---------------------------------------------------------------------------
B=$repo/gpu-bundle
[ -d "$B" ] || { echo "no gpu-bundle/ here: carry it (scripts/gpu-build.sh makes it)"; return 2; }
W=/tmp/gpu-bundle
rm -rf "$W" && mkdir -p "$W"
unpack_xz() { # file.xz -> stdout; Python's lzma where there is no xz
  if command -v xz >/dev/null; then xz -dc "$1"
  else "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; fi
}
if [ -f "$B/bin.tar.xz" ]; then unpack_xz "$B/bin.tar.xz" | tar -C "$W" -xf -; else cp -r "$B"/. "$W"/; fi
chmod +x "$W"/mlbench "$W"/model_bench "$W"/tests/* 2>/dev/null
# Test binaries have compile-time paths baked in (CARGO_MANIFEST_DIR for data/fixtures,
# CARGO_BIN_EXE_mlbench for the CLI tests): recreate them here.
# shellcheck disable=SC1091
. "$W/paths.env"
if [ "$BUILD_MANIFEST_DIR" != "$repo" ] && [ ! -e "$BUILD_MANIFEST_DIR" ]; then
  mkdir -p "$(dirname "$BUILD_MANIFEST_DIR")" && ln -s "$repo" "$BUILD_MANIFEST_DIR"
fi
mkdir -p "$(dirname "$BUILD_BIN_EXE_mlbench")"
[ -e "$BUILD_BIN_EXE_mlbench" ] || ln -s "$W/mlbench" "$BUILD_BIN_EXE_mlbench"
stamp "bundle: $(ls "$W" "$W/tests" | tr '\n' ' ')"

# --- runtime libraries --------------------------------------------------------------------
libdirs=()
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
    [ -e "$d/libcuda.so.1" ] && { libdirs+=("$d"); break; }
  done
fi
# CUDA 13 wheels install into site-packages/nvidia/cu13/lib; older ones into nvidia/<pkg>/lib.
while IFS= read -r d; do libdirs+=("$d"); done < <("$PY" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
seen = set()
for r in roots:
    for d in [os.path.join(r, "cu13", "lib")] + sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if d not in seen and os.path.isdir(d) and glob.glob(os.path.join(d, "lib*.so*")):
            seen.add(d)
            print(d)
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && libdirs+=("$d"); done
LD_LIBRARY_PATH=$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
# Anything still missing (say a PyTorch without nvidia-curand): the first copy under /usr or /opt.
for lib in $(ldd "$W/mlbench" "$W/model_bench" | awk '/not found/ {print $1}' | sort -u); do
  f=$(find /usr /opt /root -name "$lib" -print -quit 2>/dev/null)
  [ -n "$f" ] && { echo "found $lib at $f"; LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(dirname "$f"); }
done
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for b in "$W/mlbench" "$W/model_bench"; do
  echo "ldd $(basename "$b"):"; ldd "$b" | grep -E 'cuda|cublas|curand|nvrtc|not found' | sed 's/^/  /'
done
if ldd "$W/model_bench" | grep -q 'not found'; then echo "MISSING shared libraries (above): stopping"; return 3; fi

stamp "nvidia-smi"
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)' || true
"$W/mlbench" --version || true

# --- correctness tests on the GPU ---------------------------------------------------------
declare -A verdict
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  for t in "$W"/tests/*; do
    n=$(basename "$t")
    [ -z "${TESTS:-}" ] || [[ " $TESTS " == *" $n "* ]] || continue
    stamp "== test binary $n (MLBENCH_TEST_DEVICE=$TEST_DEVICE)"
    # cargo runs test binaries from the package root; so do we.
    (cd "$repo" && MLBENCH_TEST_DEVICE=$TEST_DEVICE RUST_BACKTRACE=1 timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads=4 2>&1)
    rc=$?
    case $rc in 0) verdict[$n]=PASS ;; 124) verdict[$n]="TIMEOUT" ;; *) verdict[$n]="FAIL(rc=$rc)" ;; esac
  done
fi

# --- speed: mlbench vs PyTorch + PEFT on this card -----------------------------------------
gpu_peak() { # runs "$@" while sampling the card's used memory; prints the peak (MiB)
  local f; f=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$f" 2>/dev/null &
  local s=$!
  "$@"; local rc=$?
  kill "$s" 2>/dev/null; wait "$s" 2>/dev/null
  echo "peak_gpu_used_mib=$(sort -n "$f" | tail -1) (whole card, nvidia-smi every 100 ms)"
  rm -f "$f"; return $rc
}
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  M=/tmp/gpu-models
  for name in ${MODELS:-smollm2-135m gemma-3-270m}; do
    src=$B/models/$name
    [ -d "$src" ] || { echo "no carried config for $name"; continue; }
    stamp "== random-weight $name (real config.json + tokenizer.json)"
    mkdir -p "$M/like-$name"
    cp "$src/config.json" "$M/like-$name/"
    if [ -f "$src/tokenizer.json.xz" ]; then unpack_xz "$src/tokenizer.json.xz" >"$M/like-$name/tokenizer.json"; else cp "$src/tokenizer.json" "$M/like-$name/"; fi
    # mlbench's own writer (`model tiny --like`, seed 0); transformers' init as a fallback.
    "$W/mlbench" model tiny --like "$M/like-$name" --out "$M/$name" --seed 0 && continue
    echo "mlbench model tiny --like failed: random weights from transformers instead"
    rm -rf "$M/$name" && cp -r "$M/like-$name" "$M/$name"
    "$PY" - "$M/$name" <<'PY' || { echo "could not make random weights for $name"; continue; }
import json, os, shutil, sys, tempfile
import torch
from transformers import AutoConfig, AutoModelForCausalLM
d = sys.argv[1]
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(d)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
tmp = tempfile.mkdtemp()
model.save_pretrained(tmp, safe_serialization=True)
files = [f for f in os.listdir(tmp) if f.endswith(".safetensors")]
assert files == ["model.safetensors"], files  # one file, as `mlbench model import` writes
shutil.move(os.path.join(tmp, "model.safetensors"), os.path.join(d, "model.safetensors"))
print(f"{d}: {sum(p.numel() for p in model.parameters())/1e6:.1f}M parameters, random (seed 0), f32")
PY
  done
  export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-16} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  for dt in ${DTYPES:-f32 bf16}; do
    for name in ${MODELS:-smollm2-135m gemma-3-270m}; do
      [ -f "$M/$name/model.safetensors" ] || continue
      stamp "== bench $name $dt: mlbench ($BENCH_DEVICE)"
      MLBENCH_DEVICE=$BENCH_DEVICE MLBENCH_DTYPE=$dt gpu_peak timeout 240 "$W/model_bench" "$M/$name" "$STEPS" \
        || verdict["bench-mlbench-$name-$dt"]=FAIL
      stamp "== bench $name $dt: pytorch+peft ($BENCH_DEVICE, eager attention)"
      MLBENCH_DEVICE=$BENCH_DEVICE MLBENCH_DTYPE=$dt ATTN=eager gpu_peak timeout 240 "$PY" benchmarks/perf/model_bench_torch.py "$M/$name" "$STEPS" \
        || verdict["bench-torch-$name-$dt"]=FAIL
    done
  done
  if [ -n "${TORCH_SDPA:-}" ]; then
    for name in ${MODELS:-smollm2-135m gemma-3-270m}; do
      stamp "== bench $name bf16: pytorch+peft ($BENCH_DEVICE, sdpa attention)"
      MLBENCH_DEVICE=$BENCH_DEVICE MLBENCH_DTYPE=bf16 ATTN=sdpa timeout 240 "$PY" benchmarks/perf/model_bench_torch.py "$M/$name" "$STEPS"
    done
  fi
fi

stamp "== summary"
for k in "${!verdict[@]}"; do echo "$k: ${verdict[$k]}"; done | sort
stamp "done"
  for k in "${!verdict[@]}"; do [ "${verdict[$k]}" = PASS ] || return 1; done
}

main 2>&1 | tee "$OUT/gpu-check.log"
rc=$?
grep -h -E '^(\[[0-9]+ s\] == |test result:|forward_full_logits|train_loss|model=|peak_|[a-z_-]+: (PASS|FAIL|TIMEOUT))' \
  "$OUT/gpu-check.log" >"$OUT/gpu-summary.txt" || true
exit $rc
