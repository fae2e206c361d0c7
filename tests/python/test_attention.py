"""SPEC.md section 7, cases 1-14, through the Python API (flash_sparse_attn_func) on torch CPU
tensors, forward and backward, fp16 and bf16 (and fp32 where the CPU backend adds it).

Shapes are the SPEC's where the dense fp64 reference fits CI's 2 cores; where it does not, the
case keeps its structure (GQA ratio, mask shapes and density, odd sizes, causality) at shorter
sequence lengths, and says so. The full-size grid runs in the C++ suite (tests/cpp).
"""

import math

import pytest
import torch

from flash_sparse_attn import flash_sparse_attn_func
from flash_sparse_attn.utils.mask import create_mask

from conftest import attention_math, run_case

HALF = [torch.float16, torch.bfloat16]


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def qkv(b, sq, sk, h, hk, d, dtype):
    return rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype)


# 1. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_case1_dense(dtype, causal):
    q, k, v = qkv(2, 512, 512, 8, 8, 64, dtype)
    out = run_case(flash_sparse_attn_func, q, k, v, causal=causal)
    # Also against SDPA (same math, top-left = bottom-right causality when Sq == Sk).
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2),
        is_causal=causal,
    ).transpose(1, 2)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert (out.double() - sdpa).abs().max().item() < tol


# 2. ------------------------------------------------------------------------------------------------
# (2,1024,1024,16,16,128) as SPEC, in bf16 only: its fp64 reference (several dense
# (B,H,Sq,Sk) fp64 tensors under autograd, ~0.3 GB each) is the slowest reference of the suite.
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_case2_causal_large(dtype):
    q, k, v = qkv(2, 1024, 1024, 16, 16, 128, dtype)
    run_case(flash_sparse_attn_func, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", HALF)
def test_case2_head_dim_256(dtype):
    q, k, v = qkv(1, 1024, 1024, 4, 4, 256, dtype)
    run_case(flash_sparse_attn_func, q, k, v)


# 3. ------------------------------------------------------------------------------------------------
# SPEC: (2,2048,2048,8,2,128), window 256. Here Sq = Sk = 512 with window 64 (the same 1/8 of the
# keys): the fp64 reference at 2048 needs ~3 GB and ~20 s per dtype on CI's 2 cores.
@pytest.mark.parametrize("dtype", HALF)
def test_case3_trainable_mask(dtype):
    b, s, h, hk, d, window = 2, 512, 8, 2, 128, 64
    q, k, v = qkv(b, s, s, h, hk, d, dtype)
    bias = rand(b, hk, 1, s, dtype=dtype)
    causal_4d = torch.ones(s, s, dtype=torch.bool).tril().expand(b, hk, s, s)
    mask = create_mask(bias, causal_4d, b, s, s, window, torch.finfo(dtype).min, type="topk")
    assert mask.shape == (b, hk, s, s)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, causal=True)


# 4. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case4_bias_only_query_dim_1_gqa(dtype):
    q, k, v = qkv(2, 1000, 1000, 8, 2, 64, dtype)
    bias = rand(2, 2, 1, 1000, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, bias=bias, causal=True)


# 5. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case5_decode_gqa(dtype):
    b, sk, h, hk, d = 3, 1025, 32, 4, 128
    q, k, v = qkv(b, 1, sk, h, hk, d, dtype)
    mask = torch.rand(b, hk, 1, sk) < 0.5
    bias = rand(b, hk, 1, sk, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, causal=True)


# 6. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case6_decode_sparse_per_head_mask(dtype):
    b, sk, h, hk, d = 2, 4096, 16, 2, 64
    q, k, v = qkv(b, 1, sk, h, hk, d, dtype)
    mask = torch.rand(b, h, 1, sk) < 0.1
    bias = rand(1, 1, 1, sk, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias)


# 7. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_case7_empty_rows(dtype):
    b, s, h, d = 2, 256, 4, 64
    q, k, v = qkv(b, s, s, h, h, d, dtype)
    mask = torch.rand(b, h, s, s) < 0.5
    mask[0, :, 3] = False      # fully masked rows in every head of batch 0
    mask[0, 1, 100:140] = False
    mask[1] = False            # a fully masked batch
    bias = rand(b, h, s, s, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias)


