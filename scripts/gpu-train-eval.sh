#!/usr/bin/env bash
# Runs ON the lent GPU machine after scripts/gpu-check.sh (which unpacks gpu-bundle/ into
# /tmp/gpu-bundle and writes random-weight models into /tmp/gpu-models): trainer speed per
# method (benchmarks/perf/train.sh) and evaluation speed with --device cuda, on Gemma 3 270M's
# real config and tokenizer with random weights, SIB-200 en/fr/sw, K = 64. Output on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
W=/tmp/gpu-bundle
M=/tmp/gpu-models/${MODEL_NAME:-gemma-3-270m}
[ -x "$W/mlbench" ] && [ -f "$M/model.safetensors" ] || { echo "run scripts/gpu-check.sh first"; exit 2; }
libdirs=$("$PY" - <<'PY' 2>/dev/null
import glob, os
import nvidia
out = []
for r in nvidia.__path__:
    for d in [os.path.join(r, "cu13", "lib")] + sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if os.path.isdir(d) and glob.glob(os.path.join(d, "lib*.so*")):
            out.append(d)
print(":".join(out))
PY
)
export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-16}
for dt in ${TRAIN_DTYPES:-f32 bf16}; do
  echo "== trainer speed, $dt"
  BIN=$W/mlbench MODEL=$M DEVICE=cuda DTYPE=$dt ITERS=${ITERS:-4} OUT=/tmp/perf-train-$dt PY=$PY \
    METHODS=${METHODS:-"lora-k meta-lora stage2-only lora-per-task-k stage1-only"} \
    timeout 300 benchmarks/perf/train.sh || echo "train.sh $dt failed (rc=$?)"
done
echo "== eval speed (SIB-200 en,fr,sw test, 612 examples, base model)"
for bs in 16 64; do
  /usr/bin/time -f "peak_rss_kb=%M wall_s=%e" timeout 200 "$W/mlbench" -q eval --model "$M" --task sib200 \
    --langs en,fr,sw --device cuda --batch-size "$bs" --out "/tmp/ev-$bs" 2>&1 | tail -2
  "$PY" -c "import json;r=json.load(open('/tmp/ev-$bs/results.json'));print('batch $bs: examples', r['examples'], 'seconds %.2f'%r['seconds'], 'examples/s %.1f'%r['examples_per_s'])" || true
done
