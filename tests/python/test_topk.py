"""`topk=` (keys selected by the bias without a caller-built mask) and compacted keys (a key-only
mask's plan lists the kept keys) through the Python API on CPU tensors: the SPEC pass rule against
float64, the same result as create_mask + attn_mask, the plan's choice, and errors."""

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func
from flash_sparse_attn import flash_sparse_attn_interface as fi
from flash_sparse_attn.utils.mask import create_mask

from conftest import run_case

HALF = [torch.float16, torch.bfloat16]


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def qkv(b, sq, sk, h, hk, d, dtype):
    return (rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype),
            rand(b, sk, hk, d, dtype=dtype))


def plan_of(q, k, mask, causal, mode="auto"):
    return _C.make_plan(torch.utils.dlpack.to_dlpack(q), torch.utils.dlpack.to_dlpack(k),
                        None if mask is None else torch.utils.dlpack.to_dlpack(mask), causal,
                        compact_keys=mode)


@pytest.mark.parametrize("dtype", HALF)
def test_topk_runs_create_masks_keys(dtype):
    """Doge's call: bias (B, Hk, 1, S), causal, the top-w keys per (batch, kv head)."""
    b, s, h, hk, d, w = 2, 300, 4, 2, 32, 40
    q, k, v = qkv(b, s, s, h, hk, d, dtype)
    bias = rand(b, hk, 1, s, dtype=dtype)
    bias[..., 10:20] = bias[..., 30:40]  # ties: the lower key index wins in both
    mask = create_mask(bias, None, b, s, s, w, torch.finfo(dtype).min)
    assert mask.shape == (b, hk, 1, s) and int(mask.sum()) == b * hk * w
    results = []
    for how in ({"attn_mask": mask}, {"topk": w}):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True, **how)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, causal=True)


@pytest.mark.parametrize("dtype", HALF)
def test_topk_with_a_key_mask_selects_among_allowed_keys(dtype):
    b, s, h, d, w = 1, 200, 2, 32, 30
    q, k, v = qkv(b, s, s, h, h, d, dtype)
    bias = rand(b, h, 1, s, dtype=dtype)
    allowed = torch.rand(b, 1, 1, s) < 0.5
    out = flash_sparse_attn_func(q, k, v, attn_mask=allowed, attn_bias=bias, topk=w)
    mask = create_mask(bias, allowed, b, s, s, w, torch.finfo(dtype).min)
    assert not (mask & ~allowed).any()
    assert torch.equal(out, flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias))


def test_key_masks_are_compacted_from_one_query_tile():
    q, k, _ = qkv(1, 128, 512, 2, 2, 32, torch.bfloat16)
    mask = torch.rand(1, 2, 1, 512) < 0.1
    assert plan_of(q, k, mask, True).compacted
    assert not plan_of(q[:, :127], k, mask, True).compacted        # decode-like: block map
    assert not plan_of(q, k, mask, True, "never").compacted
    assert not plan_of(q, k, mask.expand(1, 2, 128, 512).contiguous(), True).compacted
    assert plan_of(q, k, mask, True).compacted_tile_fraction() < 0.5
    with pytest.raises(ValueError, match="compact_keys"):
        plan_of(q, k, mask, True, "sometimes")


@pytest.mark.parametrize("dtype", HALF)
def test_compacted_plan_matches_reference_with_gqa_and_bias_grad(dtype):
    q, k, v = qkv(2, 200, 333, 8, 2, 32, dtype)
    bias = rand(2, 2, 1, 333, dtype=dtype)
    mask = create_mask(bias, None, 2, 200, 333, 50, torch.finfo(dtype).min)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, causal=True)


def test_topk_errors():
    q, k, v = qkv(1, 16, 16, 2, 2, 8, torch.bfloat16)
    bias = rand(1, 2, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="topk"):
        flash_sparse_attn_func(q, k, v, topk=4)
    with pytest.raises(ValueError, match="topk"):
        flash_sparse_attn_func(q, k, v, attn_bias=bias, topk=0)
    with pytest.raises(TypeError, match="topk"):
        flash_sparse_attn_func(q, k, v, attn_bias=bias, topk=True)
    with pytest.raises(ValueError, match="attn_bias"):
        flash_sparse_attn_func(q, k, v, attn_bias=bias[..., :8], topk=4)


