"""NaN / Inf stored in V at dropped keys on CUDA (issue #13): a dropped key contributes nothing.

Partial tiles (element masks, the causal diagonal, key masks on the block map, decode, head dim
256 on the sm80 kernel) used to pass 0 x NaN = NaN from the tensor cores to every row of the tile.
Expected values come from float64 attention over V with the non-finite values replaced by 0, then,
per output element, NaN where a kept key's V value is NaN (or both infinities meet), +-inf where
only one infinity is kept: exactly what IEEE arithmetic gives over the kept keys alone.
"""

import math

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func

from test_cuda_forward import SEED, attention, expand_heads, gen, qkv, randn  # noqa: F401 (gen)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)
DTYPES = [torch.bfloat16, torch.float16]


def keep_of(mask, causal, B, H, Sq, Sk, device):
    keep = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & expand_heads(mask, H)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        keep = keep & (j <= i + Sk - Sq)
    return keep


def poison(v, keys, gen):
    """v with NaN in some head dims of `keys` (every kv head), +inf and -inf in one each."""
    bad = v.clone()
    D = v.shape[-1]
    for n, j in enumerate(keys):
        dims = torch.randperm(D, generator=gen, device=v.device)[: max(1, D // 4)]
        value = (math.nan, math.inf, -math.inf)[n % 3]
        bad[:, j, :, dims] = value
    return bad


def expected(q, k, v_bad, mask, causal, scale, bias=None):
    """(expected out with NaN / +-inf where IEEE arithmetic over the kept keys puts them, the
    naive same-dtype out over the cleaned V, the float64 one over the cleaned V)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    nonfinite = ~torch.isfinite(v_bad)
    v_clean = v_bad.masked_fill(nonfinite, 0)
    ref, _ = attention(q, k, v_clean, mask, bias, scale, causal, 0.0, torch.float64)
    naive, _ = attention(q, k, v_clean, mask, bias, scale, causal, 0.0, q.dtype)
    keep = keep_of(mask, causal, B, H, Sq, Sk, q.device).double()  # (B, H, Sq, Sk)
    vh = expand_heads(v_bad.transpose(1, 2), H)  # (B, H, Sk, D)

    def reaches(flag):  # (B, Sq, H, D): some kept key has `flag` in that column
        return (keep @ flag.double() > 0).transpose(1, 2)

    nan, pos, neg = reaches(vh.isnan()), reaches(vh == math.inf), reaches(vh == -math.inf)
    want = ref.clone()
    want[pos] = math.inf
    want[neg] = -math.inf
    want[nan | (pos & neg)] = math.nan
    return want, naive, ref


def check(q, k, v_bad, mask=None, causal=False, label="", bias=None, ours=None):
    """ours: keyword arguments that select `mask`'s entries for our call instead of it."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    want, naive, ref = expected(q, k, v_bad, mask, causal, scale, bias)
    how = {"attn_mask": mask} if ours is None else ours
    out = flash_sparse_attn_func(q, k, v_bad, attn_bias=bias, is_causal=causal, **how).double()
    where = f"{label} seed={SEED} dtype={q.dtype} D={q.shape[-1]}"
    special = ~torch.isfinite(want)
    assert special.any(), f"the case must keep some non-finite value: {where}"
    assert (~torch.isfinite(ref)).sum() == 0
    assert torch.equal(out.isnan(), want.isnan()), \
        f"NaN where none is kept, or missing ({(out.isnan() != want.isnan()).sum().item()}): {where}"
    inf = want.isinf()
    assert torch.equal(out[inf], want[inf]), f"infinities differ: {where}"
    finite = ~special
    assert torch.isfinite(out[finite]).all(), f"a dropped non-finite value reached a row: {where}"
    err = (out[finite] - ref[finite]).abs().max().item()
    naive_err = (naive.double()[finite] - ref[finite]).abs().max().item()
    assert err <= 2 * naive_err + 1e-4, f"error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_element_mask_partial_tiles(dtype, D, causal, gen):
    B, Sq, Sk, H, Hk = 1, 200, 300, 4, 2
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    mask = torch.rand(B, Hk, Sq, Sk, generator=gen, device="cuda") < 0.5
    keys = [3, 70, 71, 150, 299]  # first, middle and last tiles
    mask[..., 71] = False  # one key no row keeps
    check(q, k, poison(v, keys, gen), mask, causal, "element mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_causal_diagonal(dtype, D, gen):
    # Dense causal: only the diagonal tiles are partial; a key there is kept by the rows below it.
    q, k, v = qkv(2, 256, 256, 4, 4, D, dtype, gen)
    check(q, k, poison(v, [5, 64 + 33, 200], gen), None, True, "causal diagonal")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_causal_v_checked_ahead(dtype, D, gen):
    # More query tiles than SMs: the persistent Hopper forward checks V once before it runs and
    # its partial tiles skip their scan when V holds no NaN / Inf. Here V holds some (the first
    # key, a middle one, the ragged last tile's last key), read through a strided view (every
    # other kv head of a wider tensor): the check must find them there, or they reach the rows
    # that causality hides them from.
    B, S, H, Hk = 1, 2000, 16, 4
    tiles = H * math.ceil(S / 128)
    assert tiles > torch.cuda.get_device_properties(0).multi_processor_count
    q, k, _ = qkv(B, S, S, H, Hk, D, dtype, gen)
    wide = randn(B, S, 2 * Hk, D, dtype=dtype, gen=gen)
    wide[:, :, 1::2] = poison(wide[:, :, 1::2].contiguous(), [0, 1000, S - 1], gen)
    check(q, k, wide[:, :, 1::2], None, True, "causal, V checked ahead")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq", [1, 3, 96])
def test_key_mask_block_map_and_decode(dtype, Sq, gen):
    # Under 128 query rows a key mask runs on the block map (no compaction); Sq = 1 is decode.
    B, Sk, H, Hk, D = 2, 1000, 8, 2, 128
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    mask = torch.rand(B, Hk, 1, Sk, generator=gen, device="cuda") < 0.3
    keys = [10, 11, 400, 999]
    mask[..., 11] = True
    mask[..., 10] = False
    check(q, k, poison(v, keys, gen), mask, False, "key mask")


@pytest.mark.parametrize("dtype", DTYPES)
def test_compacted_keys_kept_and_dropped(dtype, gen):
    # Compacted keys (>= 128 query rows): a dropped key is never gathered; a kept one is, and the
    # rows that causality hides it from must stay finite (the gather flags V, and the forward's
    # partial tiles then check their V tiles).
    B, Sq, Sk, H, Hk, D = 1, 300, 300, 4, 2, 128
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    mask = torch.rand(B, Hk, 1, Sk, generator=gen, device="cuda") < 0.3
    keys = [10, 11, 150, 151, 290]
    mask[..., [11, 151, 290]] = True
    mask[..., [10, 150]] = False
    check(q, k, poison(v, keys, gen), mask, True, "compacted key mask")


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_topk_compacted(dtype, gen):
    # Per-row top-k over compacted keys: a poisoned key that some rows keep and later rows drop
    # (better keys arrive), one that no row keeps, and one kept to the end.
    from flash_sparse_attn.utils.mask import create_mask
    B, Sq, Sk, H, Hk, D, w = 1, 300, 300, 4, 2, 128, 20
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
    bias[..., 40] = 1.0   # kept from row 40 until 20 better keys have arrived
    bias[..., 41] = -5.0  # never among the top 20 of its prefix
    bias[..., 42] = 9.0   # kept by every row from 42 on
    causal = torch.ones(Sq, Sk, dtype=torch.bool, device="cuda").tril()[None, None]
    mask = create_mask(bias, causal, B, Sq, Sk, w, torch.finfo(dtype).min)
    assert mask[0, :, 40:, 40].any() and not mask[0, :, -1, 40].any()
    assert not mask[..., 41].any() and mask[0, :, 42:, 42].all()
    check(q, k, poison(v, [40, 41, 42], gen), mask, True, "per-row top-k", bias=bias,
          ours={"topk": w, "topk_causal": True})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_gradients_ignore_dropped_nonfinite_v(dtype, D, gen):
    # Keys no row keeps, inside partial tiles: every gradient equals the one over V with those
    # rows zeroed (float64 autograd), bias gradient included.
    B, Sq, Sk, H, Hk = 1, 192, 256, 4, 2
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    mask = torch.rand(B, Hk, Sq, Sk, generator=gen, device="cuda") < 0.6
    keys = [2, 65, 130, 255]
    mask[..., keys] = False
    bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
    v_bad = poison(v, keys, gen)
    v_clean = v_bad.masked_fill(~torch.isfinite(v_bad), 0)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(D)

    def grads(values, dtype_, ours):
        leaves = [x.detach().to(dtype_).requires_grad_(True) for x in (q, k, values, bias)]
        if ours:
            out = flash_sparse_attn_func(leaves[0], leaves[1], leaves[2], attn_mask=mask,
                                         attn_bias=leaves[3])
        else:
            out = attention(leaves[0], leaves[1], leaves[2], mask, leaves[3], scale, False, 0.0,
                            dtype_)[0]
        out.backward(dout.to(dtype_))
        return [out.detach()] + [x.grad for x in leaves]

    ours = grads(v_bad, dtype, True)
    ref = grads(v_clean, torch.float64, False)
    naive = grads(v_clean, dtype, False)
    for name, a, r, n in zip(("out", "dq", "dk", "dv", "dbias"), ours, ref, naive):
        where = f"{name} seed={SEED} dtype={dtype} D={D}"
        assert torch.isfinite(a).all(), f"non-finite {where}"
        err = (a.double() - r).abs().max().item()
        naive_err = (n.double() - r).abs().max().item()
        assert err <= 2 * naive_err + 1e-3, f"error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"
    assert (ours[3][:, keys] == 0).all(), "dV of a key no row keeps is exactly 0"
