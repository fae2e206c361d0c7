"""SPEC.md section 6 through the Python API: bad input raises ValueError / TypeError with a message
that names the argument; nothing is written on rejection; NaN / Inf propagate row by row."""

import math

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func


def qkv(b=1, sq=8, sk=8, h=4, hk=2, d=16, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query"):
        flash_sparse_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="key"):
        flash_sparse_attn_func(q, k[0], v)
    with pytest.raises(ValueError, match="attn_mask"):
        flash_sparse_attn_func(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))


def test_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="key"):
        flash_sparse_attn_func(q, k.half(), v)
    with pytest.raises(TypeError, match="value"):
        flash_sparse_attn_func(q, k, v.bfloat16())


def test_unsupported_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="query"):
        flash_sparse_attn_func(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))


def test_heads_not_divisible():
    q, k, v = qkv(h=6, hk=4)
    with pytest.raises(ValueError, match="head"):
        flash_sparse_attn_func(q, k, v)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 4, 5, 8), (1, 4, 8, 3), (2, 4, 8, 8)])
def test_mask_and_bias_dims_neither_1_nor_full(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        flash_sparse_attn_func(q, k, v, attn_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_bias"):
        flash_sparse_attn_func(q, k, v, attn_bias=torch.zeros(shape))


def test_mask_not_bool():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="attn_mask"):
        flash_sparse_attn_func(q, k, v, attn_mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(TypeError, match="attn_mask"):
        flash_sparse_attn_func(q, k, v, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.uint8))


def test_bias_bad_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="attn_bias"):
        flash_sparse_attn_func(q, k, v, attn_bias=torch.zeros(1, 1, 8, 8, dtype=torch.float16))


@pytest.mark.parametrize("d", [0, 257, 264])
def test_head_dim_out_of_range(d):
    q, k, v = qkv(d=d)
    with pytest.raises(ValueError, match="head_dim|query"):
        flash_sparse_attn_func(q, k, v)


def test_head_dim_mismatch():
    q, _, v = qkv()
    k = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="key"):
        flash_sparse_attn_func(q, k, v)


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf])
def test_bad_softmax_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_sparse_attn_func(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("softcap", [-0.5, math.nan])
def test_bad_softcap(softcap):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softcap"):
        flash_sparse_attn_func(q, k, v, softcap=softcap)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="query"):
        flash_sparse_attn_func(q.tolist(), k, v)
    with pytest.raises(TypeError, match="attn_bias"):
        flash_sparse_attn_func(q, k, v, attn_bias=[[0.0]])


def test_block_mask_bad_shape():
    q, k, v = qkv(sq=64, sk=64)
    with pytest.raises(ValueError, match="block_mask"):
        flash_sparse_attn_func(q, k, v, block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool),
                               block_size=16)


@pytest.mark.parametrize("block_size,error", [
    (0, ValueError), (-16, ValueError), ((16, 0), ValueError), ((16,), TypeError),
    ((16, 16, 16), TypeError), (2.5, TypeError), ((16.0, 16), TypeError), (True, TypeError),
    ("16", TypeError)])
def test_bad_block_size_names_block_size(block_size, error):
    """flash_sparse_attn_func and create_block_mask read block_size alike: a positive int or a
    pair of them; anything else is an error naming block_size (it was a tuple unpacking's error,
    or, for 0 and negatives, a block_mask shape or the core's block_m)."""
    from flash_sparse_attn.utils.mask import create_block_mask
    q, k, v = qkv(sq=64, sk=64)
    bias = torch.randn(1, 2, 1, 64)
    blocks = create_block_mask(bias, 64, 2, block_size=16)
    with pytest.raises(error, match="^block_size: "):
        flash_sparse_attn_func(q, k, v, attn_bias=bias, block_mask=blocks, block_size=block_size)
    with pytest.raises(error, match="^block_size: "):
        create_block_mask(bias, 64, 2, block_size=block_size)


def test_block_size_without_block_mask_is_an_error():
    """block_size gives block_mask's tile; alone it was silently ignored, which hides a caller's
    forgotten block_mask (the attention then runs dense). Checked before the topk selection."""
    q, k, v = qkv(sq=64, sk=64)
    bias = torch.randn(1, 2, 1, 64)
    for block_size in (16, (16, 32), 0):
        with pytest.raises(ValueError, match="^block_size: .*block_mask is None"):
            flash_sparse_attn_func(q, k, v, attn_bias=bias, block_size=block_size, topk=8)
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias, block_size=None)
    assert torch.isfinite(out).all()