def causal_mask(sq, sk):
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    return (j <= i + sk - sq)[None, None]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sq,sk", [(300, 300), (150, 333), (333, 150)])
def test_topk_causal_runs_create_masks_per_row_keys(dtype, sq, sk):
    """Per-row causal top-k (create_mask given the causal 4-D mask), as thresholds: the same
    output and gradients as passing create_mask's (B, Hk, Sq, Sk) mask, ties included."""
    b, h, hk, d, w = 2, 4, 2, 32, 25
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype)
    bias = rand(b, hk, 1, sk, dtype=dtype)
    bias[..., 5:40] = bias[..., 45:80].flip(-1)  # ties across the causal frontier
    bias[0, 0, 0, 7] = torch.finfo(dtype).min   # a fill-valued entry is never kept
    mask = create_mask(bias, causal_mask(sq, sk), b, sq, sk, w, torch.finfo(dtype).min)
    results = []
    for how in ({"attn_mask": mask}, {"topk": w, "topk_causal": True}):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True, **how)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for name, ours, theirs in zip(("out", "dq", "dk", "dv", "dbias"), *results):
        assert (ours.float() - theirs.float()).abs().max().item() <= 1e-2 * max(
            1.0, theirs.float().abs().max().item()), name
    run_case(lambda *a, **kw: flash_sparse_attn_func(*a, topk=w, topk_causal=True,
                                                     **{**kw, "attn_mask": None}),
             q, k, v, mask=mask, bias=bias, causal=True)


def test_topk_causal_errors():
    q, k, v = qkv(1, 16, 16, 2, 2, 8, torch.bfloat16)
    bias = rand(1, 2, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="topk_causal"):
        flash_sparse_attn_func(q, k, v, attn_bias=bias, topk=4, topk_causal=True)  # not causal
    with pytest.raises(ValueError, match="topk_causal"):
        flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True, topk_causal=True)
    full = rand(1, 2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="attn_bias"):  # a bias with a query dim
        flash_sparse_attn_func(q, k, v, attn_bias=full, is_causal=True, topk=4, topk_causal=True)


def test_max_kept_keys_bounds_the_compacted_keys_and_is_checked():
    q, k, v = qkv(1, 200, 300, 2, 2, 16, torch.bfloat16)
    mask = torch.zeros(1, 2, 1, 300, dtype=torch.bool)
    mask[..., ::10] = True  # 30 keys per head
    bias = rand(1, 2, 1, 300, dtype=torch.bfloat16)
    dl = torch.utils.dlpack.to_dlpack
    outs = []
    for bound in (0, 30, 64):
        plan = _C.make_plan(dl(q), dl(k), dl(mask), True, compact_keys="always", max_kept_keys=bound)
        assert plan.compacted
        out = torch.empty_like(q)
        _C.forward(dl(q), dl(k), dl(v), dl(mask), dl(bias), dl(out), None, None, True, 0.0, plan, 0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="max_kept_keys"):
        _C.make_plan(dl(q), dl(k), dl(mask), True, compact_keys="always", max_kept_keys=29)


def test_topk_causal_plans_compact_the_keys_some_row_keeps():
    """From 128 query rows a per-row top-k plan runs over the keys some row keeps (each with the
    last row that keeps it): visible in the plan, fewer tiles than the causal triangle, and the
    same result as the thresholds over the block map (compact_keys='never')."""
    q, k, v = qkv(1, 512, 512, 2, 2, 16, torch.float32)
    bias = rand(1, 2, 1, 512, dtype=torch.float32)
    dl = torch.utils.dlpack.to_dlpack
    fill = float(torch.finfo(torch.float32).min)

    def plan(q_, mode):
        return _C.make_plan(dl(q_), dl(k), None, True, compact_keys=mode, topk_bias=dl(bias),
                            topk=32, topk_min_value=fill)

    compacted = plan(q, "auto")
    assert compacted.compacted
    # The causal triangle is half the tiles; random biases keep about w (1 + ln(S / w)) per row.
    assert compacted.compacted_tile_fraction() < 0.35
    assert compacted.gathered_tile_fraction() == 0.0  # gathered lists: CUDA plans only
    assert compacted.dkv_tile_fraction() == 0.0  # and the dK/dV groups
    assert not plan(q, "never").compacted
    assert not plan(q[:, :100], "auto").compacted  # under one query tile: the block map
    outs = []
    for p in (compacted, plan(q, "never")):
        out = torch.empty_like(q)
        _C.forward(dl(q), dl(k), dl(v), None, dl(bias), dl(out), None, None, True, 0.0, p, 0)
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


