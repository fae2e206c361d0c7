"""torch.autograd integration: gradcheck with mask, bias in every broadcast shape and softcap;
gradients for q, k, v and bias (also when only the bias requires grad); the plan built once per
forward and reused by backward."""

import gc

import pytest
import torch

import flash_sparse_attn.flash_sparse_attn_interface as iface
from flash_sparse_attn import flash_sparse_attn_func

from conftest import attention_math

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 8

# Every shape SPEC section 1 allows for a bias of this problem: ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}).
BIAS_SHAPES = [
    (b, h, q, k) for b in (B, 1) for h in (H, HK, 1) for q in (SQ, 1) for k in (SK, 1)
]


def _float64_supported():
    try:
        q = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
        flash_sparse_attn_func(q, q, q)
        return True
    except TypeError:
        return False


FLOAT64 = _float64_supported()


def _inputs(dtype, bias_shape, with_mask):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, SQ, H, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, SK, HK, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, SK, HK, D, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(*bias_shape, generator=g, dtype=dtype, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.rand(B, 1, SQ, SK, generator=g) < 0.7
        mask[0, 0, 2] = False  # an empty row: its gradient contribution is exactly zero
    return q, k, v, bias, mask


def _gradcheck(dtype, bias_shape, with_mask, causal, softcap, **tol):
    q, k, v, bias, mask = _inputs(dtype, bias_shape, with_mask)

    def fn(q_, k_, v_, bias_):
        return flash_sparse_attn_func(q_, k_, v_, attn_mask=mask, attn_bias=bias_,
                                      is_causal=causal, softcap=softcap)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), **tol)


@pytest.mark.skipif(not FLOAT64, reason="the C++ core has no float64 CPU path yet")
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES)
def test_gradcheck_float64_every_bias_shape(bias_shape):
    _gradcheck(torch.float64, bias_shape, with_mask=True, causal=False, softcap=None)


@pytest.mark.skipif(not FLOAT64, reason="the C++ core has no float64 CPU path yet")
@pytest.mark.parametrize("causal,softcap", [(True, None), (False, 2.0), (True, 0.7)])
def test_gradcheck_float64_causal_softcap(causal, softcap):
    _gradcheck(torch.float64, (B, HK, SQ, SK), with_mask=True, causal=causal, softcap=softcap)


# float32 gradcheck with a step and tolerances sized for fp32 rounding: runs whatever the core's
# float64 support, so every bias shape is always checked against finite differences.
FP32_TOL = dict(eps=1e-3, atol=2e-3, rtol=2e-2, nondet_tol=0.0)
fp32_gradcheck = pytest.mark.filterwarnings("ignore:Input #.*double precision:UserWarning")


@fp32_gradcheck
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES)
def test_gradcheck_float32_every_bias_shape(bias_shape):
    _gradcheck(torch.float32, bias_shape, with_mask=True, causal=False, softcap=None, **FP32_TOL)


@fp32_gradcheck
@pytest.mark.parametrize("causal,softcap", [(True, None), (False, 2.0), (True, 0.7)])
def test_gradcheck_float32_causal_softcap(causal, softcap):
    _gradcheck(torch.float32, (B, HK, SQ, SK), with_mask=True, causal=causal, softcap=softcap,
               **FP32_TOL)


@pytest.mark.parametrize("bias_shape", [(B, H, SQ, SK), (1, HK, 1, SK), (B, 1, SQ, 1)])
def test_bias_only_gradient(bias_shape):
    """The reference crashes when only the bias requires grad; here it gets its gradient."""
    q, k, v, bias, mask = _inputs(torch.float32, bias_shape, with_mask=True)
    q, k, v = q.detach(), k.detach(), v.detach()
    out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    assert out.requires_grad
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_bias = bias.detach().double().requires_grad_()
    ref, _ = attention_math(q.double(), k.double(), v.double(), mask=mask, bias=ref_bias,
                            causal=True)
    ref.backward(dout.double())
    assert bias.grad.shape == bias.shape
    assert (bias.grad.double() - ref_bias.grad).abs().max().item() < 1e-5


def test_only_requested_gradients():
    q, k, v, bias, mask = _inputs(torch.float32, (B, H, SQ, SK), with_mask=False)
    k = k.detach()
    bias = bias.detach()
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias)
    out.sum().backward()
    assert q.grad is not None and v.grad is not None


def test_plan_built_once_per_forward_and_reused_by_backward(monkeypatch):
    calls = []
    real = iface._make_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(iface, "_make_plan", counting)
    q, k, v, bias, mask = _inputs(torch.float32, (B, HK, 1, SK), with_mask=True)
    out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 1, "backward must reuse the forward's plan"
    assert q.grad is not None and bias.grad is not None


def test_expanded_dout_from_sum():
    """out.sum().backward() hands backward an all-stride-0 dout; it must be accepted."""
    q, k, v, bias, mask = _inputs(torch.float32, (B, H, SQ, SK), with_mask=True)
    out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    out.sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref, _ = attention_math(ref_in[0], ref_in[1], ref_in[2], mask=mask, bias=ref_in[3])
    ref.sum().backward()
    for ours, r in zip((q, k, v, bias), ref_in):
        assert (ours.grad.double() - r.grad).abs().max().item() < 1e-5


