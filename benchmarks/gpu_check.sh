#!/usr/bin/env bash
# The GPU checks as one run on a CUDA machine: the tests marked `gpu`, then benchmarks/gpu_stats.py.
#
#     bash benchmarks/gpu_check.sh [LOG_DIR]        # PYTHON=... to choose the interpreter (default python3)
#
# Each step has its own time limit, so that a hung step cannot take the other's time. The logs and
# the benchmark's results (stats_gpu.json, stats_gpu.md) are copied to LOG_DIR (default
# benchmarks/results). Exits non-zero when either step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-benchmarks/results}
python=${PYTHON:-python3}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  "$python" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
} | tee "$log_dir/gpu_environment.log"

timeout 200 "$python" -m pytest -m gpu -p no:cacheprovider -rA tests 2>&1 | tee "$log_dir/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 330 "$python" benchmarks/gpu_stats.py 2>&1 | tee "$log_dir/gpu_benchmark.log"
bench_rc=${PIPESTATUS[0]}
if [ "$log_dir" != benchmarks/results ]; then
  cp benchmarks/results/stats_gpu.json benchmarks/results/stats_gpu.md "$log_dir"/ 2>/dev/null
fi

echo "gpu tests: exit $tests_rc; gpu benchmark: exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
