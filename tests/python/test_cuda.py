"""The Python layer on CUDA tensors (skipped without a GPU or without the CUDA backend): DLPack
with device pointers, the caller's current stream, torch.compile, mask utilities on device."""

import pytest
import torch

import flash_sparse_attn
from flash_sparse_attn import flash_sparse_attn_func
from flash_sparse_attn.utils.mask import create_mask

from conftest import ATOL, assert_close_rule, attention_math

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_sparse_attn.CUDA_AVAILABLE),
    reason="needs a GPU and a build with the CUDA backend",
)

CASES = [
    # (B, Sq, Sk, H, Hk, D, mask, bias, causal)
    (2, 128, 128, 4, 4, 64, False, False, False),
    (2, 257, 257, 8, 2, 128, True, True, True),
    (3, 1, 1025, 8, 2, 128, True, True, True),
    (1, 100, 300, 4, 1, 64, False, True, False),
]


def _case(b, sq, sk, h, hk, d, with_mask, with_bias, dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    mask = (torch.rand(b, hk, 1, sk, generator=g) < 0.6) if with_mask else None
    bias = torch.randn(b, hk, 1, sk, generator=g).to(dtype) if with_bias else None
    return q, k, v, mask, bias


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_forward_on_cuda(case, dtype):
    b, sq, sk, h, hk, d, with_mask, with_bias, causal = case
    q, k, v, mask, bias = _case(b, sq, sk, h, hk, d, with_mask, with_bias, dtype)
    out, lse, _ = flash_sparse_attn_func(*_cuda(q, k, v, mask, bias), is_causal=causal,
                                         return_attn_probs=True)
    assert out.is_cuda and out.dtype == dtype and lse.is_cuda
    ref, ref_lse = attention_math(q.double(), k.double(), v.double(), mask=mask,
                                  bias=None if bias is None else bias.double(), causal=causal)
    naive, _ = attention_math(*_cuda(q, k, v), mask=None if mask is None else mask.cuda(),
                              bias=None if bias is None else bias.cuda(), causal=causal,
                              compute_dtype=dtype)
    assert_close_rule("out", out.cpu(), ref, naive.cpu(), ATOL[dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite)


def test_runs_on_the_current_stream():
    q, k, v, mask, bias = _cuda(*_case(2, 300, 300, 4, 2, 64, True, True, torch.bfloat16))
    expected = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
        checksum = out.float().sum()  # ordered after the kernel on the same stream
    side.synchronize()
    assert torch.equal(out, expected)
    assert torch.isfinite(checksum)


def test_compile_forward_on_cuda():
    q, k, v, mask, bias = _cuda(*_case(2, 64, 96, 4, 2, 64, True, True, torch.bfloat16))

    def fn(q_, k_, v_):
        return flash_sparse_attn_func(q_, k_, v_, attn_mask=mask, attn_bias=bias, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_on_cuda_or_clear_error(dtype):
    q, k, v, mask, bias = _case(2, 130, 200, 4, 2, 64, True, True, dtype)
    leaves = [t.cuda().requires_grad_() for t in (q, k, v, bias)]
    out = flash_sparse_attn_func(leaves[0], leaves[1], leaves[2], attn_mask=mask.cuda(),
                                 attn_bias=leaves[3], is_causal=True)
    dout = torch.randn_like(out)
    try:
        out.backward(dout)
    except NotImplementedError as e:  # a build whose CUDA backend has no backward yet
        pytest.xfail(f"CUDA backward not available: {e}")
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref, _ = attention_math(*ref_in[:3], mask=mask, bias=ref_in[3], causal=True)
    ref.backward(dout.cpu().double())
    naive_in = [t.detach().cuda().requires_grad_() for t in (q, k, v, bias)]
    naive, _ = attention_math(*naive_in[:3], mask=mask.cuda(), bias=naive_in[3], causal=True,
                              compute_dtype=dtype)
    naive.backward(dout)
    for name, ours, r, nv in zip(("dq", "dk", "dv", "dbias"), leaves, ref_in, naive_in):
        assert ours.grad.shape == ours.shape
        assert_close_rule(name, ours.grad.cpu(), r.grad, nv.grad.cpu(), ATOL[dtype])


def test_mask_utilities_on_cuda_tensors():
    bias = torch.randn(2, 4, 1, 1000, device="cuda")
    mask_2d = torch.rand(2, 1000, device="cuda") < 0.9
    out = create_mask(bias, mask_2d, 2, 1, 1000, 64, torch.finfo(torch.float32).min, block_size=8)
    assert out.is_cuda and out.dtype == torch.bool
    ref = create_mask(bias.cpu(), mask_2d.cpu(), 2, 1, 1000, 64, torch.finfo(torch.float32).min,
                      block_size=8)
    assert torch.equal(out.cpu(), ref)


def test_device_mismatch_is_a_value_error():
    q, k, v, _, _ = _case(1, 8, 8, 2, 2, 64, False, False, torch.bfloat16)
    with pytest.raises(ValueError, match="key|device"):
        flash_sparse_attn_func(q.cuda(), k, v.cuda())
