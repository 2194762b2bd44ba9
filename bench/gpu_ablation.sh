#!/usr/bin/env bash
# The ablation on a lent GPU machine (see ../.library/device): the scaled data and tqdm travel with the
# checkout (`carry`: bench/data_small from bench/make_small_data.py, bench/gpu_vendor from
# `pip install --target bench/gpu_vendor tqdm`); the machine's own PyTorch runs the code from src/.
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
timeout "$LIMIT" python bench/ablation.py --data bench/data_small --fresh --steps "${STEPS:-2000}" --jobs 12 --threads 1 --seeds 0 \
  --variants default,residual_map,large_regions,opaque,paste_only,no_noise,no_crack,with_shading,no_adversarial_loss,no_coord_channels,paper,no_hard_augmentation,square_resize \
  --out "$OUT/ablation_s0" > "$OUT/s0.log" 2>&1 &
A=$!
timeout "$LIMIT" python bench/ablation.py --data bench/data_small --fresh --steps "${STEPS:-2000}" --jobs 3 --threads 1 --seeds 1 \
  --variants default,residual_map,large_regions --out "$OUT/ablation_s1" > "$OUT/s1.log" 2>&1 &
B=$!
wait $A $B
pkill -f "bench/ablation.py" 2>/dev/null  # children of a timed-out parent
kill $SMI 2>/dev/null
tail -n 60 "$OUT"/s0.log "$OUT"/s1.log