def test_case7_empty_batch_gradients_exactly_zero():
    q, k, v = qkv(2, 64, 64, 2, 2, 32, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    bias = rand(2, 2, 64, 64, dtype=torch.float32).requires_grad_()
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    mask[1] = False
    out = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    out.backward(torch.randn_like(out))
    for t in (q, k, v, bias):
        assert not torch.isnan(t.grad).any()
        assert (t.grad[1] == 0).all()
    assert (out[1] == 0).all()


# 8. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case8_block_structured_mask(dtype):
    b, s, h, d = 1, 1024, 4, 128
    q, k, v = qkv(b, s, s, h, h, d, dtype)
    mask = torch.rand(b, h, s, s) < 0.3
    mask[:, :, 0:64, 64:128] = False
    mask[:, :, 256:384, 512:640] = False
    mask[:, 1, 640:768, 0:128] = False
    mask[:, :, 900:964, :] = True  # a dense band next to the empty tiles
    run_case(flash_sparse_attn_func, q, k, v, mask=mask)


# 9. ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [8, 20, 40, 50, 72, 100, 130, 200, 224, 256])
def test_case9_head_dim_sweep(d):
    q, k, v = qkv(1, 333, 517, 4, 2, d, torch.bfloat16)
    run_case(flash_sparse_attn_func, q, k, v, causal=(d % 20 == 0))


def test_case9_head_dim_264_raises():
    q, k, v = qkv(1, 33, 51, 4, 2, 264, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim|256"):
        flash_sparse_attn_func(q, k, v)


# 10. -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case10_batch_broadcast_mask_and_bias(dtype):
    q, k, v = qkv(4, 128, 160, 4, 2, 64, dtype)
    mask = torch.rand(1, 2, 128, 160) < 0.7
    bias = rand(1, 2, 128, 160, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias)


@pytest.mark.parametrize("dtype", HALF)
def test_case10_key_dim_1_bias(dtype):
    q, k, v = qkv(2, 96, 80, 4, 4, 64, dtype)
    bias = rand(2, 4, 96, 1, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, bias=bias)


# 11. -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_case11_full_bias_rectangular(dtype):
    q, k, v = qkv(2, 256, 384, 8, 8, 64, dtype)
    bias = rand(2, 8, 256, 384, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, bias=bias)


# 12. -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_case12_softcap_with_bias(dtype, softcap):
    q, k, v = qkv(1, 512, 512, 4, 4, 64, dtype)
    q = q * 4  # push scores into the saturating range of the cap
    bias = rand(1, 4, 512, 512, dtype=dtype)
    run_case(flash_sparse_attn_func, q, k, v, bias=bias, softcap=softcap, causal=True)


# 13. -----------------------------------------------------------------------------------------------
def test_case13_deterministic_backward():
    q, k, v = qkv(1, 4096, 4096, 2, 1, 64, torch.bfloat16)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_sparse_attn_func(*leaves, is_causal=True, deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# 14. -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_case14_lse_and_out_with_and_without_lse(dtype):
    q, k, v = qkv(2, 100, 130, 4, 2, 64, dtype)
    mask = torch.rand(2, 1, 100, 130) < 0.6
    bias = rand(2, 4, 1, 130, dtype=dtype)
    out_only = flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
    out, lse, probs = flash_sparse_attn_func(
        q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True, return_attn_probs=True
    )
    assert probs is None
    assert torch.equal(out, out_only)
    _, ref_lse = attention_math(q.double(), k.double(), v.double(), mask=mask,
                                bias=bias.double(), causal=True)
    assert lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-3


# Beyond the grid: layouts the Python layer must pass through without copies or errors. ---------
def test_head_first_transposed_inputs():
    b, s, h, d = 2, 70, 4, 32
    qh, kh, vh = (torch.randn(b, h, s, d) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))  # (B, S, H, D) views, non-contiguous
    assert not q.is_contiguous()
    run_case(flash_sparse_attn_func, q, k, v, causal=True)


def test_expanded_mask_and_bias_views():
    q, k, v = qkv(2, 48, 64, 4, 2, 32, torch.float32)
    key_mask = torch.rand(2, 1, 1, 64) < 0.8
    mask = key_mask.expand(2, 4, 48, 64)  # stride-0 view, never materialized
    bias_row = torch.randn(1, 1, 1, 64)
    bias = bias_row.expand(2, 2, 48, 64)
    assert mask.stride(1) == 0 and bias.stride(2) == 0
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, backward=False)


def test_last_dim_not_contiguous_is_copied():
    q, k, v = qkv(1, 16, 16, 2, 2, 32, torch.float32)
    q_strided = torch.randn(1, 16, 2, 64)[..., ::2]
    assert q_strided.stride(-1) == 2
    ref = flash_sparse_attn_func(q_strided.contiguous(), k, v)
    assert torch.equal(flash_sparse_attn_func(q_strided, k, v), ref)


def test_softmax_scale_and_sq_greater_than_sk_causal():
    q, k, v = qkv(1, 40, 17, 2, 1, 16, torch.float32)
    run_case(flash_sparse_attn_func, q, k, v, scale=0.3, causal=True)


def test_decode_causal_sees_every_key():
    q, k, v = qkv(2, 1, 33, 4, 4, 16, torch.float32)
    a = flash_sparse_attn_func(q, k, v, is_causal=True)
    b = flash_sparse_attn_func(q, k, v, is_causal=False)
    assert torch.equal(a, b)


def test_empty_key_sequence():
    q = torch.randn(1, 5, 2, 16)
    k = torch.randn(1, 0, 2, 16)
    v = torch.randn(1, 0, 2, 16)
    out, lse, _ = flash_sparse_attn_func(q, k, v, return_attn_probs=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_query_sequence_backward_from_a_sum(dtype):
    """out.sum().backward() with no queries: autograd hands the backward an expanded gradient
    (stride 0 on every dim, the last included); no query sees a key, so dk, dv and dbias are 0."""
    q = torch.randn(2, 0, 4, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 7, 2, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 7, 2, 16, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 2, 1, 7, dtype=dtype, requires_grad=True)
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
    assert out.shape == (2, 0, 4, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape
    for t in (k, v, bias):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_sdpa_equivalence_no_grad_path():
    q, k, v = qkv(1, 33, 33, 2, 2, 16, torch.float32)
    with torch.no_grad():
        out = flash_sparse_attn_func(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert (out - ref).abs().max().item() < 1e-5
    assert math.isfinite(out.sum().item())
