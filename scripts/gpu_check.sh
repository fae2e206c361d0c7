#!/usr/bin/env bash
# One call on the GPU machine (no network there): build the CUDA backend, check it against the CPU
# backend, run compute-sanitizer memcheck on the checks, run the benchmarks; short table last.
# Logs go to $OUT as logs.tar.gz (the device tool brings it back). Needs .deps/nvidia_cutlass-*.whl
# carried.
#
#   scripts/gpu_check.sh [--no-sanitizer] [--no-python] [--peers GROUPS] [--reps N]
#                        [--sweep "SWEEP ARGS"] [--sweep-resume FILE] [--archs ARCHS]
#
# --archs: the C++ build's CUDA architectures (default "80;90a"; "90a" compiles each kernel once,
# and an H200 runs every kernel's sm_90a code then, the sm80 kernels' included).
# The peers step runs bench/sweep.py, writing $OUT/sweep.json. By default: the issue's three bar
# workloads (dense causal (2, 16K, 16, 128), the trainable mask at 16K and 10%, the decode bars)
# with --reps N (default 20). --peers GROUPS (formerly --compare, for bench/compare.py) runs every
# workload of those sweep groups instead (sweep.py --only GROUPS, e.g. topk,varlen), with --reps N;
# --sweep runs bench/sweep.py with exactly those arguments (e.g. "--only dense"; its default
# --reps); --sweep-resume FILE (a sweep.json brought back from an earlier, interrupted call, put in
# the work tree; give the cut call's --peers or --sweep again) continues it, skipping the entries
# it has.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/fsa_gpu_out}
mkdir -p "$OUT"
sanitize=1
python=1
reps=20
peers=""
sweep_args=""
sweep_resume=""
archs="80;90a"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-sanitizer) sanitize=0 ;;
    --no-python) python=0 ;;
    --peers) peers=${2:?--peers needs sweep groups, e.g. --peers topk,varlen}; shift ;;
    --reps) reps=$2; shift ;;
    --sweep) sweep_args=${2:?--sweep needs its arguments, e.g. --sweep \"--only dense\"}; shift ;;
    --sweep-resume) sweep_resume=${2:?--sweep-resume needs a sweep.json path}; shift
      [ -f "$sweep_resume" ] || { echo "--sweep-resume: no such file $sweep_resume" >&2; exit 2; } ;;
    --archs) archs=${2:?--archs needs CUDA architectures, e.g. --archs 90a}; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$peers" ] && [ -n "$sweep_args" ]; then
  echo "--peers and --sweep both choose the sweep's arguments: give one" >&2
  exit 2
fi

