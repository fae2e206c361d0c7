"""Malformed calls on CUDA tensors raise a clear error naming the argument, and never take the
process down (issue #13: these three killed Python with SIGSEGV). Each call runs in a child
process, so a crash fails its test instead of ending the session; faulthandler prints where."""

import subprocess
import sys
import textwrap

import pytest
import torch

from flash_sparse_attn import _C

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)

CALL = """
import torch
from flash_sparse_attn import flash_sparse_attn_func
q = torch.randn(1, 16, 4, 32, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 16, 2, 32, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
grad = {grad}
if grad:
    q.requires_grad_(True)
try:
    flash_sparse_attn_func(q, k, v, {kwargs})
except ValueError as e:
    print("ValueError:", e)
else:
    print("no error")
torch.cuda.synchronize()
"""

BAD = {
    "mask_heads": ("attn_mask=torch.ones(1, 3, 16, 16, device='cuda', dtype=torch.bool)",
                   "attn_mask"),
    "bias_query_dim": ("attn_bias=torch.randn(1, 4, 7, 16, device='cuda', dtype=torch.bfloat16)",
                       "attn_bias"),
    "mask_key_dim": ("attn_mask=torch.ones(1, 2, 16, 15, device='cuda', dtype=torch.bool)",
                     "attn_mask"),
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_call_raises_naming_the_argument(name, grad):
    kwargs, argument = BAD[name]
    code = textwrap.dedent(CALL.format(grad=grad, kwargs=kwargs))
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"{name}: the process died (rc {run.returncode}):\n{run.stderr}"
    assert run.stdout.startswith(f"ValueError: {argument}"), \
        f"{name}: expected a ValueError naming {argument}, got:\n{run.stdout}{run.stderr}"
