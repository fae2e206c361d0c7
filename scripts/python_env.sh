#!/usr/bin/env bash
# Creates (or brings up to date) the ignored virtualenv .venv/ with the pinned Python test
# dependencies, then builds and installs the package `flash_sparse_attn` into it with
# `pip install --no-build-isolation .` (scikit-build-core + nanobind; nothing is fetched during the
# build itself).
#
# Idempotent: a second run with unchanged pins and sources only checks two stamps and returns in
# well under a second. The CMake build tree (build/python-venv) is kept between runs, so a source
# change recompiles only what changed.
#
# Environment:
#   FSA_VENV           where the virtualenv lives (default: <repo>/.venv)
#   PYTHON             interpreter that creates it (default: python3)
#   FSA_ENABLE_CUDA    ON/OFF: build the CUDA backend. Default ON only where a GPU is visible
#                      (nvidia-smi lists one): CI machines have nvcc but no GPU, and compiling the
#                      kernels there would cost minutes for code no test can run.
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default 2)
#
# --deps-only: step 1 alone (the virtualenv and its pinned dependencies, mostly a download), so
# that `make test` can run it while the C++ side builds.
set -euo pipefail
deps_only=0
[[ "${1:-}" == "--deps-only" ]] && deps_only=1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FSA_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
cd "$root"

# Pinned test and build dependencies. torch is the stock Linux wheel from the registry: it runs on
# the CPU without a GPU; its nvidia-* dependencies (about 3 GB) only need to be present for it to
# import (measured here: about 55 s from an empty pip cache, most of it unpacking).
requirements=(
  "torch==2.11.0"
  "numpy==2.2.6"
  "pytest==8.4.2"
  "nanobind==2.9.2"
  "scikit-build-core==0.11.6"
  "transformers==4.57.6"
  # bench/report.py draws docs/plots/*.png from sweep JSON on this (CPU) machine; the GPU machine
  # has no network and the sweep there never imports it.
  "matplotlib==3.11.2"
)

if [[ -z "${FSA_ENABLE_CUDA:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FSA_ENABLE_CUDA=ON
  else
    FSA_ENABLE_CUDA=OFF
  fi
fi
export FSA_ENABLE_CUDA
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

hash_text() { sha256sum | cut -d' ' -f1; }

# ---- 1. the virtualenv and its pinned dependencies -----------------------------------------------
deps_stamp="$venv/.fsa-deps-stamp"
deps_hash="$(printf '%s\n' "${requirements[@]}" "$("$python" -c 'import sys; print(sys.version)')" |
  hash_text)"
if [[ ! -x "$venv/bin/python" || ! -f "$deps_stamp" || "$(cat "$deps_stamp")" != "$deps_hash" ]]; then
  echo "python_env: installing pinned dependencies into $venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
  fi
  # --no-compile: no .pyc for the thousands of modules torch and transformers ship (CPU time on a
  # fresh clone); Python compiles the few it imports.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-compile \
    "${requirements[@]}"
  echo "$deps_hash" >"$deps_stamp"
fi
if [[ $deps_only == 1 ]]; then
  echo "python_env: dependencies in $venv are up to date"
  exit 0
fi

# ---- 2. the package, rebuilt when any input of the build changed -------------------------------
# Inputs: every tracked or untracked (not ignored) file under these paths, plus the CUDA switch.
build_inputs=(CMakeLists.txt cmake include src python pyproject.toml)
pkg_stamp="$venv/.fsa-package-stamp"
pkg_hash="$( (
  echo "cuda=$FSA_ENABLE_CUDA"
  git ls-files -co --exclude-standard -- "${build_inputs[@]}" 2>/dev/null | LC_ALL=C sort |
    while IFS= read -r f; do [[ -f "$f" ]] && sha256sum "$f"; done
) | hash_text)"
installed_ext=("$venv"/lib/python*/site-packages/flash_sparse_attn/_C*.so)
if [[ ! -f "$pkg_stamp" || "$(cat "$pkg_stamp")" != "$pkg_hash" || ! -f "${installed_ext[0]}" ]]; then
  echo "python_env: building and installing flash_sparse_attn (FSA_ENABLE_CUDA=$FSA_ENABLE_CUDA)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-build-isolation \
    --config-settings=build-dir=build/python-venv \
    --config-settings=cmake.define.FSA_ENABLE_CUDA="$FSA_ENABLE_CUDA" .
  echo "$pkg_hash" >"$pkg_stamp"
fi
echo "python_env: $venv is up to date"