def test_expanded_bias_gets_gradient_through_expand():
    q, k, v, _, _ = _inputs(torch.float32, (1, 1, 1, 1), with_mask=False)
    row = torch.randn(1, 1, 1, SK, requires_grad=True)
    bias = row.expand(B, H, SQ, SK)  # a stride-0 view passed as the bias
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias)
    out.backward(torch.ones_like(out))
    assert row.grad.shape == (1, 1, 1, SK)
    ref_row = row.detach().double().requires_grad_()
    ref, _ = attention_math(q.detach().double(), k.detach().double(), v.detach().double(),
                            bias=ref_row.expand(B, H, SQ, SK))
    ref.backward(torch.ones_like(ref))
    assert (row.grad.double() - ref_row.grad).abs().max().item() < 1e-5


def test_no_grad_context_returns_plain_tensor():
    q, k, v, bias, _ = _inputs(torch.float32, (B, H, SQ, SK), with_mask=False)
    with torch.no_grad():
        out = flash_sparse_attn_func(q, k, v, attn_bias=bias)
    assert not out.requires_grad and out.grad_fn is None


def test_double_backward_through_retain_graph():
    q, k, v, bias, mask = _inputs(torch.float32, (B, H, SQ, SK), with_mask=True)
    out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    out.sum().backward(retain_graph=True)
    first = q.grad.clone()
    q.grad = None
    out.sum().backward()
    assert torch.equal(q.grad, first)


def test_plan_cache_reuses_and_invalidates(monkeypatch):
    calls = []
    real = iface._make_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(iface, "_make_plan", counting)
    iface.clear_plan_cache()
    q, k, v, bias, mask = _inputs(torch.float32, (B, H, SQ, SK), with_mask=True)
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))
    first = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    for _ in range(3):  # e.g. the layers of one step sharing the mask
        assert torch.equal(flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias), first)
    assert len(calls) == 1

    mask[0, 0, 1] = ~mask[0, 0, 1]  # an in-place update bumps the version: replanned
    updated = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    assert len(calls) == 2
    ref, _ = attention_math(q.double(), k.double(), v.double(), mask=mask, bias=bias.double())
    assert (updated.double() - ref).abs().max().item() < 1e-5

    other = mask.clone()  # same contents, another tensor: its own entry
    flash_sparse_attn_func(q, k, v, attn_mask=other, attn_bias=bias)
    assert len(calls) == 3
    flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    assert len(calls) == 4


def test_plan_cache_never_matches_a_freed_mask():
    q, k, v, _, _ = _inputs(torch.float32, (1, 1, 1, 1), with_mask=False)
    q, k, v = (t.detach() for t in (q, k, v))
    for trial in range(20):  # new masks, often at a freed one's address and id
        mask = torch.rand(B, 1, SQ, SK) < 0.5
        mask[..., 0] = True
        out = flash_sparse_attn_func(q, k, v, attn_mask=mask)
        ref, _ = attention_math(q.double(), k.double(), v.double(), mask=mask)
        assert (out.double() - ref).abs().max().item() < 1e-5, trial
        del mask


def test_plan_cache_drops_a_plan_when_its_mask_is_freed():
    """A cached plan keyed by a tensor goes when that tensor does: it can never match again, and
    its memory (on CUDA, a leased planning graph) should not wait for the cache's LRU bound."""
    q, k, v, _, _ = _inputs(torch.float32, (1, 1, 1, 1), with_mask=False)
    q, k, v = (t.detach() for t in (q, k, v))
    iface.clear_plan_cache()
    mask = torch.rand(B, 1, SQ, SK) < 0.5
    kept = torch.rand(B, 1, SQ, SK) < 0.5
    flash_sparse_attn_func(q, k, v, attn_mask=mask)
    flash_sparse_attn_func(q, k, v, attn_mask=kept)
    assert len(iface._plan_cache._entries) == 2
    del mask
    gc.collect()
    assert len(iface._plan_cache._entries) == 1  # kept's plan stays
    flash_sparse_attn_func(q, k, v, attn_mask=kept)
    assert len(iface._plan_cache._entries) == 1
    del kept  # the most recently used entry's tensor: nothing of it stays in the cache
    gc.collect()
    assert len(iface._plan_cache._entries) == 0
    assert iface._plan_cache._recent is None


def test_plan_cache_evicts_the_least_recently_used_plan():
    q, k, v, _, _ = _inputs(torch.float32, (1, 1, 1, 1), with_mask=False)
    q, k, v = (t.detach() for t in (q, k, v))
    cache = iface._PlanCache(capacity=2)
    a, b, c = (torch.rand(B, 1, SQ, SK) < 0.5 for _ in range(3))
    plan_a = cache.get(q, k, a, False, None, None, None)
    cache.get(q, k, b, False, None, None, None)
    assert cache.get(q, k, a, False, None, None, None) is plan_a  # a hit: a is now the newest
    assert cache.get(q, k, a, False, None, None, None) is plan_a  # (already the newest)
    cache.get(q, k, c, False, None, None, None)  # over capacity: b, the least recent, goes
    assert cache.get(q, k, a, False, None, None, None) is plan_a
    assert len(cache._entries) == 2
    keys = [key for key in cache._entries]
    assert keys[0][7][0] == id(c) and keys[1][7][0] == id(a)
