#!/usr/bin/env bash
# A/B of two builds in one call on the GPU machine (no network there): the Python package built
# from a base tree and from the work tree, each into its own directory, then bench/sweep.py run
# for each in alternation (base, head, base, head, ...: a drift of the card shows as a side's
# spread, not as a difference between the sides), bench/ab.py's table last. The base tree comes
# as a tarball made on this machine, where git has the history (the device copy's git metadata
# may be stale), in a carried ignored folder:
#
#   git archive main -o .device/base.tar            # then, on the GPU machine (carry .deps, .device):
#   scripts/ab_check.sh .device/base.tar [--runs N] [--sweep "SWEEP ARGS"] [--peers IMPLS]
#                                        [--topk CASES] [--head-flags FLAGS] [--head-env VARS]
#                                        [--instances LIST] [--tests "PYTEST ARGS"] [--smoke]
#
# Default sweep: issue #14's dense D = 128 bars at 16K (causal and full), its block-selection
# bars and the softcap group, ours alone (a few workloads a run, meant to let two runs a side and
# the builds fit one 10-minute call; not yet timed on a card); --peers IMPLS (e.g. sdpa_cudnn,flex) adds those peers to the
# first head run (Flex compiles for a minute or more there);
# --topk CASES adds bench/sweep.py's topk group with those cases (e.g. row16k: per-row top-k, the
# dK/dV groups' workload), whose workloads run every implementation in every run. --runs N: runs
# per side (default 2). --head-flags FLAGS: extra nvcc flags for the head's build alone (CMake's
# CUDAFLAGS), e.g. "-DFSA_SM90_SOFTMAX_PIN=2" for an experiment compiled in behind a macro,
# against `git archive HEAD` as the base. --head-env "VAR=VALUE ...": environment for the head's
# sweep runs alone, e.g. "FSA_CUDA_FINITE_PASSES=0" to measure a switch in the same code (against
# `git archive HEAD`: still two builds, the same sources). Each sweep run is time-boxed
# (FSA_AB_RUN_S, default 240 s) so that the table still comes back from a call cut short.
# Given more than once, --head-flags builds one head per value (head1, head2, ...: the work tree
# each time, with that value's flags; "" for none), all in one call against one base: the sweep
# runs alternate base, head1, head2, ..., each head's first run adds the peers, and the table
# is one per head against the base.
# --instances LIST: both sides build only those kernel instances (CMake's FSA_CUDA_INSTANCES, e.g.
# "64_bf16"), for a sweep that runs no other head dim or dtype.
# --tests "PYTEST ARGS": after the table, pytest over each head's build (not the base's), with
# those arguments as typed after `pytest` (paths from the repository's root; quote a -k
# expression inside them), each time-boxed (FSA_AB_TEST_S, default 300 s), its last line added to
# the table: the tests of an experiment in the call that measures it. A test that depends on an
# experiment asks the build (flash_sparse_attn._C.cuda_kernel_experiments()).
# --smoke: tiny shapes on the CPU backend (no CUDA build), to check this script anywhere. Logs
# and JSONs go to $OUT as ab.tar.gz, the table to $OUT/ab.txt too.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
usage="usage: scripts/ab_check.sh BASE.tar [--runs N] [--sweep ARGS] [--peers IMPLS] [--topk CASES]"
usage+=" [--head-flags FLAGS] [--head-env VARS] [--instances LIST] [--tests ARGS] [--smoke]"
OUT=${OUT:-/tmp/fsa_ab_out}
mkdir -p "$OUT"
base_tar=${1:?$usage}
shift
[ -f "$base_tar" ] || { echo "no such tarball: $base_tar (git archive BASE -o $base_tar)" >&2; exit 2; }
runs=2
sweep="--only dense,selection_bars,softcap"
sweep+=" --filter ^(dense/(causal|full)/D128/S16384|trainable/|softcap/) --reps 10"
peers=""
topk=""
head_flag_list=()
head_env=""
instances=""
tests=""
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=${2:?--runs needs a count}; shift ;;
    --sweep) sweep=${2:?--sweep needs bench/sweep.py arguments}; shift ;;
    --peers) peers=${2:?--peers needs implementation ids, e.g. sdpa_cudnn,flex}; shift ;;
    --topk) topk=${2:?--topk needs topk cases, e.g. row16k}; shift ;;
    --head-flags) [ $# -ge 2 ] || { echo "--head-flags needs nvcc flags (\"\" for none)" >&2
                                    exit 2; }
                  head_flag_list+=("$2"); shift ;;
    --head-env) head_env=${2:?--head-env needs VAR=VALUE assignments}; shift ;;
    --instances) instances=${2:?--instances needs kernel instances, e.g. 64_bf16}; shift ;;
    --tests) tests=${2:?--tests needs pytest arguments, e.g. tests/gpu/test_cuda_forward.py}; shift ;;
    --smoke) smoke=1 ;;
    *) echo "unknown argument $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
