#!/usr/bin/env bash
# Puts the reference project's Triton kernel into the ignored folder .peers/, where
# bench/sweep.py's `topk` group finds it: flash-sparse-attn 1.2.3 from PyPI (the reference SPEC.md
# describes), file flash_sparse_attn/flash_sparse_attn_triton.py, and its LICENSE. Never committed.
# The GPU machine has no network: run this here, then carry .peers along.
#
#   scripts/fetch_reference.sh        # idempotent: returns at once when the file is there
#
# pip download reads the sdist's metadata, i.e. runs its setup.py, which imports torch and wheel.
# Its build requirements include torch, which --no-binary :all: would try to build from source, so
# it runs without build isolation, in the project's .venv (scripts/python_env.sh; it has torch),
# with `wheel` on PYTHONPATH from a temporary folder and the sdist's CUDA build switched off.
#
# Environment: PYTHON, the interpreter whose pip downloads (default: <repo>/.venv/bin/python).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version=1.2.3
dest="$root/.peers/flash_sparse_attn-$version"
kernel=flash_sparse_attn/flash_sparse_attn_triton.py
# The file of the 1.2.3 sdist (equal to the v1.2.3 tag of its repository): the API the bench calls.
sha256=bcf239559075f829b1a5c9eaad64e806f94887eb6f00c0aa13cfb39c3650df3b
python="${PYTHON:-$root/.venv/bin/python}"

verify() { echo "$sha256  $dest/$kernel" | sha256sum --check --quiet --status; }

if [[ -f "$dest/$kernel" ]] && verify; then
  echo "fetch_reference: $dest/$kernel is there"
  exit 0
fi
if [[ ! -x "$python" ]]; then
  echo "fetch_reference: no $python; run scripts/python_env.sh first (or set PYTHON)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip=("$python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --target "$tmp/wheel" wheel
FLASH_SPARSE_ATTENTION_SKIP_CUDA_BUILD=TRUE PYTHONPATH="$tmp/wheel" \
  "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$tmp" \
  "flash-sparse-attn==$version"

rm -rf "$dest"
mkdir -p "$root/.peers"
tar -xzf "$tmp/flash_sparse_attn-$version.tar.gz" -C "$root/.peers" \
  "flash_sparse_attn-$version/$kernel" "flash_sparse_attn-$version/LICENSE"
if ! verify; then
  echo "fetch_reference: $dest/$kernel is not the file the bench was written against" >&2
  exit 1
fi
echo "fetch_reference: $dest/$kernel"