# ---- masks whose rows are one interval per key (the plan's mask_key_intervals) ------------------


def band_mask(sq, sk, width):
    """A causal sliding window: key j is kept by rows j .. j + width - 1 (bottom-right)."""
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    return ((j <= i) & (j > i - width))[None, None]


def random_runs(b, h, sq, sk, max_rows, gen):
    """Each key kept by one run of rows starting anywhere (or by none)."""
    first = torch.randint(0, sq, (b, h, 1, sk), generator=gen)
    rows = torch.randint(1, max_rows + 1, (b, h, 1, sk), generator=gen)
    i = torch.arange(sq)[:, None]
    keep = torch.rand(b, h, 1, sk, generator=gen) < 0.8
    return (i >= first) & (i < first + rows) & keep


def intervals_of(mask, causal, q, k):
    dl = torch.utils.dlpack.to_dlpack
    return _C.mask_rows_are_intervals(dl(q), dl(k), dl(mask), causal)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("which", ["create_mask", "band", "runs"])
def test_interval_masks_run_over_their_keys(dtype, which):
    """A (B, H, Sq, Sk) mask whose rows are one interval per key (create_mask's per-row causal
    top-k, a sliding window, arbitrary runs): the check says so, the call's plan compacts the
    keys, and output, LSE and every gradient pass the rule against float64."""
    gen = torch.Generator().manual_seed(7)
    b, sq, sk, h, hk, d = 2, 260, 300, 4, 2, 32
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype)
    bias = rand(b, hk, 1, sk, dtype=dtype)
    if which == "create_mask":
        mask = create_mask(bias, causal_mask(sq, sk), b, sq, sk, 30, torch.finfo(dtype).min)
    elif which == "band":
        mask = band_mask(sq, sk, 50)
    else:
        mask = random_runs(b, hk, sq, sk, 70, gen)
    assert intervals_of(mask, True, q, k)
    dl = torch.utils.dlpack.to_dlpack
    plan = _C.make_plan(dl(q), dl(k), dl(mask), True, mask_key_intervals=True)
    assert plan.compacted and plan.compacted_tile_fraction() < 0.6
    run_case(flash_sparse_attn_func, q, k, v, mask=mask, bias=bias, causal=True)
    # The call's own (cached) plan: checked once, compacted.
    assert fi._plan_for_call(q, k, mask, True, None, None, None, bias).compacted


def test_a_mask_that_is_not_intervals_keeps_the_block_map():
    q, k, v = qkv(1, 200, 200, 2, 2, 16, torch.float32)
    mask = torch.rand(1, 2, 200, 200) < 0.3
    assert not intervals_of(mask, False, q, k)
    assert intervals_of(mask.any(-2, keepdim=True).expand(1, 2, 200, 200), False, q, k)
    dl = torch.utils.dlpack.to_dlpack
    with pytest.raises(ValueError, match="attn_mask"):  # the CPU plan checks the promise
        _C.make_plan(dl(q), dl(k), dl(mask), False, mask_key_intervals=True)
    with pytest.raises(ValueError, match="mask_key_intervals"):
        _C.make_plan(dl(q), dl(k), None, False, mask_key_intervals=True)
    run_case(flash_sparse_attn_func, q, k, v, mask=mask)
    assert not fi._plan_for_call(q, k, mask, False, None, None, None).compacted
