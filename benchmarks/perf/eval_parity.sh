#!/usr/bin/env bash
# Accuracy parity of `mlbench eval` with lm-evaluation-harness (HF backend), same prompt, same
# examples: XCOPA (one language, test split) and SIB-200 (test split, 204 per language).
#
#   benchmarks/perf/eval_parity.sh            # SmolLM2-135M, XCOPA-sw x 500, SIB-200 eng+swh x 204
#   MODEL=models/gemma-3-270m benchmarks/perf/eval_parity.sh
#
# Steps (STEPS, default "export lm_eval mlbench compare"):
#   export   eval_compare.py renders datasets/tasks/<task>.toml over datasets/<task>.parquet in
#            Python into $WORK/mlbench_export/<task>_<lang>.jsonl (what the YAMLs in
#            lm_eval_tasks/ read), and checks those strings against `mlbench tasks render`
#   lm_eval  lm_eval --model hf ... --log_samples on those files (target_delimiter ""), on a linked
#            view of MODEL with a tokenizer_config.json (eval_compare.py hf-folder)
#   mlbench  mlbench eval on the same task/language/limit
#   compare  eval_compare.py compare: request strings, prompt hashes, per-example log-likelihoods,
#            predictions and accuracies (acc, acc_norm, acc_bytes); exit 1 unless within 0.5 pt
#
# Environment: MODEL (HF folder), PY (python with torch+transformers+lm_eval), MLBENCH (binary),
# XCOPA_LANG (sw), XCOPA_LIMIT (500), SIB_LANGS (eng_Latn,swh_Latn), SIB_LIMIT (all = 204),
# LM_BATCH (8), MB_BATCH (16), WORK (a fresh temp folder), CHECK_RENDER (examples per file compared
# with `mlbench tasks render`; 0 = all, default 50), THREADS (if set: RAYON/OMP/torch threads).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
MODEL=${MODEL:-$REPO/models/smollm2-135m}
MODEL=$(cd "$MODEL" && pwd)
PY=${PY:-/work/venv-peers/bin/python}
MLBENCH=${MLBENCH:-$REPO/target/release/mlbench}
XCOPA_LANG=${XCOPA_LANG:-sw}
XCOPA_LIMIT=${XCOPA_LIMIT:-500}
SIB_LANGS=${SIB_LANGS:-eng_Latn,swh_Latn}
SIB_LIMIT=${SIB_LIMIT:-}
LM_BATCH=${LM_BATCH:-8}
MB_BATCH=${MB_BATCH:-16}
CHECK_RENDER=${CHECK_RENDER:-50}
STEPS=${STEPS:-export lm_eval mlbench compare}
WORK=${WORK:-$(mktemp -d /tmp/mlbench-eval-parity.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
CMP="$PY $REPO/benchmarks/perf/eval_compare.py"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$WORK/hf_datasets"
if [[ -n "${THREADS:-}" ]]; then
  export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
fi
echo "model=$MODEL work=$WORK"

units=("xcopa_$XCOPA_LANG")
IFS=, read -ra sl <<<"$SIB_LANGS"
for l in "${sl[@]}"; do units+=("sib200_$l"); done

# A task file per unit: the shipped one, or one derived from the xcopa_sw file for a new language
# (lm_eval honours one --include_path, so all of them are copied into one folder).
TASKDIR=$WORK/lm_eval_tasks
rm -rf "$TASKDIR" && mkdir -p "$TASKDIR"
lm_tasks=()
for u in "${units[@]}"; do
  if [[ -f "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_$u.yaml" ]]; then
    cp "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_$u.yaml" "$TASKDIR/"
  else
    sed "s/xcopa_sw/$u/g; s/for xcopa /for ${u%%_*} /" "$REPO/benchmarks/perf/lm_eval_tasks/mlbench_xcopa_sw.yaml" >"$TASKDIR/mlbench_$u.yaml"
  fi
  lm_tasks+=("mlbench_$u")
done
lm_task_list=$(IFS=,; echo "${lm_tasks[*]}")

has() { [[ " $STEPS " == *" $1 "* ]]; }

if has export; then
  rm -rf "$WORK/mlbench_export"
  $CMP export --out "$WORK/mlbench_export" --task xcopa --langs "$XCOPA_LANG" --limit "$XCOPA_LIMIT"
  $CMP export --out "$WORK/mlbench_export" --task sib200 --langs "$SIB_LANGS" ${SIB_LIMIT:+--limit "$SIB_LIMIT"}
  $CMP check-render --mlbench "$MLBENCH" --export "$WORK/mlbench_export" --max "$CHECK_RENDER"
fi

if has lm_eval; then
  rm -rf "$WORK/lm_eval_out" "$WORK/hf_model"
  # mlbench-imported folders lack tokenizer_config.json and (Gemma) the BOS post-processor:
  # lm-eval gets a linked view of the folder with both (see eval_compare.py hf-folder).
  $CMP hf-folder --model "$MODEL" --out "$WORK/hf_model" --check
  (cd "$WORK" && /usr/bin/time -f "wall=%e\nmaxrss_kb=%M" -o "$WORK/lm_eval.time" \
    "$PY" -m lm_eval run --model hf --model_args "pretrained=$WORK/hf_model,dtype=float32" --device cpu \
      --batch_size "$LM_BATCH" --include_path "$TASKDIR" \
      --tasks "$lm_task_list" --log_samples --output_path "$WORK/lm_eval_out" 2>&1 | tee "$WORK/lm_eval.log" | grep -v "it/s\]$" | tail -n 25)
  cat "$WORK/lm_eval.time"
fi

if has mlbench; then
  rm -rf "$WORK/mb_xcopa" "$WORK/mb_sib200"
  "$MLBENCH" --quiet eval --model "$MODEL" --task xcopa --langs "$XCOPA_LANG" --limit "$XCOPA_LIMIT" \
    --batch-size "$MB_BATCH" --out "$WORK/mb_xcopa"
  "$MLBENCH" --quiet eval --model "$MODEL" --task sib200 --langs "$SIB_LANGS" ${SIB_LIMIT:+--limit "$SIB_LIMIT"} \
    --batch-size "$MB_BATCH" --out "$WORK/mb_sib200"
  cat "$WORK/mb_xcopa/metrics.md" "$WORK/mb_sib200/metrics.md"
fi

if has compare; then
  $CMP compare --export "$WORK/mlbench_export" --lm-eval-out "$WORK/lm_eval_out" \
    --mlbench-out "$WORK/mb_xcopa" "$WORK/mb_sib200" --json "$WORK/parity.json"
fi