status=0
step() { echo "== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/device.txt"

step "build"
build=build-gpu
if ! { cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFSA_BUILD_TESTS=OFF \
         -DFSA_BUILD_EXAMPLES=OFF -DFSA_CUDA_ARCHS="$archs" && \
       cmake --build $build -j 16; } > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
grep -iE "spill|warning" "$OUT/build.log" | grep -v "0 bytes spill" | head -n 20

step "check: CUDA forward vs CPU backend"
./$build/fsa_bench --check 2>&1 | tee "$OUT/check.log" || status=1

if [ $sanitize = 1 ]; then
  step "compute-sanitizer memcheck (checks)"
  compute-sanitizer --tool memcheck --error-exitcode 9 ./$build/fsa_bench --check \
    > "$OUT/memcheck.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/memcheck.log"
  [ $rc -ne 0 ] && { echo "MEMCHECK FAILED (rc $rc)"; status=1; }
fi

step "bench (library alone)"
./$build/fsa_bench --bench --reps "$reps" 2>&1 | tee "$OUT/bench.log" || status=1

if [ $python = 1 ]; then
  step "python package (CUDA build)"
  if ! SKBUILD_CMAKE_DEFINE="FSA_CUDA_ARCHS=90a" SKBUILD_BUILD_DIR=build-gpu-python \
       python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/pip.log" 2>&1; then
    tail -n 30 "$OUT/pip.log"
    echo "PYTHON BUILD FAILED"
    exit 1
  fi
  step "GPU tests: SPEC section 7 forward cases vs float64 torch"
  (cd /tmp && PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider \
      "$OLDPWD/tests/gpu" 2>&1) | tee "$OUT/pytest_gpu.log" | tail -n 25
  if ! grep -qE "[0-9]+ passed" "$OUT/pytest_gpu.log" || grep -qE "[0-9]+ (failed|error)" "$OUT/pytest_gpu.log"; then
    status=1
  fi
  if [ $sanitize = 1 ]; then
    step "compute-sanitizer memcheck (the malformed-input fuzz, the non-finite V tests, per-row top-k over compacted keys, the lean backward passes on CUDA)"
    (cd /tmp && FSA_FUZZ_CALLS=150 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -p no:cacheprovider "$OLDPWD/tests/gpu/test_cuda_fuzz.py" \
        "$OLDPWD/tests/gpu/test_cuda_nonfinite.py" \
        "$OLDPWD/tests/gpu/test_cuda_compaction.py::test_topk_causal_over_compacted_keys_against_float64" \
        "$OLDPWD/tests/gpu/test_cuda_backward.py::test_lean_backward_passes_causal_key_bias" \
        > "$OUT/memcheck_fuzz.log" 2>&1)
    rc=$?
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_fuzz.log" | tail -n 3
    [ $rc -ne 0 ] && { echo "FUZZ MEMCHECK FAILED (rc $rc)"; status=1; }
  fi
  step "poisoned scratch (FSA_CUDA_SCRATCH_POISON 0x7f and 0xff): the empty-sequence tests"
  # Their plans once left lists unwritten, which passed over a pool of zeros (docs/numerics.md,
  # "Scratch memory"); each byte gets a fresh process (the switch is read once).
  for byte in 0x7f 0xff; do
    (cd /tmp && FSA_CUDA_SCRATCH_POISON=$byte python3 -m pytest -q -p no:cacheprovider \
        "$OLDPWD/tests/gpu/test_cuda_backward.py" -k empty_sequences \
        > "$OUT/poison_$byte.log" 2>&1) \
      || { echo "POISONED SCRATCH $byte FAILED"; status=1; }
    tail -n 1 "$OUT/poison_$byte.log"
  done
  if [ -z "$sweep_args" ]; then
    if [ -n "$peers" ]; then
      sweep_args="--only $peers --reps $reps"
    else
      sweep_args="--only dense,trainable,decode_bars --reps $reps"
      sweep_args+=" --filter ^(dense/causal/D128/S16384|trainable/S16384/d10|decode_bars/)"
    fi
  fi
  step "peers (same process, same card): bench/sweep.py $sweep_args -> $OUT/sweep.json"
  resume=""
  if [ -n "$sweep_resume" ]; then
    cp "$sweep_resume" "$OUT/sweep.json" && resume=--resume
  fi
  # stderr carries the progress bar; the per-entry lines go to sweep.log and the summary
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 python3 bench/sweep.py $sweep_args $resume --json "$OUT/sweep.json" \
    > "$OUT/sweep.log" 2> >(grep -v "^W[0-9]" >&2) || status=1
fi

echo
echo "== summary ($(head -n 2 "$OUT/device.txt" | tail -n 1))"
grep -E "passed, .* failed" "$OUT/check.log"
[ $sanitize = 1 ] && grep -E "ERROR SUMMARY" "$OUT/memcheck.log" "$OUT/memcheck_fuzz.log"
cat "$OUT/bench.log"
if [ $python = 1 ]; then
  tail -n 1 "$OUT/pytest_gpu.log"
  if [ -f "$OUT/sweep.log" ]; then grep -vE "^W[0-9]" "$OUT/sweep.log" | tail -n 60; fi
fi
# The device tool brings back at most 8 files from $OUT (this script writes up to 10): the logs
# travel as one archive, sweep.json beside it.
(cd "$OUT" && tar -czf logs.tar.gz --exclude=logs.tar.gz --exclude=sweep.json -- *.log *.txt \
   2>/dev/null && find . -maxdepth 1 -type f \( -name "*.log" -o -name "*.txt" \) -delete)
echo "logs: $OUT/logs.tar.gz"
exit $status
