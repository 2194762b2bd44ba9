#!/usr/bin/env bash
# The ablation on a lent GPU machine (see ../.library/device): the scaled data and tqdm travel with the
# checkout (`carry`: bench/data_small from `python bench/make_small_data.py --short 256 --jpeg 92`, and
# bench/gpu_vendor from `pip install --target bench/gpu_vendor tqdm`); the machine's own PyTorch runs src/.
#
#   bash bench/gpu_ablation.sh "3000 9 0,1,2 default,constant_lr" "4000 6 0,1 default" \
#       "2000 1 0 default commutator"
#
# Each argument is one group run beside the others: steps (they replace the profile's), jobs, seeds,
# variants[, categories]. The 2026-11-27 groups are in bench/ablation.md's command list. One CPU
# core per run, so the jobs of all groups together should not exceed the machine's cores.
# Every group stops after LIMIT seconds (default 520); each finished run is in its results file at once,
# so a group cut short keeps what it finished. The results (g1.json, g2.json, ...) and one log (log.txt)
# are copied to $OUT (default bench/gpu_out).
set -u
[ $# -gt 0 ] || { echo "usage: bash bench/gpu_ablation.sh \"STEPS JOBS SEEDS VARIANTS [CATEGORIES]\" ..." >&2; exit 2; }
for group in "$@"; do  # every group is checked before any starts
  read -r steps jobs seeds variants categories <<< "$group"
  [[ "$steps" =~ ^[0-9]+$ && "$jobs" =~ ^[0-9]+$ && -n "${variants:-}" ]] || {
    echo "group '$group': expected STEPS JOBS SEEDS VARIANTS [CATEGORIES], e.g. \"2000 9 0,1,2 default\"" >&2; exit 2; }
done
OUT=${OUT:-bench/gpu_out}
LIMIT=${LIMIT:-520}
WORK=bench/gpu_runs
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
export PYTHONPATH=src:bench/gpu_vendor ABLATION_SIGMAS=${ABLATION_SIGMAS:-}
{ nvidia-smi -L; python -c "import sys, torch; print(sys.version, torch.__version__, torch.cuda.is_available())"
} > "$WORK/gpu.txt" 2>&1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > "$WORK/smi.csv" 2>&1 &
SMI=$!
PIDS=()
i=0
for group in "$@"; do
  i=$((i + 1))
  read -r steps jobs seeds variants categories <<< "$group"
  timeout "$LIMIT" python bench/ablation.py --data bench/data_small --fresh --threads 1 --steps "$steps" \
    --jobs "$jobs" --seeds "$seeds" --variants "$variants" ${categories:+--only "$categories"} \
    --out "$WORK/g$i" > "$WORK/g$i.log" 2>&1 & PIDS+=($!)
done
wait "${PIDS[@]}"  # not the nvidia-smi logger, which never ends
pkill -f "bench/ablation.py" 2>/dev/null  # children of a timed-out parent
kill $SMI 2>/dev/null
cp "$WORK"/g*.json "$OUT"/ 2>/dev/null
for f in "$WORK"/gpu.txt "$WORK"/g*.log "$WORK"/smi.csv; do echo "== $f"; cat "$f"; done > "$OUT/log.txt"
tail -n 40 "$WORK"/g*.log
