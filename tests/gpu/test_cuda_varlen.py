"""Packed sequences on CUDA (issue #15): flash_sparse_attn_varlen_func equals the per-sequence
flash_sparse_attn_func calls (the same kernels on the same views: bitwise for the output) and the
float64 reference, gradients included."""

import math

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func, flash_sparse_attn_varlen_func

from test_cuda_forward import SEED, attention

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)


def assert_sequence_grads(leaves, one, b1, s, e, where):
    """The packed call's gradients of sequence [s, e) (leaves: q, k, v, bias packed) equal those
    of its own call (one: q, k, v; b1: the bias)."""
    for name, a, r in (("dq", leaves[0].grad[s:e], one[0].grad[0]),
                       ("dk", leaves[1].grad[s:e], one[1].grad[0]),
                       ("dv", leaves[2].grad[s:e], one[2].grad[0]),
                       ("dbias", leaves[3].grad[:, s:e], b1.grad[0, :, 0])):
        torch.testing.assert_close(a, r, msg=f"{name}: {where}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_calls(dtype, causal):
    g = torch.Generator(device="cuda").manual_seed(SEED)
    lens = [300, 0, 1, 129, 700]
    H, Hk, D, T = 8, 2, 128, sum(lens)
    q, k, v = (torch.randn(T, h, D, device="cuda", generator=g).to(dtype) for h in (H, Hk, Hk))
    bias = torch.randn(Hk, T, device="cuda", generator=g).to(dtype)
    mask = torch.rand(Hk, T, device="cuda", generator=g) < 0.8
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    dout = torch.randn(T, H, D, device="cuda", generator=g).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = flash_sparse_attn_varlen_func(*leaves[:3], cu, cu, attn_mask=mask, attn_bias=leaves[3],
                                        is_causal=causal)
    out.backward(dout)
    scale = 1.0 / math.sqrt(D)
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        if e == s:
            continue
        one = [t[s:e].unsqueeze(0).clone().requires_grad_(True) for t in (q, k, v)]
        b1 = bias[:, s:e][None, :, None].clone().requires_grad_(True)
        m1 = mask[:, s:e][None, :, None]
        ref = flash_sparse_attn_func(*one, attn_mask=m1, attn_bias=b1, is_causal=causal)
        ref.backward(dout[s:e].unsqueeze(0))
        where = f"sequence [{s}, {e}) seed={SEED} dtype={dtype} causal={causal}"
        assert torch.equal(out[s:e], ref.detach()[0]), where
        assert_sequence_grads(leaves, one, b1, s, e, where)
        f64, _ = attention(*(t.detach() for t in one), m1, b1.detach(), scale, causal, 0.0,
                           torch.float64)
        naive, _ = attention(*(t.detach() for t in one), m1, b1.detach(), scale, causal, 0.0,
                             dtype)
        err = (out[s:e].double() - f64[0]).abs().max().item()
        assert err <= 2 * (naive[0].double() - f64[0]).abs().max().item() + 1e-4, where


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_topk_causal_matches_per_sequence_calls(dtype):
    """Per-row top-k per document (topk_causal): the same kernels on the same views as the
    per-sequence flash_sparse_attn_func calls (documents from 128 rows run over compacted keys)."""
    g = torch.Generator(device="cuda").manual_seed(SEED)
    lens = [300, 0, 1, 129, 700]
    H, Hk, D, T, w = 8, 2, 128, sum(lens), 64
    q, k, v = (torch.randn(T, h, D, device="cuda", generator=g).to(dtype) for h in (H, Hk, Hk))
    bias = torch.randn(Hk, T, device="cuda", generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    dout = torch.randn(T, H, D, device="cuda", generator=g).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = flash_sparse_attn_varlen_func(*leaves[:3], cu, cu, attn_bias=leaves[3], is_causal=True,
                                        topk=w, topk_causal=True)
    out.backward(dout)
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        if e == s:
            continue
        one = [t[s:e].unsqueeze(0).clone().requires_grad_(True) for t in (q, k, v)]
        b1 = bias[:, s:e][None, :, None].clone().requires_grad_(True)
        ref = flash_sparse_attn_func(*one, attn_bias=b1, is_causal=True, topk=w, topk_causal=True)
        ref.backward(dout[s:e].unsqueeze(0))
        where = f"sequence [{s}, {e}) seed={SEED} dtype={dtype}"
        assert torch.equal(out[s:e], ref.detach()[0]), where
        assert_sequence_grads(leaves, one, b1, s, e, where)


def test_device_offsets_warn_once():
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    import flash_sparse_attn.varlen as varlen
    varlen._warned_device_bounds = False
    with pytest.warns(UserWarning, match="cu_seqlens_q"):
        flash_sparse_attn_varlen_func(q, q, q, cu, cu)
