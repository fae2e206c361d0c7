"""SPEC.md section 5 and section 7 case 15: the mask utilities (flash_sparse_attn.utils.mask),
against a loop-by-loop oracle written from the SPEC text, on torch tensors and numpy arrays.
Also the block-level selector, end to end through flash_sparse_attn_func(block_mask=...)."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func
from flash_sparse_attn.utils.mask import (
    block_smooth,
    create_block_mask,
    create_mask,
    relu_mask,
    topk_mask,
)

from conftest import attention_math


# ---- oracle: SPEC section 5, one row at a time -----------------------------------------------------


def oracle_smooth_row(row, block):
    row = list(row)
    out = []
    for start in range(0, len(row), block):
        chunk = row[start:start + block]
        keep = 2 * sum(chunk) > len(chunk)
        out.extend([keep] * len(chunk))
    return out


def oracle_mask(bias, mask, kind, window, min_value, block=None):
    """bias, mask: float64 / bool numpy arrays (4-D); min_value already in the bias's dtype."""
    shape = np.broadcast_shapes(bias.shape, mask.shape) if mask is not None else bias.shape
    b_full = np.broadcast_to(bias, shape)
    m_full = np.broadcast_to(mask, shape) if mask is not None else np.ones(shape, dtype=bool)
    out = np.zeros(shape, dtype=bool)
    for idx in itertools.product(*(range(n) for n in shape[:3])):
        filled = np.where(m_full[idx], b_full[idx], min_value)
        if kind == "relu":
            row = filled > 0
        else:
            k = min(window, filled.shape[0])
            # Top-k by value (stable: lower index first among equals), then drop the fill value.
            order = sorted(range(filled.shape[0]), key=lambda j: (-filled[j], j))[:k]
            row = np.zeros(filled.shape[0], dtype=bool)
            for j in order:
                row[j] = filled[j] != min_value
        if block and block > 1:
            row = oracle_smooth_row(row, block)
        out[idx] = row
    return out


def distinct_bias(shape, dtype=torch.float32):
    """Values without ties (ties make top-k's choice unspecified)."""
    n = int(np.prod(shape))
    return (torch.randperm(n).to(torch.float64) / n - 0.5).reshape(shape).to(dtype)


# ---- case 15 -----------------------------------------------------------------------------------


def test_topk_fewer_valid_keys_than_window():
    bias = distinct_bias((2, 3, 1, 20))
    mask = torch.zeros(2, 3, 1, 20, dtype=torch.bool)
    mask[..., 2] = True
    mask[..., 11] = True
    mask[1, 2, 0, 5] = True
    out = create_mask(bias, mask, 2, 1, 20, window_size=8,
                      min_dtype=torch.finfo(torch.float32).min, type="topk")
    assert torch.equal(out, mask), "exactly the valid keys are kept when fewer than window_size"


def test_topk_min_dtype_exclusion():
    min_value = torch.finfo(torch.float32).min
    bias = distinct_bias((1, 1, 1, 12))
    bias[..., 3] = min_value  # unmasked, but equal to the fill: never selected
    bias[..., 7] = min_value
    out = topk_mask(bias, None, window_size=12, min_dtype=min_value)
    expected = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    expected[..., [3, 7]] = False
    assert torch.equal(out, expected)


def test_topk_keeps_window_largest():
    bias = distinct_bias((2, 2, 3, 50))
    out = topk_mask(bias, None, window_size=7, min_dtype=torch.finfo(torch.float32).min)
    assert (out.sum(-1) == 7).all()
    ref = oracle_mask(bias.double().numpy(), None, "topk", 7, float(torch.finfo(torch.float32).min))
    assert np.array_equal(out.numpy(), ref)


def test_block_smooth_majority_and_tail_rule():
    # Length 10, block 4: counts 3 (of 4), 2 (of 4), tail 1 (of 2) -> T, F, F.
    row = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool).view(1, 1, 1, 10)
    result = block_smooth(row, key_len=10, block_size=4)
    assert result is row, "block_smooth works in place and returns its argument"
    expected = [True] * 4 + [False] * 4 + [False] * 2
    assert row.view(-1).tolist() == expected


def test_block_smooth_tail_majority_and_exact_half():
    row = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    block_smooth(row, 11, 4)
    # blocks: [1,0,1,0] half -> F, [1,1,0,1] -> T, tail [1,1,1] -> T
    assert row.tolist() == [False] * 4 + [True] * 4 + [True] * 3


