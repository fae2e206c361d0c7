"""Packed sequences on CUDA (issue #15): one packed call (PlanOptions::packed) against float64
with the equivalent mask over the packed sequence, gradients included, offsets read on the device
only; with topk (one call per sequence) the per-sequence flash_sparse_attn_func calls (the same
kernels on the same views: bitwise for the output)."""

import math

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func, flash_sparse_attn_varlen_func

from test_cuda_backward import check_backward, gen  # noqa: F401 (fixture)
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


def packed_mask(cu_q, cu_k, Hk, causal, key_mask=None):
    """The (1, Hk, total_q, total_k) mask the packed call keeps: a row sees its own sequence's
    keys (from the sequence's bottom-right diagonal on when causal), and the key mask's."""
    tq, tk = cu_q[-1], cu_k[-1]
    keep = torch.zeros(tq, tk, dtype=torch.bool, device="cuda")
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device="cuda")
        if causal:
            block = block.tril((k1 - k0) - (q1 - q0))
        keep[q0:q1, k0:k1] = block
    keep = keep[None, None].expand(1, Hk, tq, tk)
    if key_mask is not None:
        keep = keep & key_mask[None, :, None, :]
    return keep.contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", [
    ([300, 0, 1, 127, 128, 129, 700], None),      # ragged, one empty, one of length 1
    ([40, 0, 90, 3, 200], [64, 17, 90, 0, 260]),  # keys without queries, queries without keys
])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("mode", ["fused", "pass"])
@pytest.mark.parametrize("D", [64, 128])
def test_packed_against_float64(dtype, causal, lens_q, lens_k, masked, mode, D, gen, monkeypatch):
    """One packed call (PlanOptions::packed) with or without a key mask and with a per-key bias:
    output, LSE and every gradient against float64 with the equivalent mask over the packed
    sequence (within twice the same-precision naive error), exact zeros for empty rows and unseen
    keys. The backward runs the fused pass (FSA_CUDA_DQ=fused; at head dims 64 and 128 on Hopper)
    and the two passes."""
    monkeypatch.setenv("FSA_CUDA_DQ", mode)
    lens_k = lens_k or lens_q
    H, Hk = 8, 2
    cu_q = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lens_k).cumsum(0).tolist()
    tq, tk = cu_q[-1], cu_k[-1]
    q = torch.randn(1, tq, H, D, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(1, tk, Hk, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    bias = torch.randn(1, Hk, 1, tk, device="cuda", generator=gen).to(dtype)
    key_mask = torch.rand(Hk, tk, device="cuda", generator=gen) < 0.8 if masked else None
    mask = packed_mask(cu_q, cu_k, Hk, causal, key_mask)
    # Offsets on the device: int64, as transformers passes them.
    dq_, dk_ = (torch.tensor(c, device="cuda") for c in (cu_q, cu_k))

    def ours(q_, k_, v_, b_):
        out = flash_sparse_attn_varlen_func(q_[0], k_[0], v_[0], dq_, dk_, attn_mask=key_mask,
                                            attn_bias=b_[0, :, 0], is_causal=causal)
        return out[None]

    where = f"packed {lens_q}/{lens_k} causal={causal} masked={masked} {mode} D={D}"
    out, lse, _ = flash_sparse_attn_varlen_func(q[0], k[0], v[0], dq_, dk_, attn_mask=key_mask,
                                                attn_bias=bias[0, :, 0], is_causal=causal,
                                                return_attn_probs=True)
    scale = 1.0 / math.sqrt(D)
    f64, lse64 = attention(q, k, v, mask, bias, scale, False, 0.0, torch.float64)
    naive, _ = attention(q, k, v, mask, bias, scale, False, 0.0, dtype)
    err = (out[None].double() - f64).abs().max().item()
    assert err <= 2 * (naive.double() - f64).abs().max().item() + 1e-4, where
    empty = ~mask.repeat_interleave(H // Hk, 1).any(-1)[0]  # (H, total_q) rows that see nothing
    assert (lse[empty] == -math.inf).all() and torch.isfinite(lse[~empty]).all(), where
    assert (out.transpose(0, 1)[empty] == 0).all(), where
    finite = ~empty
    assert (lse[finite].double() - lse64[0][finite]).abs().max().item() <= 1e-2, where
    check_backward(q, k, v, mask, bias, causal=False, label=where, ours_call=ours)


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0),
                    reason="the fused backward is an sm_90a kernel")
def test_packed_backward_takes_the_fused_pass(gen, monkeypatch):
    """Packed sequences without a mask take the fused backward by default at head dim 128 (no dQ
    pass; one list, its pairs in index order), and the two passes with a key mask (one list per kv
    head) or deterministic=True."""
    from test_cuda_backward import cuda_kernel_names

    monkeypatch.delenv("FSA_CUDA_DQ", raising=False)
    lens = [700, 0, 129, 1500, 64]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    H, Hk, D = 8, 2, 128
    q = torch.randn(cu[-1], H, D, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(cu[-1], Hk, D, device="cuda", generator=gen).to(torch.bfloat16)
            for _ in range(2))
    bias = torch.randn(Hk, cu[-1], device="cuda", generator=gen).to(torch.bfloat16)
    key_mask = torch.rand(Hk, cu[-1], device="cuda", generator=gen) < 0.8
    offsets = torch.tensor(cu, device="cuda")

    def step(mask=None, det=False):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = flash_sparse_attn_varlen_func(*leaves[:3], offsets, offsets, attn_mask=mask,
                                            attn_bias=leaves[3], is_causal=True,
                                            deterministic=det)
        out.backward(torch.ones_like(out))

    step(), step(key_mask), step(det=True)  # warm-up: first-call setup stays out of the profile
    fused = cuda_kernel_names(step)
    assert any("dkdvq_kernel_sm90" in n for n in fused), fused
    assert not any("dkv_order_kernel" in n for n in fused), fused  # one list: index order
    assert not any("dq_kernel" in n for n in fused), fused
    for call in (lambda: step(key_mask), lambda: step(det=True)):
        names = cuda_kernel_names(call)
        assert any("dq_kernel_sm90" in n for n in names), names
        assert not any("dkdvq_kernel_sm90" in n for n in names), names


@pytest.mark.parametrize("causal", [False, True])
def test_packed_topk_against_float64(causal, gen):
    """topk without topk_causal in one packed call: the key mask built on the device equals
    create_mask on each sequence alone (bitwise), and the call (forward and every gradient) matches
    float64 with that selection."""
    from flash_sparse_attn.utils.mask import create_mask
    from flash_sparse_attn.varlen import _packed_topk_mask

    lens, w = [300, 0, 1, 129, 700, 90], 64
    H, Hk, D, dtype = 8, 2, 128, torch.bfloat16
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    T = cu[-1]
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(1, T, Hk, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    bias = torch.randint(-20, 20, (1, Hk, 1, T), device="cuda", generator=gen).to(dtype) / 8
    cu_d = torch.tensor(cu, device="cuda", dtype=torch.int32)
    keep = _packed_topk_mask(bias[0, :, 0], None, cu_d, w)
    for s, e in zip(cu, cu[1:]):
        if e > s:
            want = create_mask(bias[..., s:e], None, 1, 1, e - s, w, torch.finfo(dtype).min)
            assert torch.equal(keep[:, s:e], want[0, :, 0]), f"sequence [{s}, {e})"
    mask = packed_mask(cu, cu, Hk, causal, keep)

    def ours(q_, k_, v_, b_):
        return flash_sparse_attn_varlen_func(q_[0], k_[0], v_[0], cu_d, cu_d, attn_bias=b_[0, :, 0],
                                             is_causal=causal, topk=w)[None]

    where = f"packed topk {lens} w={w} causal={causal}"
    out = ours(q, k, v, bias)
    scale = 1.0 / math.sqrt(D)
    f64, _ = attention(q, k, v, mask, bias, scale, False, 0.0, torch.float64)
    naive, _ = attention(q, k, v, mask, bias, scale, False, 0.0, dtype)
    err = (out.double() - f64).abs().max().item()
    assert err <= 2 * (naive.double() - f64).abs().max().item() + 1e-4, where
    check_backward(q, k, v, mask, bias, causal=False, label=where, ours_call=ours)


def test_packed_planning_reads_no_offsets_on_the_host(gen):
    """Offsets on the device: the packed call (forward and backward) makes torch wait for
    nothing (torch's sync debug mode raises on a host read), and warns of nothing."""
    q = torch.randn(700, 4, 64, device="cuda", generator=gen).to(torch.bfloat16)
    bias = torch.randn(2, 700, device="cuda", generator=gen).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (q, q[:, :2], q[:, 2:], bias)]
    cu = torch.tensor([0, 300, 301, 700], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")  # (torch warns that the mode is a prototype)
        try:
            out = flash_sparse_attn_varlen_func(*leaves[:3], cu, cu, max_seqlen_q=399,
                                                max_seqlen_k=399, attn_bias=leaves[3],
                                                is_causal=True)
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in seen if "flash_sparse_attn" in w.filename or "cu_seqlens" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


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


def test_device_offsets_warn_once_with_topk_causal():
    """topk_causal runs one call per sequence, which reads the offsets on the host: it says so
    once."""
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(2, 10, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    import flash_sparse_attn.varlen as varlen
    varlen._warned_device_bounds = False
    with pytest.warns(UserWarning, match="cu_seqlens_q"):
        flash_sparse_attn_varlen_func(q, q, q, cu, cu, attn_bias=bias, is_causal=True, topk=3,
                                      topk_causal=True)
