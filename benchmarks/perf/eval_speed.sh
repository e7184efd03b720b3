#!/usr/bin/env bash
# Evaluation speed: `mlbench eval` vs lm-evaluation-harness's HF backend on the same model,
# examples and prompts (the mlbench_* task files in lm_eval_tasks/), 2 threads each, one after
# the other in the same run. Reports wall time, examples/s and peak RSS per process
# (/usr/bin/time), and the scoring time alone (mlbench: results.json `seconds`; lm-eval: its
# "Running loglikelihood requests" progress bar), then the ratios.
#
#   benchmarks/perf/eval_speed.sh                               # SmolLM2-135M
#   MODEL=models/gemma-3-270m benchmarks/perf/eval_speed.sh
#
# Environment: MODEL, PY, MLBENCH, THREADS (2), UNITS ("sib200:eng_Latn,swh_Latn xcopa:sw"),
# XCOPA_LIMIT (500), SIB_LIMIT (all = 204 per language), LM_BATCH (8), MB_BATCHES ("16 32"),
# LM_DTYPE (float32; bfloat16 runs lm-eval's model in bf16), MB_MATMULS ("f32"; "f32 bf16" adds `mlbench --matmul bf16` runs, compared with the f32 ones),
# WORK (a fresh temp folder), SKIP_LM_EVAL=1 (mlbench only), TRIES (3: reruns of a timing that
# other work disturbed).
# Nothing is timed while a cargo/rustc/nvcc/ptxas process runs: the script waits for quiet.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
MODEL=${MODEL:-$REPO/models/smollm2-135m}
MODEL=$(cd "$MODEL" && pwd)
PY=${PY:-/work/venv-peers/bin/python}
MLBENCH=${MLBENCH:-$REPO/target/release/mlbench}
THREADS=${THREADS:-2}
UNITS=${UNITS:-sib200:eng_Latn,swh_Latn xcopa:sw}
XCOPA_LIMIT=${XCOPA_LIMIT:-500}
SIB_LIMIT=${SIB_LIMIT:-}
LM_BATCH=${LM_BATCH:-8}
MB_BATCHES=${MB_BATCHES:-16 32}
MB_MATMULS=${MB_MATMULS:-f32}
LM_DTYPE=${LM_DTYPE:-float32}
TRIES=${TRIES:-3}
WORK=${WORK:-$(mktemp -d /tmp/mlbench-eval-speed.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
CMP="$PY $REPO/benchmarks/perf/eval_compare.py"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$WORK/hf_datasets"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
TIMES=$WORK/times
mkdir -p "$TIMES"
# A private copy: a rebuild during the run must not swap the binary under the timings.
cp "$MLBENCH" "$WORK/mlbench" && MLBENCH=$WORK/mlbench
echo "model=$MODEL threads=$THREADS work=$WORK mlbench=$("$MLBENCH" --version)"

# Quiet = no cargo/rustc/nvcc/ptxas process and no other process (outside this script's process
# group) above 15% of a core (eval_compare.py busy). Before each timed run we wait for quiet;
# during it a monitor notes every busy sample in $TIMES/<name>.busy (reported as not clean).
PGID=$(ps -o pgid= $$ | tr -d ' ')
wait_quiet() {
  local why
  while ! why=$($CMP busy --pgid "$PGID"); do
    echo "  (machine busy: $why; waiting 30 s before timing)"
    sleep 27
  done
}
MON=
monitor_start() {
  (while sleep 5; do w=$($CMP busy --pgid "$PGID" --seconds 2 --max-cpu 25) || echo "$(date +%T) $w" >>"$TIMES/$1.busy"; done) &
  MON=$!
}
monitor_stop() { [[ -n $MON ]] && { kill "$MON" 2>/dev/null || true; wait "$MON" 2>/dev/null || true; }; MON=; }
trap monitor_stop EXIT
# timed NAME CMD...: waits for quiet, runs CMD under /usr/bin/time with the monitor, and reruns it
# (up to TRIES times) while the monitor saw other work; the last try's files are kept.
timed() {
  local name=$1 try
  shift
  for ((try = 1; try <= TRIES; try++)); do
    wait_quiet
    rm -f "$TIMES/$name.busy"
    monitor_start "$name"
    /usr/bin/time -f "wall=%e\nmaxrss_kb=%M" -o "$TIMES/$name.time" "$@" >"$TIMES/$name.log" 2>&1 ||
      { monitor_stop; tail -n 30 "$TIMES/$name.log"; exit 1; }
    monitor_stop
    echo "  $name (try $try): $(tr '\n' ' ' <"$TIMES/$name.time")$([[ -f $TIMES/$name.busy ]] && echo "- other work seen: $(head -n 1 "$TIMES/$name.busy")")"
    [[ -f "$TIMES/$name.busy" ]] || return 0
  done
}

$CMP hf-folder --model "$MODEL" --out "$WORK/hf_model" --check
TASKDIR=$WORK/lm_eval_tasks
rm -rf "$TASKDIR" "$WORK/mlbench_export" && mkdir -p "$TASKDIR"

for spec in $UNITS; do
  task=${spec%%:*}
  langs=${spec#*:}
  limit=
  [[ $task == xcopa ]] && limit=$XCOPA_LIMIT
  [[ $task == sib200 ]] && limit=$SIB_LIMIT
  $CMP export --out "$WORK/mlbench_export" --task "$task" --langs "$langs" ${limit:+--limit "$limit"} >/dev/null
  lm_tasks=()
  n=0
  IFS=, read -ra ls_ <<<"$langs"
  for l in "${ls_[@]}"; do
    u=${task}_$l
    if [[ -f "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_$u.yaml" ]]; then
      cp "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_$u.yaml" "$TASKDIR/"
    else
      sed "s/xcopa_sw/$u/g" "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_xcopa_sw.yaml" >"$TASKDIR/mlbench_$u.yaml"
    fi
    lm_tasks+=("mlbench_$u")
    n=$((n + $(wc -l <"$WORK/mlbench_export/$u.jsonl")))
  done
  unit="${task}_$(echo "$langs" | tr , +)"
  echo "== $unit: $n examples"

  if [[ -z "${SKIP_LM_EVAL:-}" ]]; then
    name="lm_eval_${unit}_bs$LM_BATCH"; [[ $LM_DTYPE == float32 ]] || name="${name}_$LM_DTYPE"
    timed "$name" bash -c 'cd "$1" && shift && exec "$@"' _ "$WORK" \
      "$PY" -c "import torch, sys; torch.set_num_threads($THREADS); sys.argv=['lm_eval']+sys.argv[1:]; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \
        run --model hf --model_args "pretrained=$WORK/hf_model,dtype=$LM_DTYPE" --device cpu \
        --batch_size "$LM_BATCH" --include_path "$TASKDIR" --tasks "$(IFS=,; echo "${lm_tasks[*]}")" \
        --output_path "$WORK/out_$name"
    printf '{"tool":"lm_eval","unit":"%s","examples":%d,"log":"%s","batch_size":%d,"dtype":"%s"}\n' \
      "$unit" "$n" "$TIMES/$name.log" "$LM_BATCH" "$LM_DTYPE" >"$TIMES/$name.meta.json"
  fi

  for mm in $MB_MATMULS; do
    for bs in $MB_BATCHES; do
      name="mlbench_${unit}_bs$bs"; [[ $mm == f32 ]] || name="${name}_$mm"
      timed "$name" "$MLBENCH" --quiet --matmul "$mm" eval --model "$MODEL" --task "$task" --langs "$langs" ${limit:+--limit "$limit"} \
          --batch-size "$bs" --out "$WORK/out_$name"
      printf '{"tool":"mlbench","unit":"%s","examples":%d,"out":"%s","batch_size":%d,"matmul":"%s"}\n' \
        "$unit" "$n" "$WORK/out_$name" "$bs" "$mm" >"$TIMES/$name.meta.json"
    done
  done
done

echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
$CMP speed --dir "$TIMES" --json "$WORK/speed.json"