def test_create_mask_2d_query_width_left_padded():
    batch, query_len, key_len = 2, 3, 8
    bias = distinct_bias((batch, 1, query_len, key_len))
    mask_2d = torch.tensor([[True, False, True], [False, True, True]])
    out = create_mask(bias, mask_2d, batch, query_len, key_len, window_size=key_len,
                      min_dtype=torch.finfo(torch.float32).min)
    padded = torch.ones(batch, 1, 1, key_len, dtype=torch.bool)
    padded[:, 0, 0, key_len - query_len:] = mask_2d
    assert torch.equal(out, padded.expand(batch, 1, query_len, key_len))


def test_create_mask_2d_key_width():
    bias = distinct_bias((2, 2, 1, 6))
    mask_2d = torch.rand(2, 6) < 0.5
    out = create_mask(bias, mask_2d, 2, 1, 6, window_size=6,
                      min_dtype=torch.finfo(torch.float32).min)
    assert torch.equal(out, mask_2d.view(2, 1, 1, 6).expand(2, 2, 1, 6))


def test_create_mask_2d_bad_width_raises():
    bias = distinct_bias((2, 1, 4, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        create_mask(bias, torch.ones(2, 5, dtype=torch.bool), 2, 4, 8, 4, -1e30)
    # query width with key_len <= query_len is no padding case either
    with pytest.raises(ValueError, match="attention_mask"):
        create_mask(distinct_bias((2, 1, 8, 4)), torch.ones(2, 8, dtype=torch.bool), 2, 8, 4, 2,
                    -1e30)


def test_relu():
    bias = torch.randn(2, 3, 4, 9)
    mask = torch.rand(1, 3, 1, 9) < 0.6
    out = create_mask(bias, mask, 2, 4, 9, window_size=None, min_dtype=-1e9, type="relu")
    assert torch.equal(out, (bias > 0) & mask)
    out2 = relu_mask(bias, mask, min_dtype=-1e9)
    assert torch.equal(out, out2)
    # a positive fill keeps masked entries, as masked_fill-then-compare does
    out3 = relu_mask(bias, mask, min_dtype=1.0)
    assert torch.equal(out3, (bias > 0) | ~mask.expand_as(bias))


def test_errors():
    bias = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="^type: "):
        create_mask(bias, None, 1, 2, 8, 4, -1e9, type="softmax")
    with pytest.raises(ValueError, match="block_size"):
        create_mask(bias, None, 1, 2, 8, 4, -1e9, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        create_mask(bias, None, 1, 2, 8, 4, -1e9, block_size=-2)
    with pytest.raises(ValueError, match="block_size"):
        block_smooth(torch.ones(1, 8, dtype=torch.bool), 8, 0)
    with pytest.raises(ValueError, match="window_size"):
        topk_mask(bias, None, window_size=-1, min_dtype=-1e9)
    with pytest.raises(TypeError, match="attention_mask"):
        topk_mask(bias, torch.ones(1, 1, 2, 8), window_size=2, min_dtype=-1e9)  # float mask
    with pytest.raises(TypeError, match="attention_bias"):
        topk_mask(torch.ones(1, 1, 2, 8, dtype=torch.int32), None, window_size=2, min_dtype=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        topk_mask(bias, torch.ones(1, 1, 3, 8, dtype=torch.bool), window_size=2, min_dtype=-1e9)
    with pytest.raises(ValueError, match="attention_bias"):
        topk_mask(torch.randn(2, 8), None, window_size=2, min_dtype=-1e9)
    with pytest.raises(TypeError, match="attention_bias"):
        topk_mask([[1.0]], None, window_size=2, min_dtype=-1e9)


# ---- broadcasting, dtypes, layouts ------------------------------------------------------------


BROADCAST_PAIRS = [
    ((2, 4, 3, 17), (2, 4, 3, 17)),
    ((2, 4, 1, 17), (2, 1, 3, 17)),
    ((1, 4, 3, 17), (2, 1, 1, 17)),
    ((2, 1, 3, 17), None),
    ((1, 1, 1, 17), (2, 4, 3, 17)),
    ((2, 4, 3, 17), (1, 1, 1, 1)),
    ((2, 4, 3, 1), (2, 4, 3, 17)),
]


@pytest.mark.parametrize("bias_shape,mask_shape", BROADCAST_PAIRS)
@pytest.mark.parametrize("kind", ["topk", "relu"])
@pytest.mark.parametrize("block", [None, 3])
def test_against_oracle_broadcast(bias_shape, mask_shape, kind, block):
    bias = distinct_bias(bias_shape)
    mask = (torch.rand(mask_shape) < 0.7) if mask_shape else None
    min_value = float(torch.finfo(torch.float32).min)
    out = create_mask(bias, mask, 2, 3, 17, window_size=5, min_dtype=min_value,
                      block_size=block, type=kind)
    ref = oracle_mask(bias.double().numpy(), None if mask is None else mask.numpy(), kind, 5,
                      min_value, block)
    assert out.dtype == torch.bool and tuple(out.shape) == ref.shape
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_default_min(dtype):
    bias = distinct_bias((2, 2, 2, 40), dtype=torch.float64).to(dtype)
    mask = torch.rand(2, 1, 2, 40) < 0.5
    min_value = torch.finfo(dtype).min
    out = topk_mask(bias, mask, window_size=9, min_dtype=min_value)
    # The fill lives in the bias's dtype; the oracle compares in float64 after the same rounding.
    ref = oracle_mask(bias.double().numpy(), mask.numpy(), "topk", 9,
                      float(torch.tensor(min_value, dtype=dtype).double()))
    assert np.array_equal(out.numpy(), ref)
    out_default = create_mask(bias, mask, 2, 2, 40, window_size=9, min_dtype=None)
    assert torch.equal(out, out_default)


def test_ties_keep_exactly_window():
    bias = torch.zeros(1, 1, 2, 30)
    bias[0, 0, 1, ::2] = 1.0
    out = topk_mask(bias, None, window_size=10, min_dtype=-1e9)
    assert (out.sum(-1) == 10).all()
    assert out[0, 0, 1, ::2].sum() == 10  # the ten largest are the ones


def test_nan_bias_ranks_highest_like_torch_topk():
    bias = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10)
    bias[..., 2] = float("nan")
    out = topk_mask(bias, None, window_size=3, min_dtype=-1e9)
    assert out.view(-1).nonzero().view(-1).tolist() == [2, 8, 9]


def test_window_larger_than_keys_keeps_every_valid_entry():
    bias = torch.randn(1, 2, 1, 6)
    mask = torch.rand(1, 2, 1, 6) < 0.5
    out = topk_mask(bias, mask, window_size=100, min_dtype=-1e30)
    assert torch.equal(out, mask)


def test_strided_and_expanded_inputs_are_read_in_place():
    base = torch.randn(2, 3, 16, 40)
    bias = base.transpose(2, 3)[..., :16, :].transpose(2, 3)  # non-contiguous view
    key_mask = torch.rand(2, 1, 1, 16) < 0.5
    mask = key_mask.expand(2, 3, 16, 16)  # stride-0 view
    out = topk_mask(bias[..., :16], mask, window_size=4, min_dtype=-1e30)
    ref = topk_mask(bias[..., :16].contiguous(), mask.contiguous(), window_size=4,
                    min_dtype=-1e30)
    assert torch.equal(out, ref)


def test_bias_requiring_grad_is_detached():
    bias = torch.randn(1, 1, 4, 8, requires_grad=True)
    out = create_mask(bias, None, 1, 4, 8, 3, -1e30)
    assert not out.requires_grad and out.dtype == torch.bool


def test_outputs_follow_the_input_without_warnings():
    """Results are allocated where the input lives (CUDA tensors: tests/gpu), with no warning."""
    bias = distinct_bias((2, 2, 3, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [create_mask(bias, torch.ones(2, 16, dtype=torch.bool), 2, 3, 16, 4, -1e30),
                create_mask(bias, None, 2, 3, 16, None, -1e30, type="relu", block_size=2),
                create_block_mask(bias[:, :, :1], 3, 1, block_size=4)]
    for out in outs:
        assert isinstance(out, torch.Tensor) and out.device == bias.device


def test_extension_takes_a_stream_and_ignores_it_on_the_cpu():
    """The bindings take the caller's CUDA stream (an integer, default 0) on every mask utility."""
    bias = distinct_bias((1, 1, 2, 10))
    expected = topk_mask(bias, None, window_size=3, min_dtype=-1e30)
    out = torch.empty(1, 1, 2, 10, dtype=torch.bool)
    _C.dynamic_mask(bias, None, "topk", 3, -1e30, 1, out, stream=0)
    assert torch.equal(out, expected)
    _C.block_smooth(out, 2, stream=0)
    assert torch.equal(out, block_smooth(expected.clone(), 10, 2))
    wide = torch.empty(1, 1, 1, 10, dtype=torch.bool)
    _C.expand_mask_2d(torch.ones(1, 10, dtype=torch.bool), 1, 10, wide, stream=0)
    assert wide.all()
    blocks = torch.empty(1, 1, 1, 3, dtype=torch.bool)
    _C.select_blocks(bias[:, :, :1], 2, 4, 4, 1, "max", False, blocks, stream=0)
    assert blocks.sum() == 1


def test_block_smooth_rejects_expanded_views():
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool).expand(2, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        block_smooth(mask, 8, 2)


def test_block_smooth_on_strided_view():
    base = torch.rand(3, 20) < 0.5
    view = base[:, ::2]  # stride 2 along keys
    expected = torch.tensor([oracle_smooth_row(r, 3) for r in view.tolist()])
    block_smooth(view, 10, 3)
    assert torch.equal(base[:, ::2], expected)


def test_large_row_matches_oracle_statistics():
    bias = torch.randn(1, 8, 1, 65536)
    out = topk_mask(bias, None, window_size=2048, min_dtype=-1e30)
    assert (out.sum(-1) == 2048).all()
    kth = torch.topk(bias, 2048, dim=-1).values[..., -1:]
    assert torch.equal(out, bias >= kth)


# ---- numpy path --------------------------------------------------------------------------------


def test_numpy_inputs():
    rng = np.random.default_rng(0)
    bias = rng.permutation(4 * 30).reshape(1, 2, 2, 30).astype(np.float32)
    mask = np.broadcast_to(rng.random((1, 1, 1, 30)) < 0.6, (1, 2, 2, 30))  # read-only view
    out = create_mask(bias, mask, 1, 2, 30, window_size=6, min_dtype=np.finfo(np.float32).min)
    assert isinstance(out, np.ndarray) and out.dtype == np.bool_
    ref = oracle_mask(bias.astype(np.float64), mask, "topk", 6,
                      float(np.finfo(np.float32).min))
    assert np.array_equal(out, ref)
    row = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    block_smooth(row, 10, 4)
    assert row.tolist() == [True] * 4 + [False] * 6


# ---- block-level selector ------------------------------------------------------------------------


def oracle_blocks(bias, query_len, top_k, bm, bn, causal, reduce):
    """bias (Bb, Hb, 1 | Sq, Sk) float64 numpy."""
    bb, hb, _, sk = bias.shape
    mb, nb = -(-query_len // bm), -(-sk // bn)
    out = np.zeros((bb, hb, mb, nb), dtype=bool)
    for b, h, m in itertools.product(range(bb), range(hb), range(mb)):
        r0, r1 = m * bm, min(query_len, (m + 1) * bm)
        rows = bias[b, h, 0:1] if bias.shape[2] == 1 else bias[b, h, r0:r1]
        scores = []
        for n in range(nb):
            vals = rows[:, n * bn:(n + 1) * bn]
            s = vals.max() if reduce == "max" else vals.mean()
            scores.append(s)
        required = set()
        candidates = list(range(nb))
        if causal:
            diag_last = r1 - 1 + sk - query_len
            if diag_last < 0:
                continue
            diag_first = max(r0 + sk - query_len, 0)
            required = set(range(diag_first // bn, diag_last // bn + 1))
            candidates = list(range(diag_first // bn))
        candidates = [n for n in candidates if scores[n] > -math.inf]
        chosen = sorted(candidates, key=lambda n: (-scores[n], n))[:top_k]
        for n in set(chosen) | required:
            out[b, h, m, n] = True
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("sq,sk,bm,bn", [(100, 100, 16, 16), (37, 130, 8, 16), (130, 37, 16, 8),
                                          (1, 257, 64, 32)])
def test_block_selector_against_oracle(causal, reduce, sq, sk, bm, bn):
    bias = distinct_bias((2, 3, 1, sk), dtype=torch.float64)
    out = create_block_mask(bias, sq, num_blocks=3, block_size=(bm, bn), is_causal=causal,
                            reduce=reduce)
    ref = oracle_blocks(bias.numpy(), sq, 3, bm, bn, causal, reduce)
    assert out.shape == ref.shape
    assert np.array_equal(out.numpy(), ref)


def test_block_selector_full_query_bias_and_masked_keys():
    bias = distinct_bias((1, 2, 40, 64), dtype=torch.float32)
    bias[..., 16:32] = -math.inf  # a key block that never competes
    out = create_block_mask(bias, 40, num_blocks=2, block_size=(8, 16))
    ref = oracle_blocks(bias.double().numpy(), 40, 2, 8, 16, False, "max")
    assert np.array_equal(out.numpy(), ref)
    assert not out[..., 1].any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s,tile", [(96, (16, 16)), (600, None)])
def test_block_mask_end_to_end(causal, s, tile):
    """flash_sparse_attn_func(block_mask=...) equals dense attention with the block selection
    expanded to an element mask (tile None: both sides' default, 128 x 128)."""
    b, h, hk, d = 2, 4, 2, 32
    bm, bn = tile or (128, 128)
    kwargs = {} if tile is None else {"block_size": tile}
    q = torch.randn(b, s, h, d)
    k = torch.randn(b, s, hk, d)
    v = torch.randn(b, s, hk, d)
    bias = torch.randn(b, hk, 1, s)
    blocks = create_block_mask(bias, s, num_blocks=2, is_causal=causal, **kwargs)
    assert blocks.shape == (b, hk, -(-s // bm), -(-s // bn))
    dense = blocks.repeat_interleave(bm, dim=2).repeat_interleave(bn, dim=3)[:, :, :s, :s]
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=causal, block_mask=blocks,
                                 **kwargs)
    ref, _ = attention_math(q.double(), k.double(), v.double(), mask=dense, bias=bias.double(),
                            causal=causal)
    assert (out.double() - ref).abs().max().item() < 1e-5
    # and with gradients (the plan with the block selection is reused by backward)
    qg = q.clone().requires_grad_()
    out2 = flash_sparse_attn_func(qg, k, v, attn_bias=bias, is_causal=causal, block_mask=blocks,
                                  **kwargs)
    out2.sum().backward()
    qr = q.double().clone().requires_grad_()
    ref2, _ = attention_math(qr, k.double(), v.double(), mask=dense, bias=bias.double(),
                             causal=causal)
    ref2.sum().backward()
    assert (qg.grad.double() - qr.grad).abs().max().item() < 1e-5


def test_block_selector_errors():
    bias = torch.randn(1, 2, 1, 64)
    with pytest.raises(ValueError, match="reduce"):
        create_block_mask(bias, 64, 2, reduce="median")
    with pytest.raises(ValueError, match="^num_blocks: "):
        create_block_mask(bias, 64, -1)
    with pytest.raises(TypeError, match="^num_blocks: "):
        create_block_mask(bias, 64, 2.5)  # was truncated to 2
    with pytest.raises(TypeError, match="^query_len: "):
        create_block_mask(bias, 64.0, 2)
    with pytest.raises(ValueError, match="attention_bias"):
        create_block_mask(torch.randn(1, 2, 3, 64), 64, 2)  # query dim neither 1 nor query_len
    with pytest.raises(ValueError, match="block_size"):
        create_block_mask(bias, 64, 2, block_size=0)


def _exact_topk_rows(filled, k, fill):
    """Top-k per row by (value desc, index asc), then entries equal to the fill dropped: the tie
    rule the core documents. filled: (rows, n) float64 numpy without NaN."""
    rows, n = filled.shape
    out = np.zeros((rows, n), dtype=bool)
    idx = np.arange(n)
    for r in range(rows):
        order = np.lexsort((idx, -filled[r]))[:min(k, n)]
        out[r, order] = True
    return out & (filled != fill)


@pytest.mark.parametrize("n", [4097, 65536])
@pytest.mark.parametrize("dist", ["normal", "narrow", "duplicates", "ascending", "descending",
                                  "constant"])
@pytest.mark.parametrize("k", [1, 100, 2048, 4096])
def test_large_rows_exact(n, dist, k):
    """Rows long enough for the sampled lower bound, on distributions that stress it."""
    g = torch.Generator().manual_seed(n + k)
    if dist == "normal":
        bias = torch.randn(3, n, generator=g)
    elif dist == "narrow":  # every value in [1, 1 + 2^-10): one exponent, few mantissa bits
        bias = 1 + torch.rand(3, n, generator=g) / 1024
    elif dist == "duplicates":
        bias = torch.randint(0, 7, (3, n), generator=g).float()
    elif dist == "ascending":
        bias = torch.arange(n).float().repeat(3, 1)
    elif dist == "descending":
        bias = torch.arange(n, 0, -1).float().repeat(3, 1)
    else:
        bias = torch.full((3, n), 0.5)
    mask = torch.rand(3, n, generator=g) < 0.9
    mask[2] = torch.rand(n, generator=g) < 0.01  # fewer valid keys than k in this row
    fill = float(torch.finfo(torch.float32).min)
    out = topk_mask(bias.view(3, 1, 1, n), mask.view(3, 1, 1, n), window_size=k, min_dtype=fill)
    filled = torch.where(mask, bias, torch.tensor(fill)).double().numpy()
    assert np.array_equal(out.view(3, n).numpy(), _exact_topk_rows(filled, k, fill))
