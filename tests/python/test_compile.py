"""torch.compile(fullgraph=True) traces flash_sparse_attn_func through the torch.library custom ops
(fake kernels, registered autograd) without graph breaks, forward and backward, and matches eager.
Most tests use the aot_eager backend (dynamo + AOTAutograd + fake tensors: everything that could
break tracing, without inductor's C++ code generation, which costs ~30 s on CI's 2 cores)."""

import pytest
import torch

import flash_sparse_attn.flash_sparse_attn_interface as iface
from flash_sparse_attn import flash_sparse_attn_func


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(requires_grad=True):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 33, 4, 16, generator=g, requires_grad=requires_grad)
    k = torch.randn(2, 40, 2, 16, generator=g, requires_grad=requires_grad)
    v = torch.randn(2, 40, 2, 16, generator=g, requires_grad=requires_grad)
    bias = torch.randn(2, 2, 1, 40, generator=g, requires_grad=requires_grad)
    mask = torch.rand(2, 1, 33, 40, generator=g) < 0.8
    return q, k, v, bias, mask


def _layer(q, k, v, bias, mask):
    out = flash_sparse_attn_func(q * 1.5, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                 softcap=20.0)
    return (out.float() ** 2).sum()


def _eager_grads():
    q, k, v, bias, mask = _inputs()
    loss = _layer(q, k, v, bias, mask)
    loss.backward()
    return loss.detach(), [t.grad for t in (q, k, v, bias)]


def test_fullgraph_forward_backward_matches_eager():
    ref_loss, ref_grads = _eager_grads()
    q, k, v, bias, mask = _inputs()
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, bias, mask)
    loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for ours, ref in zip((q.grad, k.grad, v.grad, bias.grad), ref_grads):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_no_graph_breaks():
    q, k, v, bias, mask = _inputs()
    explanation = torch._dynamo.explain(_layer)(q, k, v, bias, mask)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compiled_backward_reuses_forward_plan(monkeypatch):
    calls = []
    real = iface._make_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(iface, "_make_plan", counting)
    q, k, v, bias, mask = _inputs()
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, bias, mask)
    planned = len(calls)
    assert planned >= 1
    loss.backward()
    assert len(calls) == planned, "the backward op must take the forward op's plan"


def test_inference_and_lse_under_compile():
    q, k, v, bias, mask = _inputs(requires_grad=False)

    def fn(q_, k_, v_):
        out, lse, probs = flash_sparse_attn_func(q_, k_, v_, attn_mask=mask, attn_bias=bias,
                                                 return_attn_probs=True)
        return out, lse

    out, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    ref_out, ref_lse, _ = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                                 return_attn_probs=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_bias_only_gradient_under_compile():
    q, k, v, bias, mask = _inputs()
    q, k, v = q.detach(), k.detach(), v.detach()
    loss = torch.compile(_layer, fullgraph=True, backend="aot_eager")(q, k, v, bias, mask)
    loss.backward()
    ref_bias = bias.detach().clone().requires_grad_()
    _layer(q, k, v, ref_bias, mask).backward()
    assert torch.allclose(bias.grad, ref_bias.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_custom_ops():
    q, k, v, bias, mask = _inputs()
    args = (q, k, v, mask, bias, None, None, True, 0.0, False, None, None)
    torch.library.opcheck(torch.ops.flash_sparse_attn.fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_inductor_fullgraph():
    """One run through the default backend (inductor) end to end."""
    ref_loss, ref_grads = _eager_grads()
    q, k, v, bias, mask = _inputs()
    loss = torch.compile(_layer, fullgraph=True)(q, k, v, bias, mask)
    loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for ours, ref in zip((q.grad, k.grad, v.grad, bias.grad), ref_grads):
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_block_mask_under_compile():
    from flash_sparse_attn.utils.mask import create_block_mask

    q, k, v, bias, _ = _inputs()
    blocks = create_block_mask(bias, 33, num_blocks=1, block_size=(16, 8), is_causal=True)

    def fn(q_, k_, v_, bias_):
        out = flash_sparse_attn_func(q_, k_, v_, attn_bias=bias_, is_causal=True,
                                     block_mask=blocks, block_size=(16, 8))
        return out.sum()

    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    loss.backward()
    refs = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    ref_loss = fn(*refs)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    for ours, ref in zip((q, k, v, bias), refs):
        assert torch.allclose(ours.grad, ref.grad, atol=1e-5)


def test_dynamic_shapes_one_graph():
    """dynamic=True: one graph serves several sequence lengths (fake kernels are shape-generic)."""
    counts = torch._dynamo.utils.counters
    counts.clear()

    def fn(q_, k_, v_, bias_):
        return flash_sparse_attn_func(q_, k_, v_, attn_bias=bias_, is_causal=True).sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for s in (17, 40, 64):
        q = torch.randn(2, s, 4, 16, requires_grad=True)
        k = torch.randn(2, s + 3, 2, 16, requires_grad=True)
        v = torch.randn(2, s + 3, 2, 16, requires_grad=True)
        bias = torch.randn(2, 2, 1, s + 3, requires_grad=True)
        loss = compiled(q, k, v, bias)
        loss.backward()
        refs = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
        ref = fn(*refs)
        ref.backward()
        assert torch.allclose(loss, ref, atol=1e-4)
        for ours, r in zip((q, k, v, bias), refs):
            assert torch.allclose(ours.grad, r.grad, atol=1e-4)
    assert counts["stats"]["unique_graphs"] <= 2  # the static first call, then one dynamic graph