case "$runs" in ''|*[!0-9]*|0) echo "--runs: expected a positive integer, got $runs" >&2; exit 2 ;; esac
run_s=${FSA_AB_RUN_S:-240}
test_s=${FSA_AB_TEST_S:-300}
# The heads: one ("head") unless --head-flags came more than once (head1, head2, ...).
heads=()
if [ ${#head_flag_list[@]} -le 1 ]; then
  heads=(head)
  [ ${#head_flag_list[@]} -eq 0 ] && head_flag_list=("")
else
  for k in $(seq 1 ${#head_flag_list[@]}); do heads+=("head$k"); done
fi
head_flags_of() {  # the flags of head number $1 (0-based)
  echo "${head_flag_list[$1]}"
}
step() { echo "== $1 ($(date +%T))"; }

work=$PWD/build-ab
rm -rf "$work/base-src" "$work/base-site" "$work"/head*-site
mkdir -p "$work/base-src"
tar -xf "$base_tar" -C "$work/base-src" || { echo "cannot extract $base_tar" >&2; exit 2; }
# The base tree builds from the work tree's dependencies (the CuTe headers, carried: no network
# on the GPU machine).
[ -d .deps ] && ln -sfn "$PWD/.deps" "$work/base-src/.deps"
if [ $smoke = 1 ]; then
  export FSA_ENABLE_CUDA=OFF
  sweep="--smoke --device cpu --only dense --filter ^dense/causal/D64/"
  peers=""
  topk=""
else
  export SKBUILD_CMAKE_DEFINE="FSA_CUDA_ARCHS=90a"
fi

# Each side into its own --target directory (its own build directory, configured afresh, so
# nothing is shared and CUDAFLAGS is read).
build() {
  rm -rf "$work/$1-build"
  CUDAFLAGS="$3" SKBUILD_BUILD_DIR="$work/$1-build" python3 -m pip install --no-build-isolation \
    --no-deps -q ${instances:+-C "cmake.define.FSA_CUDA_INSTANCES=$instances"} \
    --target "$work/$1-site" "$2" > "$OUT/pip_$1.log" 2>&1
}
pids=()
step "build base ($base_tar)"
build base "$work/base-src" "${CUDAFLAGS:-}" & pids+=($!)
for k in "${!heads[@]}"; do
  flags=$(head_flags_of "$k")
  step "build ${heads[$k]} (work tree${flags:+, CUDAFLAGS=$flags})"
  build "${heads[$k]}" "$PWD" "${CUDAFLAGS:-}${flags:+ $flags}" & pids+=($!)
done
failed=""
sides=(base "${heads[@]}")
for k in "${!pids[@]}"; do wait "${pids[$k]}" || failed+=" ${sides[$k]}"; done
if [ -n "$failed" ]; then
  for side in $failed; do tail -n 30 "$OUT/pip_$side.log"; done
  echo "BUILD FAILED ($failed )"
  exit 1
fi
# Each head's flags reached its CUDA compiles (CMake reads CUDAFLAGS at a build directory's
# first configure only).
for k in "${!heads[@]}"; do
  flags=$(head_flags_of "$k")
  if [ -n "$flags" ] && [ $smoke = 0 ] &&
     ! grep -q -F -- "$flags" "$work/${heads[$k]}-build/CMakeCache.txt"; then
    echo "--head-flags: '$flags' not in $work/${heads[$k]}-build/CMakeCache.txt" \
         "(CMAKE_CUDA_FLAGS)" >&2
    exit 1
  fi
done

# One sweep run of a side: its package first on the path; a head's first run adds the peers
# (FlexAttention compiles in every process: once a head is enough for the ratios).
sweep_run() {
  local side=$1 i=$2 impls=ours env_vars=()
  [ "$side" != base ] && [ "$i" = 1 ] && [ -n "$peers" ] && impls="ours,$peers"
  # shellcheck disable=SC2206
  [ "$side" != base ] && [ -n "$head_env" ] && env_vars=($head_env)
  # shellcheck disable=SC2086
  env "${env_vars[@]}" PYTHONPATH="$work/$side-site" PYTHONUNBUFFERED=1 timeout "$run_s" \
    python3 bench/sweep.py $sweep --impls "$impls" --json "$OUT/${side}_$i.json" \
    > "$OUT/${side}_$i.log" 2>&1
  if [ -n "$topk" ]; then
    env "${env_vars[@]}" PYTHONPATH="$work/$side-site" PYTHONUNBUFFERED=1 timeout "$run_s" \
      python3 bench/sweep.py --only topk --topk-cases "$topk" --json "$OUT/${side}_$i.json" \
      --resume >> "$OUT/${side}_$i.log" 2>&1
  fi
  # The module each run imported, so that a run can never silently measure the other side.
  PYTHONPATH="$work/$side-site" python3 -c \
    "import flash_sparse_attn as m; print('$side run $i:', m.__file__)" >> "$OUT/${side}_$i.log"
}
for i in $(seq 1 "$runs"); do
  for side in "${sides[@]}"; do
    step "sweep: $side run $i"
    sweep_run "$side" "$i"
    tail -n 1 "$OUT/${side}_$i.log"
  done
done

step "table"
: > "$OUT/ab.txt"
status=0
for k in "${!heads[@]}"; do
  side=${heads[$k]}
  bases=() head_runs=()
  for i in $(seq 1 "$runs"); do
    [ -f "$OUT/base_$i.json" ] && bases+=("$OUT/base_$i.json")
    [ -f "$OUT/${side}_$i.json" ] && head_runs+=("$OUT/${side}_$i.json")
  done
  flags=$(head_flags_of "$k")
  [ ${#heads[@]} -gt 1 ] && echo "== $side: CUDAFLAGS ${flags:-(none)}" | tee -a "$OUT/ab.txt"
  if [ ${#bases[@]} -gt 0 ] && [ ${#head_runs[@]} -gt 0 ]; then
    python3 bench/ab.py --base "${bases[@]}" --head "${head_runs[@]}" | tee -a "$OUT/ab.txt" ||
      status=1
  else
    echo "no sweep results on base or $side (see the logs)" | tee -a "$OUT/ab.txt"
    status=1
  fi
done
# Each head's tests over its own build (its package first on the path), after the table, so that a
# call cut short in them still brings the table back.
if [ -n "$tests" ]; then
  for side in "${heads[@]}"; do
    step "tests: $side"
    # $tests is pytest's arguments as typed, quoting included: eval'd. python3 -P: the work tree
    # (the current directory) is not put on the path, so the build's package is the one imported,
    # and the log's first line says so.
    PYTHONPATH="$work/$side-site" python3 -P -c \
      "import flash_sparse_attn as m; print('tests over $side import', m.__file__)" \
      > "$OUT/tests_$side.log" 2>&1
    (eval "PYTHONPATH=\"$work/$side-site\" PYTHONUNBUFFERED=1 timeout $test_s" \
       "python3 -P -m pytest -q -p no:cacheprovider $tests") >> "$OUT/tests_$side.log" 2>&1
    rc=$?
    echo "tests over $side (rc $rc): $(tail -n 1 "$OUT/tests_$side.log")" | tee -a "$OUT/ab.txt"
    [ $rc = 0 ] || status=1
  done
fi
# The device tool brings back at most 8 files: everything but the table travels as one archive.
(cd "$OUT" && tar -czf ab.tar.gz --exclude=ab.tar.gz --exclude=ab.txt -- *.log *.json 2>/dev/null \
   && find . -maxdepth 1 -type f \( -name "*.log" -o -name "*.json" -o -name "*.tmp" \) -delete)
echo "logs: $OUT/ab.tar.gz"
exit $status
