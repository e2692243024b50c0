#!/usr/bin/env bash
# The several-GPU runs of benchmarks/GPU_RESULTS.md: one GPU against all GPUs of the host,
# causal, H = 32, d = 128, at 262144 and 1048576 tokens. Usage: bash benchmarks/dist_runs.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=$(nvidia-smi -L | wc -l)
for n in 262144 1048576; do
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/dist_bench.py --single --seq-len $n 2>&1 | grep '^{' | tee -a "$OUT/dist.jsonl"
  torchrun --nproc_per_node=$W benchmarks/dist_bench.py --seq-len $n 2>&1 | grep '^{' | tee -a "$OUT/dist.jsonl"
done
