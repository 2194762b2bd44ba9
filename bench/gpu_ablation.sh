#!/usr/bin/env bash
# The ablation on a lent GPU machine (see ../.library/device): the scaled data and tqdm travel with the
# checkout (`carry`: bench/data_small from bench/make_small_data.py, bench/gpu_vendor from
# `pip install --target bench/gpu_vendor tqdm`); the machine's own PyTorch runs the code from src/.
# Variants were named against the fast profile of that day (lambda_adv 0.1, region_max 0.08).
# ROUND=1 (default) or ROUND=2 picks the runs (about 8 and 4 minutes on one H100, 2000 steps each).
# Results go to $OUT (default bench/gpu_out) after every run, so a run cut short keeps what it finished.
set -u
OUT=${OUT:-bench/gpu_out}
LIMIT=${LIMIT:-520}
mkdir -p "$OUT"
export PYTHONPATH=src:bench/gpu_vendor ABLATION_SIGMAS=0,2
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
python -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())" >> "$OUT/gpu.txt" 2>&1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 20 > "$OUT/smi.csv" 2>&1 &
SMI=$!
PIDS=()
ABL="python bench/ablation.py --data bench/data_small --fresh --steps ${STEPS:-2000} --threads 1"
if [ "${ROUND:-1}" = 1 ]; then  # every variant once (seed 0), and a second seed of three
  timeout "$LIMIT" $ABL --jobs 12 --seeds 0 --out "$OUT/ablation_s0" --variants \
    default,residual_map,large_regions,opaque,paste_only,no_noise,no_crack,with_shading,no_adversarial_loss,no_coord_channels,paper,no_hard_augmentation,square_resize \
    > "$OUT/s0.log" 2>&1 & PIDS+=($!)
  timeout "$LIMIT" $ABL --jobs 3 --seeds 1 --variants default,residual_map,large_regions --out "$OUT/ablation_s1" \
    > "$OUT/s1.log" 2>&1 & PIDS+=($!)
else  # round 2 (what round 1 left out, on the two smaller categories)
  ABL="$ABL --only bottle,commutator"
  timeout "$LIMIT" $ABL --jobs 4 --seeds 1,2 --variants large_regions --out "$OUT/r2a" > "$OUT/a.log" 2>&1 & PIDS+=($!)
  timeout "$LIMIT" $ABL --jobs 2 --seeds 2 --variants default --out "$OUT/r2b" > "$OUT/b.log" 2>&1 & PIDS+=($!)
  timeout "$LIMIT" $ABL --jobs 6 --seeds 0 --variants with_shading,no_adversarial_loss,paper --out "$OUT/r2c" \
    > "$OUT/c.log" 2>&1 & PIDS+=($!)
fi
wait "${PIDS[@]}"  # not the nvidia-smi logger, which never ends
pkill -f "bench/ablation.py" 2>/dev/null  # children of a timed-out parent
kill $SMI 2>/dev/null
tail -n 60 "$OUT"/*.log
