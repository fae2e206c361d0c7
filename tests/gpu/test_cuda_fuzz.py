"""The Python API's malformed-input fuzz (tests/python/test_fuzz.py) on CUDA tensors (issue #13):
every call raises an error naming an argument or runs without NaN; scripts/gpu_check.sh also runs
it under compute-sanitizer memcheck (FSA_FUZZ_CALLS sets how many calls)."""

import os
import sys

import pytest
import torch

from flash_sparse_attn import _C

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from test_fuzz import fuzz  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)


def test_cuda_python_api_raises_naming_an_argument_or_runs_cleanly(capsys):
    calls, rejected, accepted = fuzz(4242, int(os.environ.get("FSA_FUZZ_CALLS", "400")), "cuda")
    torch.cuda.synchronize()
    with capsys.disabled():
        print(f"\ncuda malformed-input fuzz: {calls} calls, {rejected} rejected naming an "
              f"argument, {accepted} accepted")
    assert rejected > calls // 3 and accepted > calls // 20
