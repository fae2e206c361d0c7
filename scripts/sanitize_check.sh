#!/usr/bin/env bash
# The C++ core and the CPU backend under AddressSanitizer and UndefinedBehaviorSanitizer (no CUDA;
# the CUDA kernels have compute-sanitizer in scripts/gpu_check.sh). CI runs the default.
#
#   scripts/sanitize_check.sh [--all] [--fuzz-calls N] [--python]
#
# Default: the C++ suite without the SPEC grid's large cases (CPU/SpecCase*: minutes each under
# the sanitizers, mostly in the fp64 reference), then the malformed-input fuzz for N calls of
# another seed (default 100000; the suite's own run is 4000). Any report fails the run: undefined
# behavior aborts (-fno-sanitize-recover), and leaks are reported at exit.
# --all: the whole C++ suite (about ten minutes on two cores).
# --python: also the Python tests over an extension built with the sanitizers (the runtime
# preloaded into .venv's Python; leak checks off, as torch and CPython keep their memory to the end;
# about eight minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
all=0
python=0
fuzz_calls=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --all) all=1 ;;
    --python) python=1 ;;
    --fuzz-calls) fuzz_calls=${2:?--fuzz-calls needs a count}; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
configure() {  # configure BUILD_DIR [CMAKE ARGS...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFSA_ENABLE_CUDA=OFF \
    -DFSA_WARNINGS_AS_ERRORS=ON -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
    -DCMAKE_SHARED_LINKER_FLAGS="$flags" -DCMAKE_MODULE_LINKER_FLAGS="$flags" "$@"
}
export UBSAN_OPTIONS=print_stacktrace=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
start=$(date +%s)
status=0

build="build-sanitize"
echo "sanitize_check: building the C++ tests with $flags ($build/build.log)"
mkdir -p "$build"
if ! { configure "$build" -DFSA_BUILD_BENCH=OFF -DFSA_BUILD_EXAMPLES=OFF &&
       cmake --build "$build" -j "${JOBS:-2}" --target fsa_tests; } > "$build/build.log" 2>&1; then
  tail -n 40 "$build/build.log"
  echo "sanitize_check: the build failed" >&2
  exit 1
fi

exclude=()
[ $all = 1 ] || exclude=(-E '^CPU/SpecCase\.')
echo "sanitize_check: the C++ suite$([ $all = 1 ] || echo " without CPU/SpecCase.*")"
ctest --test-dir "$build" --output-on-failure -j "${JOBS:-2}" "${exclude[@]}" || status=1

echo "sanitize_check: the malformed-input fuzz, $fuzz_calls calls"
FSA_FUZZ_CALLS=$fuzz_calls FSA_FUZZ_SEED=${FSA_FUZZ_SEED:-0x5a1} \
  "$build/fsa_tests" --gtest_filter='MalformedInputFuzz.*' --gtest_brief=1 || status=1

if [ $python = 1 ]; then
  pybuild="build-sanitize-py"
  echo "sanitize_check: building the Python extension with the sanitizers ($pybuild/build.log)"
  bash scripts/python_env.sh --deps-only || exit 1
  mkdir -p "$pybuild"
  if ! { configure "$pybuild" -DFSA_BUILD_PYTHON=ON -DFSA_BUILD_TESTS=OFF -DFSA_BUILD_BENCH=OFF \
           -DFSA_BUILD_EXAMPLES=OFF -DPython_EXECUTABLE="$PWD/.venv/bin/python" &&
         cmake --build "$pybuild" -j "${JOBS:-2}"; } > "$pybuild/build.log" 2>&1; then
    tail -n 40 "$pybuild/build.log"
    echo "sanitize_check: the extension's build failed" >&2
    exit 1
  fi
  # The package as the tests import it: its Python files and the sanitized extension.
  rm -rf "$pybuild/site" && mkdir -p "$pybuild/site"
  cp -r python/flash_sparse_attn "$pybuild/site/"
  find "$pybuild/python" -maxdepth 1 -name '_C*.so' \
    -exec cp {} "$pybuild/site/flash_sparse_attn/" \;
  cxx=${CXX:-c++}
  runtime="$($cxx -print-file-name=libasan.so):$($cxx -print-file-name=libubsan.so)"
  echo "sanitize_check: the Python tests (LD_PRELOAD=$runtime)"
  LD_PRELOAD=$runtime ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$PWD/$pybuild/site" \
    .venv/bin/python -P -m pytest -q -p no:cacheprovider tests/python || status=1
fi

verdict=$([ $status = 0 ] && echo clean || echo FAILED)
echo "sanitize_check: $verdict in $(( $(date +%s) - start )) s"
exit $status
