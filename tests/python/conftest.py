"""Shared helpers for the Python tests: an fp64 reference of SPEC.md sections 2-3, the same math in
the input dtype (the "naive same-dtype implementation" of the SPEC pass rule), and the pass rule.

The reference is written independently of the core: dense (B, H, Sq, Sk) tensors, torch autograd
for gradients, and explicit empty-row handling (out = 0, lse = -inf, zero gradients).
"""

import math

import pytest
import torch

import flash_sparse_attn  # noqa: F401  (fails early and clearly if the package is not installed)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def expand_heads(t, num_heads):
    """({B|1}, Hx, ...) -> ({B|1}, H, ...): query head h reads head h // (H / Hx)."""
    hx = t.shape[1]
    if hx == num_heads:
        return t
    return t.repeat_interleave(num_heads // hx, dim=1)


def attention_math(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0,
                   compute_dtype=torch.float64):
    """SPEC section 2 in `compute_dtype`. q (B, Sq, H, D), k / v (B, Sk, Hk, D). Returns
    (out (B, Sq, H, D) in compute_dtype, lse (B, H, Sq) float64 with -inf on empty rows).
    Differentiable in q, k, v, bias; empty rows give exactly zero output and gradients."""
    batch, sq, heads, dim = q.shape
    sk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = expand_heads(k.to(compute_dtype).transpose(1, 2), heads)
    vh = expand_heads(v.to(compute_dtype).transpose(1, 2), heads)
    x = qh @ kh.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(x * scale / softcap)
    else:
        s = x * scale
    if bias is not None:
        s = s + expand_heads(bias.to(compute_dtype), heads)
    keep = torch.ones((batch, heads, sq, sk), dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & expand_heads(mask, heads)
    if causal:
        i = torch.arange(sq, device=q.device).view(sq, 1)
        j = torch.arange(sk, device=q.device).view(1, sk)
        keep = keep & (j <= i + sk - sq)
    has_any = keep.any(dim=-1, keepdim=True)
    # log-sum-exp over kept entries; rows with none get a finite stand-in so autograd stays finite.
    masked = torch.where(keep, s, torch.full_like(s, -math.inf))
    masked = torch.where(has_any, masked, torch.zeros_like(s))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    # exp of the masked scores (not of s): a dropped entry far above the row's lse would overflow
    # in half precision and turn its zero gradient into inf * 0 = NaN.
    p = torch.exp(torch.where(keep, s, torch.full_like(s, -math.inf)) - lse)
    out = (p @ vh).transpose(1, 2)
    lse_out = torch.where(has_any, lse, torch.full_like(lse, -math.inf)).squeeze(-1).double()
    return out, lse_out


def rule_bound(naive, ref, atol):
    return 2.0 * (naive.double() - ref.double()).abs().max().item() + atol


def assert_close_rule(name, ours, ref, naive, atol):
    """SPEC pass rule: max|ours - ref| <= 2 * max|naive same-dtype - ref| + small_atol, no NaN."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output"
    err = (ours.double() - ref.double()).abs().max().item() if ours.numel() else 0.0
    bound = rule_bound(naive, ref, atol) if ours.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def run_case(func, q, k, v, mask=None, bias=None, causal=False, softcap=0.0, scale=None,
             backward=True, check_lse=True):
    """Runs `func` (flash_sparse_attn_func) forward (+ backward with a random dout) and checks out,
    lse and the gradients of q, k, v, bias against the fp64 reference by the SPEC pass rule."""
    dtype = q.dtype
    atol = ATOL[dtype]
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    bias_leaf = None
    if bias is not None:
        bias_leaf = bias.detach().clone().requires_grad_(backward)
    out, lse, _ = func(*leaves, attn_mask=mask, attn_bias=bias_leaf, softmax_scale=scale,
                       is_causal=causal, softcap=softcap or None, return_attn_probs=True)

    ref_in = [t.detach().clone().double().requires_grad_(backward) for t in (q, k, v)]
    ref_bias = bias.detach().clone().double().requires_grad_(backward) if bias is not None else None
    ref_out, ref_lse = attention_math(*ref_in, mask=mask, bias=ref_bias, scale=scale,
                                      causal=causal, softcap=softcap)
    naive_in = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    naive_bias = bias.detach().clone().requires_grad_(backward) if bias is not None else None
    naive_out, _ = attention_math(*naive_in, mask=mask, bias=naive_bias, scale=scale,
                                  causal=causal, softcap=softcap, compute_dtype=dtype)

    assert out.shape == q.shape and out.dtype == dtype
    assert_close_rule("out", out, ref_out, naive_out, atol)
    if check_lse:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), "lse: -inf exactly on the empty rows"
        finite = ~empty
        if finite.any():
            err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
            assert err <= 1e-2, f"lse: max error {err:.3e}"
    empty_rows = torch.isinf(ref_lse).transpose(1, 2)  # (B, Sq, H)
    if empty_rows.any():
        assert (out[empty_rows] == 0).all(), "out: empty rows must be exactly 0"

    if not backward:
        return out
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out.backward(dout.double())
    naive_out.backward(dout.to(naive_out.dtype))
    names = ["dq", "dk", "dv"]
    pairs = list(zip(leaves, ref_in, naive_in))
    if bias is not None:
        names.append("dbias")
        pairs.append((bias_leaf, ref_bias, naive_bias))
    for name, (ours, ref, naive) in zip(names, pairs):
        assert ours.grad is not None, f"{name}: missing gradient"
        assert ours.grad.shape == ours.shape, f"{name}: shape {tuple(ours.grad.shape)}"
        assert ours.grad.dtype == ours.dtype
        assert_close_rule(name, ours.grad, ref.grad, naive.grad, atol)
    if empty_rows.any():
        assert (leaves[0].grad[empty_rows] == 0).all(), "dq: empty rows must be exactly 0"
    return out
