#!/usr/bin/env bash
# Puts the CuTe/CUTLASS headers of the pinned nvidia-cutlass package into .deps/cutlass/include
# (ignored by git). Uses a wheel already in .deps/ when there is one (the GPU machine has no
# network: carry .deps there), else downloads it from PyPI.
set -euo pipefail
version=4.2.0.0
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$root/.deps
dest=$deps/cutlass
[ -f "$dest/include/cute/tensor.hpp" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$version" ] && exit 0
mkdir -p "$deps"
wheel=$(ls "$deps"/nvidia_cutlass-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "fetching nvidia-cutlass==$version (CuTe headers)"
  python3 -m pip download --quiet --no-deps "nvidia-cutlass==$version" -d "$deps"
  wheel=$(ls "$deps"/nvidia_cutlass-"$version"-*.whl | head -n 1)
fi
rm -rf "$dest" "$deps/unpack"
mkdir -p "$deps/unpack"
python3 - "$wheel" "$deps/unpack" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")])
PY
mkdir -p "$dest"
mv "$deps/unpack/cutlass_library/source/include" "$dest/include"
rm -rf "$deps/unpack"
echo "$version" > "$dest/VERSION"
