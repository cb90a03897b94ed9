#!/usr/bin/env bash
# One call on a GPU machine: build mirai._C for this GPU, run the CUDA-marked tests there, then the kernel
# benchmarks and the step benchmark. Logs go to $OUT (or ./gpu_out).
# Usage: bash benchmarks/gpu_check.sh [tests|bench|step|all]; FORESIGHT_ARGS and STEP_ARGS pass flags to
# bench_foresight.py and bench_step.py (word-split: write a variant as --variant=--ce-backend=torch).
#
# What is still unmeasured (the fused foresight loss and the training step) fits three calls of at most 10 minutes on one machine:
#   1. bash benchmarks/gpu_check.sh tests && FORESIGHT_ARGS="--plans auto,1x4096,3x8192,budget=90" \
#      bash benchmarks/gpu_check.sh bench                                 (CUDA tests, then the kernel benchmarks)
#   2. STEP_ARGS="--backend single --models GPT-B --modes baseline,mirai_e,mirai_i,mirai_i_online
#      --variant=--fuse-ema --variant=--ce-backend=torch" STEP_TIMEOUT=540 bash benchmarks/gpu_check.sh step
#   3. STEP_ARGS="--backend single --models GPT-XXL --modes baseline,mirai_e --variant=--fuse-ema
#      --point-timeout 200" STEP_TIMEOUT=540 bash benchmarks/gpu_check.sh step
set -u
what=${1:-all}
out=${OUT:-gpu_out}; mkdir -p "$out"
# On the H100 machines lent here the default compiler (/opt/gcc/bin/g++, a wrapper) builds an extension whose
# C++ exceptions (TORCH_CHECK) crash the process; the system g++ (the one torch was built with) does not.
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
if ! python3 -c "import mirai._ext as e, sys; sys.exit(0 if e.has_cuda() else 1)" 2>/dev/null; then
  start=$(date +%s)
  python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
python3 -c "import mirai._ext as e; print(e.describe())"
if [ "$what" = tests ] || [ "$what" = all ]; then
  # -v and faulthandler so a crash names its test; one process per file so one crash does not hide the rest
  for f in tests/test_ema.py tests/test_adamw_ema.py tests/test_foresight_fused.py tests/test_gpt.py tests/test_linear_ce.py \
           tests/test_train.py; do
    timeout 200 python3 -X faulthandler -m pytest "$f" -m cuda -v -p no:cacheprovider >> "$out/cuda_tests.log" 2>&1
    echo "cuda tests $f: rc=$? $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$out/cuda_tests.log" | tail -1)"
  done
  grep -E "PASSED|FAILED|ERROR|Fatal|Segmentation" "$out/cuda_tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 300 python3 benchmarks/bench_foresight.py ${FORESIGHT_ARGS:-} > "$out/bench_foresight.log" 2>&1
  echo "bench_foresight rc=$?"; tail -30 "$out/bench_foresight.log"
  timeout 200 python3 benchmarks/bench_optim.py > "$out/bench_optim.log" 2>&1; echo "bench_optim rc=$?"
  tail -12 "$out/bench_optim.log"
  timeout 200 python3 benchmarks/bench_linear_ce.py > "$out/bench_linear_ce.log" 2>&1; echo "bench_linear_ce rc=$?"
  tail -10 "$out/bench_linear_ce.log"
  cp benchmarks/results/foresight.jsonl benchmarks/results/optim.jsonl benchmarks/results/linear_ce.jsonl "$out/" \
    2>/dev/null
fi
if [ "$what" = step ] || [ "$what" = all ]; then
  timeout ${STEP_TIMEOUT:-420} python3 benchmarks/bench_step.py ${STEP_ARGS:-} > "$out/bench_step.log" 2>&1; echo "bench_step rc=$?"
  tail -30 "$out/bench_step.log"
  cp benchmarks/results/step.jsonl "$out/" 2>/dev/null
fi
