#!/usr/bin/env bash
# One call on the GPU machine: environment, the kernel tests at real shapes, then the benchmark.
# Usage (from the repository root): bash benchmarks/gpu_check.sh [pytest args] -- [nsa bench args]
# Triton's compiled kernels and autotuning choices go to .cache/ (git-ignored). The call leaves them in $OUT as
# cache.tgz.part-aa, -ab, ... (15 MB each, under the file size the device returns), and the autotuning choices
# alone as autotune.tgz (a few KB: with them a kernel compiles only its chosen config, where the whole cache may be
# too large to carry); copy what came back into .cache_parts/ (git-ignored) and carry that folder: the next call
# unpacks it before it starts.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT" .cache
if compgen -G ".cache_parts/cache.tgz.part-*" >/dev/null; then cat .cache_parts/cache.tgz.part-* | tar -xzf -; fi
if [ -f .cache_parts/autotune.tgz ]; then tar -xzf .cache_parts/autotune.tgz; fi
export TRITON_CACHE_DIR=$PWD/.cache/triton TRITON_CACHE_AUTOTUNING=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
pytest_args=(); bench_args=(); seen=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen=1; elif [ $seen = 0 ]; then pytest_args+=("$a"); else bench_args+=("$a"); fi
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
if [ ${#pytest_args[@]} -gt 0 ]; then
  timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -ra -p no:cacheprovider "${pytest_args[@]}" 2>&1 | tee "$OUT/tests.log" | tail -n 60
fi
if [ ${#bench_args[@]} -gt 0 ]; then
  python3 -m nsa.bench "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log" | tail -n 80
fi
find .cache -name "*.autotune.json" | tar -czf "$OUT/autotune.tgz" -T -
tar -czf - .cache | split -b 15M - "$OUT/cache.tgz.part-"