def test_errors_with_gradients_too():
    q, k, v = (t.requires_grad_() for t in qkv())
    with pytest.raises(TypeError, match="attn_mask"):
        flash_sparse_attn_func(q, k, v, attn_mask=torch.ones(1, 1, 8, 8))


def test_nothing_written_on_rejection():
    q, k, v = qkv()
    out = torch.full_like(q, 7.0)
    lse = torch.full((1, 4, 8), 7.0)
    bad_mask = torch.ones(1, 3, 8, 8, dtype=torch.bool)
    to = torch._C._to_dlpack
    with pytest.raises(ValueError, match="attn_mask"):
        _C.forward(to(q), to(k), to(v), to(bad_mask), None, to(out), to(lse), None, False, 0.0,
                   None, 0)
    assert (out == 7.0).all() and (lse == 7.0).all()


def test_nan_and_inf_stay_in_their_rows():
    q, k, v = qkv(sq=6, sk=9)
    clean = flash_sparse_attn_func(q, k, v)
    q_bad = q.clone()
    q_bad[0, 2, 1] = math.nan  # one row of one head
    bias = torch.zeros(1, 4, 6, 9)
    bias[0, 3, 4, 5] = math.inf
    out = flash_sparse_attn_func(q_bad, k, v, attn_bias=bias)
    assert torch.isnan(out[0, 2, 1]).all()
    untouched = torch.ones(6, 4, dtype=torch.bool)
    untouched[2, 1] = False
    untouched[4, 3] = False
    assert torch.equal(out[0][untouched], clean[0][untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_v_at_dropped_keys_reaches_nothing(dtype):
    # SPEC: a dropped key contributes nothing, also when its V holds NaN / Inf: outputs and every
    # gradient equal those with the value zeroed; rows that keep it get NaN there (issue #13).
    q, k, v = qkv(sq=70, sk=90, dtype=dtype)
    mask = torch.rand(1, 2, 70, 90) < 0.5
    mask[..., 7] = False  # no row keeps key 7
    bad = v.clone()
    bad[0, 7, :, :3] = math.nan
    bad[0, 8, 1, 0] = math.inf  # key 8 is kept by some rows of kv head 1
    clean = bad.masked_fill(~torch.isfinite(bad), 0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, bad)]
    out = flash_sparse_attn_func(*leaves, attn_mask=mask, is_causal=True)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, clean)]
    ref = flash_sparse_attn_func(*ref_leaves, attn_mask=mask, is_causal=True)
    keeps_8 = mask[0, 1, :, 8]  # causality (j <= i + 20) lets every row see key 8
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[0, keeps_8, 2:4, 0] = True  # query heads 2, 3 read kv head 1
    assert keeps_8.any() and not keeps_8.all()
    assert (out[hit] == math.inf).all()
    assert torch.equal(out[~hit], ref.detach()[~hit])
    # Gradients of a call whose only non-finite values sit at key 7 (no row keeps it).
    bad7 = v.clone()
    bad7[0, 7, :, :3] = math.nan
    leaves = [t.clone().requires_grad_(True) for t in (q, k, bad7)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, bad7.nan_to_num(0.0))]
    dout = torch.randn_like(q)
    flash_sparse_attn_func(*leaves, attn_mask=mask, is_causal=True).backward(dout)
    flash_sparse_attn_func(*ref_leaves, attn_mask=mask, is_causal=True).backward(dout)
    for a, b in zip(leaves, ref_leaves):
        assert torch.isfinite(a.grad).all()
        assert torch.equal(a.grad, b.grad)


def test_negative_infinite_bias_acts_as_mask():
    q, k, v = qkv(sq=5, sk=7)
    mask = torch.rand(1, 1, 5, 7) < 0.6
    mask[..., 0] = True
    bias = torch.zeros(1, 1, 5, 7).masked_fill(~mask, -math.inf)
    a = flash_sparse_attn_func(q, k, v, attn_bias=bias)
    b = flash_sparse_attn_func(q, k, v, attn_mask=mask)
    assert (a - b).abs().max().item() < 1e-6


def test_error_kinds_map_to_python_exceptions():
    # kUnsupported -> NotImplementedError (a RuntimeError): a device this build cannot serve.
    assert issubclass(NotImplementedError, RuntimeError)
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError)) as info:
        flash_sparse_attn_func(q, k.half(), v)
    assert "key" in str(info.value)
