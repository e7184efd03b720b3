#!/usr/bin/env bash
# Builds mlbench with its `cuda` feature on a machine with no GPU and no CUDA install, and packs
# what a lent GPU machine needs into gpu-bundle/ (carry it with the device tool's `carry`; run
# scripts/gpu-check.sh there).
#
# CUDA comes from PyPI into a venv outside the repo: nvcc 13.0 and the headers/libraries of the
# same release (the GPU machines' driver is CUDA 13.0, and candle loads its kernels as PTX, which
# a 13.0 driver only JIT-compiles if a 13.0 nvcc made it). candle's cudarc uses `dynamic-linking`,
# so the binaries are linked against libcuda/cublas/cublasLt/curand/nvrtc/cudart: the CUDA
# libraries are the PyPI ones (symlinked as lib*.so into a fake CUDA root), and libcuda.so
# (driver, not on PyPI) is a stub generated here from cudarc's bindings, used only for linking.
# At run time the GPU machine's driver and its PyTorch's CUDA 13 libraries are used.
#
# Env (all optional): CUDA_VENV (default ../venv-cuda beside the repo), CARGO_TARGET_DIR
# (default ../target-cuda beside the repo), CUDA_COMPUTE_CAP (default 90: H100/H200),
# GPU_TESTS (test targets to bundle, default "model golden train eval model_cli": the ones that
# read MLBENCH_TEST_DEVICE, plus the CLI; "all" for every one, "lib" is the unit tests).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
VENV=${CUDA_VENV:-$(cd .. && pwd)/venv-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd .. && pwd)/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
GPU_TESTS=${GPU_TESTS:-model golden train eval model_cli}
# One CUDA release throughout (13.0): nvcc's own dependencies otherwise pull the newest.
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14)

have=$("$VENV/bin/python" -m pip show nvidia-cuda-nvcc 2>/dev/null || true)
if ! grep -q '^Version: 13\.0\.88$' <<<"$have"; then
  echo "== installing CUDA 13.0 build tools from PyPI into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${PKGS[@]}"
fi
cu=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
"$cu/bin/nvcc" --version | grep -q 'release 13\.0' || { echo "nvcc in $cu is not 13.0" >&2; exit 1; }

# Fake CUDA root for cudarc's link search ($CUDA_HOME/lib): unversioned lib*.so links + libcuda stub.
croot="$VENV/cuda-root"
mkdir -p "$croot/lib"
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  ln -sfn "$cu/lib/lib$l" "$croot/lib/lib${l%%.so.*}.so"
done
cargo fetch --locked -q
cudarc_ver=$(awk '/^name = "cudarc"$/{getline; gsub(/[^0-9.]/,""); print}' Cargo.lock)
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_ver" | head -1)
if [ ! -e "$croot/lib/libcuda.so" ] || [ "$cudarc_src/src/driver/sys/mod.rs" -nt "$croot/lib/libcuda.so" ]; then
  echo "== libcuda.so link stub from $cudarc_src"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" |
    sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u >"$croot/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$croot/lib/libcuda.so" "$croot/cuda_stub.c"
fi

export PATH="$cu/bin:$PATH" CUDA_HOME="$croot" CUDARC_CUDA_VERSION=13000
echo "== cargo build (cuda, sm_$CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR"
t0=$(date +%s)
cargo build --release --locked --features cuda --bin mlbench --examples
cargo test --release --locked --features cuda --no-run --message-format=json-render-diagnostics \
  >"$CARGO_TARGET_DIR/gpu-tests.json"
echo "== build took $(( $(date +%s) - t0 )) s"

# gpu-bundle/: bin.tar.xz (stripped binaries + the compile-time paths the tests have baked in)
# and the real models' config.json + tokenizer.json (gpu-check.sh makes random weights there).
stage=$(mktemp -d)
mkdir -p "$stage/tests"
cp "$CARGO_TARGET_DIR/release/mlbench" "$CARGO_TARGET_DIR/release/examples/model_bench" "$stage/"
python3 - "$CARGO_TARGET_DIR/gpu-tests.json" "$GPU_TESTS" "$stage/tests" <<'PY'
import json, shutil, sys
want = sys.argv[2].split()
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    kind, name = m["target"]["kind"][0], m["target"]["name"]
    name = "lib" if kind == "lib" else name
    if kind in ("lib", "test") and ("all" in want or name in want):
        shutil.copy(m["executable"], f"{sys.argv[3]}/{name}")
PY
strip "$stage"/mlbench "$stage"/model_bench "$stage"/tests/*
dirty=$(git diff --quiet HEAD -- src tests Cargo.toml Cargo.lock || echo -dirty)
cat >"$stage/paths.env" <<ENV
BUILD_MANIFEST_DIR=$root
BUILD_BIN_EXE_mlbench=$CARGO_TARGET_DIR/release/mlbench
BUILD_COMMIT=$(git rev-parse --short HEAD)$dirty
BUILD_CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP
ENV
rm -rf gpu-bundle && mkdir -p gpu-bundle
# One xz stream with a dictionary larger than the whole tar: the binaries share most of their
# bytes (candle's CUDA fatbin alone is 33 MB in each), so this packs ~400 MB into ~23 MB where
# plain `xz -6 -T0` gives ~58 MB. Single-threaded on purpose; ~5 min, ~5 GB of memory.
tar -C "$stage" -cf - . | xz -9e --lzma2=preset=9e,dict=512MiB -T1 >gpu-bundle/bin.tar.xz
rm -rf "$stage"
for m in smollm2-135m gemma-3-270m; do
  if [ -f "models/$m/config.json" ] && [ -f "models/$m/tokenizer.json" ]; then
    mkdir -p "gpu-bundle/models/$m"
    cp "models/$m/config.json" "gpu-bundle/models/$m/"
    xz -T0 -6 -c "models/$m/tokenizer.json" >"gpu-bundle/models/$m/tokenizer.json.xz"
  else
    echo "warning: models/$m missing (scripts/fetch-models.sh): no speed run for it on the GPU" >&2
  fi
done
echo "== gpu-bundle/ ($(du -sh gpu-bundle | cut -f1); carry limit 64 MiB together with the work tree):"
find gpu-bundle -type f -exec ls -l {} + | awk '{printf "%10d  %s\n", $5, $9}'
xz -dc gpu-bundle/bin.tar.xz | tar -tvf - | awk '{printf "%10d  bin.tar.xz:%s\n", $3, $6}'
