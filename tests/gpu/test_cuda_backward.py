"""CUDA backward against float64 PyTorch autograd on the GPU: SPEC section 7 backward cases.

Gradients of q, k, v and the bias (in the bias's own shape) through flash_sparse_attn_func's
autograd; the pass rule is SPEC's (max|ours - ref| <= 2 max|naive same-dtype - ref| + atol, no
NaN, exact zeros where no kept entry contributes). The CUDA backward covers head dims up to 256.
"""

import itertools
import math

import pytest
import torch

from flash_sparse_attn import (_C, cuda_memory_reserved, flash_sparse_attn_func,
                               release_cuda_memory)
from flash_sparse_attn.utils.mask import create_mask

from test_cuda_forward import SEED, attention, qkv, randn
from test_cuda_forward import kernel_names as cuda_kernel_names

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def gen():
    g = torch.Generator(device="cuda")
    g.manual_seed(SEED)
    return g


def grads_of(fn, inputs, dout):
    for t in inputs:
        if t is not None:
            t.grad = None
    out = fn()
    out.backward(dout)
    return [None if t is None else t.grad for t in inputs]


def check_backward(q, k, v, mask=None, bias=None, causal=False, softcap=0.0, label="",
                   selection=None, deterministic=False, ours_how=None, ours_call=None,
                   bias_grad=True, scale=None):
    """`selection` = (block_mask, block_size): ours runs with that block selection instead of
    `mask`, which must then be the selection expanded to entries (the reference's mask).
    `ours_how`: keyword arguments that select the same entries for ours instead of `mask` (e.g.
    topk=w, topk_causal=True). `ours_call(q, k, v, bias)`: ours as another call that keeps the
    entries of `mask` and `causal` (e.g. packed sequences), returning (B, Sq, H, D).
    `bias_grad=False`: the bias does not require grad (no dbias, in ours or the reference).
    `scale`: softmax_scale (default 1 / sqrt(D), which ours is then left to pick)."""
    explicit_scale = {} if scale is None else {"softmax_scale": scale}
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn_like(q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_(bias_grad)
    how = ({"attn_mask": mask} if selection is None else
           {"block_mask": selection[0], "block_size": selection[1]})
    if ours_how is not None:
        how = ours_how
    if ours_call is None:
        def ours_call(q_, k_, v_, b_):
            return flash_sparse_attn_func(q_, k_, v_, attn_bias=b_, is_causal=causal,
                                          softcap=softcap or None, deterministic=deterministic,
                                          **explicit_scale, **how)
    ours = grads_of(lambda: ours_call(*leaves, bias_leaf), leaves + [bias_leaf], dout)

    def reference(dtype):
        ls = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        bl = None if bias is None else bias.detach().to(dtype).requires_grad_(bias_grad)
        return grads_of(lambda: attention(*ls, mask, bl, scale, causal, softcap, dtype)[0].to(dtype),
                        ls + [bl], dout.to(dtype))

    ref = reference(torch.float64)
    naive = reference(q.dtype)
    where = f"{label} seed={SEED} dtype={q.dtype}"
    unit = 2.0 ** -9 if q.dtype == torch.bfloat16 else 2.0 ** -12  # half a unit roundoff
    atol = {name: unit * (r.abs().max().item() if r is not None else 0.0)
            for name, r in zip(("dq", "dk", "dv"), ref[:3])}
    if bias is not None and bias_grad:
        # A reduced dbias is a sum of dS terms whose rounding error follows sum |dS|, not |dbias|
        # (a key-dim-1 or scalar bias's gradient is 0 by cancellation): its scale is the largest
        # sum of |dS| over the reduced dims, from the float64 dS of the full (B, H, Sq, Sk) bias.
        B, Sq, H, _ = q.shape
        full = bias.detach().double().repeat_interleave(H // bias.shape[1], 1)
        full = full.expand(B, H, Sq, k.shape[1]).clone().requires_grad_(True)
        ls = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
        attention(*ls, mask, full, scale, causal, softcap, torch.float64)[0].backward(
            dout.double())
        ds_abs = full.grad.abs()
        for dim in range(4):
            if bias.shape[dim] == 1 and ds_abs.shape[dim] != 1:
                ds_abs = ds_abs.sum(dim, keepdim=True)
        if bias.shape[1] not in (1, H):  # per-kv-head bias: sum the G heads of each kv head
            ds_abs = ds_abs.view(B if bias.shape[0] != 1 else 1, bias.shape[1], -1, *ds_abs.shape[2:]).sum(2)
        atol["dbias"] = unit * ds_abs.max().item()
    # Exact zeros where no kept entry reaches: rows that keep no key (dq), keys no row of their
    # kv head keeps (dk, dv). Structural, from the mask and causality.
    keep = keep_matrix(q, k, mask, causal)                            # (B, H, Sq, Sk)
    G = q.shape[2] // k.shape[2]
    row_dead = ~keep.any(-1)                                          # (B, H, Sq)
    key_dead = ~keep.view(keep.shape[0], -1, G, *keep.shape[2:]).any(2).any(2)  # (B, Hk, Sk)
    dead = {"dq": row_dead.transpose(1, 2), "dk": key_dead.transpose(1, 2),
            "dv": key_dead.transpose(1, 2)}
    for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), ours, ref, naive):
        if r is None:
            continue
        assert g is not None, f"{name} missing: {where}"
        assert g.shape == r.shape, f"{name} shape {tuple(g.shape)} != {tuple(r.shape)}: {where}"
        assert not g.isnan().any(), f"{name} has NaN: {where}"
        err = (g.double() - r).abs().max().item()
        naive_err = (n.double() - r).abs().max().item()
        assert err <= 2 * naive_err + atol[name], \
            f"{name} error {err:.3e} > 2 x naive {naive_err:.3e} + {atol[name]:.1e}: {where}"
        if name in dead and dead[name].any():
            assert (g[dead[name]] == 0).all(), \
                f"{name} must be exactly 0 where no kept entry reaches: {where}"
    return ours


def keep_matrix(q, k, mask, causal):
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    keep = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & mask.repeat_interleave(H // mask.shape[1], 1)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        keep = keep & (j <= i + Sk - Sq)
    return keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_case1_dense(dtype, causal, gen):
    check_backward(*qkv(2, 512, 512, 8, 8, 64, dtype, gen), causal=causal, label="case 1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case2_causal_128(dtype, gen):
    check_backward(*qkv(2, 1024, 1024, 16, 16, 128, dtype, gen), causal=True, label="case 2")


# Head dim 256 (the sm80 passes; dK / dV in two column parts of 128): every bias shape's
# gradient, a mask with fully dropped rows and keys, GQA, causal with Sq != Sk, ragged tiles, and
# D = 200 padded to the 256 kernel.
D256_BIAS_SHAPES = [(2, 4, 200, 300), (1, 4, 200, 300), (2, 1, 200, 300), (2, 2, 1, 300),
                    (1, 1, 1, 300), (2, 4, 200, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("bias_shape", D256_BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_case2_d256_every_bias_shape(bias_shape, gen):
    dtype = torch.bfloat16
    q, k, v = qkv(2, 200, 300, 4, 2, 256, dtype, gen)
    mask = torch.rand(2, 2, 200, 300, device="cuda", generator=gen) < 0.8
    mask[:, :, 7] = False   # a row that keeps nothing
    mask[:, 1, :, 11] = False  # a key no row of kv head 1 keeps
    bias = randn(*bias_shape, dtype=torch.float32 if bias_shape == (1, 1, 1, 1) else dtype,
                 gen=gen)
    check_backward(q, k, v, mask=mask, bias=bias, causal=True,
                   label=f"case 2 D=256 bias {bias_shape}")


def test_case2_d256_key_mask_compacted(gen):
    # A key-only mask over >= 128 query rows runs over the compacted keys (gathered, then
    # scattered back), with a per-key bias and its gradient.
    q, k, v = qkv(2, 300, 700, 4, 2, 256, torch.bfloat16, gen)
    mask = torch.rand(2, 2, 1, 700, device="cuda", generator=gen) < 0.3
    check_backward(q, k, v, mask=mask, bias=randn(2, 2, 1, 700, dtype=torch.bfloat16, gen=gen),
                   causal=True, label="case 2 D=256 key mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [256, 200])
def test_case2_d256_dense_and_softcap(dtype, D, gen):
    check_backward(*qkv(1, 517, 333, 4, 1, D, dtype, gen), label=f"case 2 D={D} dense")
    check_backward(*qkv(1, 384, 384, 2, 2, D, dtype, gen), causal=True, softcap=20.0,
                   bias=randn(1, 2, 1, 384, dtype=dtype, gen=gen), label=f"case 2 D={D} softcap")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case3_trainable_mask(dtype, gen):
    B, S, H, Hk, D = 2, 2048, 8, 2, 128
    q, k, v = qkv(B, S, S, H, Hk, D, dtype, gen)
    bias = randn(B, Hk, 1, S, dtype=dtype, gen=gen)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None, None]
    mask = create_mask(bias, causal, B, S, S, 256, torch.finfo(dtype).min, type="topk")
    check_backward(q, k, v, mask=mask, bias=bias, causal=True, label="case 3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case4_bias_query_dim_1_gqa4(dtype, gen):
    q, k, v = qkv(2, 1000, 1000, 8, 2, 64, dtype, gen)
    check_backward(q, k, v, bias=randn(2, 2, 1, 1000, dtype=dtype, gen=gen), causal=True,
                   label="case 4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case5_decode(dtype, gen):
    q, k, v = qkv(3, 1, 1025, 32, 4, 128, dtype, gen)
    mask = torch.rand(3, 4, 1, 1025, device="cuda", generator=gen) < 0.5
    check_backward(q, k, v, mask=mask, bias=randn(3, 4, 1, 1025, dtype=dtype, gen=gen),
                   causal=True, label="case 5")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case7_fully_masked_rows(dtype, gen):
    q, k, v = qkv(2, 256, 256, 4, 4, 64, dtype, gen)
    mask = torch.rand(2, 4, 256, 256, device="cuda", generator=gen) < 0.5
    mask[1] = False
    mask[0, :, 17] = False
    dq, dk, dv, _ = check_backward(q, k, v, mask=mask, label="case 7")
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_case8_block_structured(dtype, gen):
    q, k, v = qkv(1, 1024, 1024, 4, 4, 128, dtype, gen)
    mask = torch.rand(1, 4, 1024, 1024, device="cuda", generator=gen) < 0.3
    tiles = torch.rand(1, 4, 8, 8, device="cuda", generator=gen) < 0.4
    mask &= ~tiles.repeat_interleave(128, 2).repeat_interleave(128, 3)
    check_backward(q, k, v, mask=mask, label="case 8")


@pytest.mark.parametrize("D", [8, 20, 40, 50, 72, 100])
def test_case9_head_dims(D, gen):
    check_backward(*qkv(1, 333, 517, 4, 2, D, torch.bfloat16, gen), causal=True,
                   label=f"case 9 D={D}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case10_broadcast_biases(dtype, gen):
    q, k, v = qkv(4, 200, 300, 4, 2, 64, dtype, gen)
    mask = torch.rand(1, 2, 200, 300, device="cuda", generator=gen) < 0.7
    check_backward(q, k, v, mask=mask, bias=randn(1, 4, 200, 300, dtype=dtype, gen=gen),
                   causal=True, label="case 10 batch-1 bias")
    check_backward(q, k, v, bias=randn(4, 4, 200, 1, dtype=dtype, gen=gen),
                   label="case 10 key-dim-1 bias")
    check_backward(q, k, v, bias=randn(1, 1, 1, 1, dtype=torch.float32, gen=gen),
                   label="case 10 scalar bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case11_full_bias(dtype, gen):
    q, k, v = qkv(2, 256, 384, 8, 8, 64, dtype, gen)
    check_backward(q, k, v, bias=randn(2, 8, 256, 384, dtype=dtype, gen=gen), label="case 11")


@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_case12_softcap(softcap, gen):
    q, k, v = qkv(1, 512, 512, 4, 4, 64, torch.bfloat16, gen)
    check_backward(q, k, v, bias=randn(1, 4, 512, 512, dtype=torch.bfloat16, gen=gen),
                   softcap=softcap, causal=True, label="case 12")


# The Hopper backward passes' kernels: (their template arguments in all, kSoftcap's index among
# them; the lean passes' kFinite comes after it), and the sm80 passes.
SM90_BACKWARD_ARGS = {"dkdv_kernel_sm90": (6, 4), "dq_kernel_sm90": (9, 7),
                      "dkdvq_kernel_sm90": (5, 3), "dkdv_kernel_sm90_wide": (3, 2),
                      "dq_kernel_sm90_wide": (4, 3)}


def backward_kernels(names):
    """{kernel: [template argument lists]} of the backward passes among profiled `names`."""
    found = {}
    for n in names:
        for kernel in list(SM90_BACKWARD_ARGS) + ["dkdv_kernel", "dq_kernel"]:
            start = n.find(f"{kernel}<")
            if start >= 0 and (start == 0 or not (n[start - 1].isalnum() or n[start - 1] == "_")):
                args = n[start + len(kernel) + 1:n.index(">(", start)]
                found.setdefault(kernel, []).append(args.split(", "))
    return found


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_softcap_on_hopper_passes(dtype, D, gen):
    """Softcap's backward on the Hopper passes (their kSoftcap instantiations: the cap in place of
    the scale, dX = dS (1 - t^2) for dK and dQ, dS for the bias gradient) against float64: a
    per-key bias (its gradient by column sums; the fused pass at D <= 128, and the two passes
    under deterministic), full 16-bit and fp32 biases (the dQ pass's packed and fp32 duties), a
    (.., Sq, 1) bias (row sums), a mask, and per-row top-k over compacted keys (gathered tiles,
    D <= 128). Ragged tiles (Sq 333, Sk 517), GQA, causal and not. On sm_90 the profile shows
    that only the Hopper passes ran, each as its softcap instantiation."""
    B, Sq, Sk, H, Hk = 1, 333, 517, 4, 2
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    key_bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
    mask = torch.rand(B, Hk, Sq, Sk, device="cuda", generator=gen) < 0.6
    mask[:, :, 5] = False  # a row that keeps nothing
    cases = [
        ("per-key bias", dict(bias=key_bias, causal=True, softcap=5.0)),
        ("per-key bias deterministic", dict(bias=key_bias, causal=True, softcap=5.0,
                                            deterministic=True)),
        ("full 16-bit bias", dict(bias=randn(B, H, Sq, Sk, dtype=dtype, gen=gen), softcap=30.0)),
        ("full fp32 bias", dict(bias=randn(B, Hk, Sq, Sk, dtype=torch.float32, gen=gen),
                                causal=True, softcap=5.0)),
        ("row bias", dict(bias=randn(B, H, Sq, 1, dtype=dtype, gen=gen), softcap=5.0)),
        ("mask", dict(mask=mask, bias=key_bias, causal=True, softcap=5.0)),
    ]
    if D <= 128:
        S, window = 640, 96
        qt, kt, vt = qkv(B, S, S, H, Hk, D, dtype, gen)
        bias_t = randn(B, Hk, 1, S, dtype=dtype, gen=gen)
        causal_t = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None, None]
        topk_mask = create_mask(bias_t, causal_t, B, S, S, window, torch.finfo(dtype).min)
        cases.append(("per-row top-k", dict(args=(qt, kt, vt), mask=topk_mask, bias=bias_t,
                                            causal=True, softcap=5.0,
                                            ours_how={"topk": window, "topk_causal": True})))
    for label, kwargs in cases:
        args = kwargs.pop("args", (q, k, v))
        names = cuda_kernel_names(lambda: check_backward(
            *args, label=f"softcap {label} D={D}", **kwargs))
        if sm90 and names:  # (no profile under compute-sanitizer: CUPTI is taken)
            ran = backward_kernels(names)
            assert "dkdv_kernel" not in ran and "dq_kernel" not in ran, (label, names)
            assert ran, (label, names)
            for kernel, arg_lists in ran.items():
                count, softcap_at = SM90_BACKWARD_ARGS[kernel]
                for a in arg_lists:
                    assert len(a) == count and a[softcap_at] == "true", (label, kernel, a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,window,how", [
    ((1, 1000, 1000, 8, 2), 100, {}),                       # Doge: a bias per kv head, GQA 4
    ((1, 1000, 1000, 8, 2), 100, {"bias_grad": False}),     # no column sums
    ((1, 1000, 1000, 8, 2), 100, {"deterministic": True}),
    ((2, 333, 517, 4, 4), 50, {}),                          # Sq < Sk, ragged, two batches
    ((1, 700, 700, 4, 1), 60, {"bias_heads": 4}),           # a bias (and lists) per query head
])
def test_lean_dkdv_pass_over_row_intervals(dtype, shape, window, how, gen):
    """Per-row top-k over compacted keys at D = 128 runs its dK/dV groups on the lean pass over
    slot rows (dkdv_kernel_sm90_slot_rows): each slot keeps the queries of its interval
    [key_first, key_last], the per-key bias is one fma per entry. A bias per query head under
    GQA gathers K and V per query head (its own lists). Every gradient against float64
    with create_mask's mask (ties across the causal frontier, a key no row keeps: exact zeros);
    on sm_90 the profile shows that pass ran and the general dK/dV pass did not."""
    B, Sq, Sk, H, Hk = shape
    how = dict(how)
    q, k, v = qkv(B, Sq, Sk, H, Hk, 128, dtype, gen)
    bias = randn(B, how.pop("bias_heads", Hk), 1, Sk, dtype=dtype, gen=gen)
    bias[..., 3:30] = bias[..., 40:67].flip(-1)  # ties, some across the causal frontier
    bias[..., 100] = torch.finfo(dtype).min      # a fill-valued key: never kept
    causal = torch.ones(Sq, Sk, dtype=torch.bool, device="cuda").tril(Sk - Sq)[None, None]
    mask = create_mask(bias, causal, B, Sq, Sk, window, torch.finfo(dtype).min)
    label = f"slot rows {shape} w={window} {how}"
    names = cuda_kernel_names(lambda: check_backward(
        q, k, v, mask=mask, bias=bias, causal=True, label=label,
        ours_how={"topk": window, "topk_causal": True}, **how))
    if torch.cuda.get_device_capability() == (9, 0) and names:  # (none under compute-sanitizer)
        ran = backward_kernels(names)
        slot_rows = [n for n in names if "dkdv_kernel_sm90_slot_rows<" in n]
        assert slot_rows, (label, names)
        assert "dkdv_kernel_sm90" not in ran and "dkdv_kernel" not in ran, (label, names)


# Bias shapes whose gradient sums over (batch, head): a per-key bias (column sums), and full
# (Sq, Sk) biases broadcast over batch and/or heads (summed across (b, h) CTAs of the dQ pass).
DET_BIAS_SHAPES = [(1, 1, 1, 4096), (1, 1, 4096, 4096), (2, 1, 4096, 4096), (1, 2, 4096, 4096)]


@pytest.mark.parametrize("bias_shape", DET_BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_case13_deterministic_bitwise(bias_shape, gen):
    q, k, v = qkv(2, 4096, 4096, 4, 2, 64, torch.bfloat16, gen)
    bias = randn(*bias_shape, dtype=torch.bfloat16, gen=gen)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True,
                                     deterministic=True)
        out.backward(dout)
        runs.append([x.grad for x in leaves])
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        assert not a.isnan().any(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_case13_deterministic_broadcast_full_bias(dtype, gen):
    """deterministic=True orders the sums of a full bias broadcast over batch/heads (one dQ
    launch per (b, h) sharing a bias slice): the same pass rule as the default path."""
    q, k, v = qkv(3, 200, 300, 4, 2, 64, dtype, gen)
    mask = torch.rand(1, 2, 200, 300, device="cuda", generator=gen) < 0.7
    for shape in [(1, 1, 200, 300), (3, 1, 200, 300), (1, 2, 200, 300), (1, 4, 200, 300)]:
        check_backward(q, k, v, mask=mask, bias=randn(*shape, dtype=dtype, gen=gen), causal=True,
                       deterministic=True, label=f"case 13 deterministic bias {shape}")


def tile_states_mask(B, H, Sq, Sk, gen, block_m=128, block_n=64):
    """A mask whose (block_m x block_n) tiles are each kept whole, dropped whole, or random: the
    plan's key tiles then list different query tiles (full or partial) side by side."""
    tiles = (B, H, -(-Sq // block_m), -(-Sk // block_n))
    state = torch.randint(0, 3, tiles, device="cuda", generator=gen)
    state = state.repeat_interleave(block_m, 2)[:, :, :Sq].repeat_interleave(block_n, 3)[..., :Sk]
    coin = torch.rand(B, H, Sq, Sk, device="cuda", generator=gen) < 0.5
    return (state == 1) | ((state == 2) & coin)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fused", "pass"])
def test_fused_backward_and_two_passes_against_float64(dim, dtype, mode, gen, monkeypatch):
    """At head dims 64 and 128 on Hopper the fused pass (dK, dV and dQ over pairs of key tiles, dQ
    summed by bulk reductions) runs by default without a mask, and wherever it can under
    FSA_CUDA_DQ=fused; FSA_CUDA_DQ=pass and deterministic=True run the dQ and dK/dV passes. All
    against float64: GQA, causal, ragged Sq / Sk, a key mask with empty rows and a per-key bias
    with its gradient; a full 16-bit bias without a gradient (staged in shared memory); a mask
    whose key tiles list different query tiles, full or partial, side by side; one kv head, whose
    key tiles' query work is split into shares."""
    monkeypatch.setenv("FSA_CUDA_DQ", mode)
    q, k, v = qkv(2, 200, 336, 8, 2, dim, dtype, gen)
    key_mask = torch.rand(2, 2, 1, 336, device="cuda", generator=gen) < 0.6
    key_mask[0, 1, 0, :150] = False  # rows that keep nothing under causality
    tiles = tile_states_mask(2, 8, 200, 336, gen)
    q1, k1, v1 = qkv(1, 1024, 1000, 4, 1, dim, dtype, gen)
    for det in (False, True):
        check_backward(q, k, v, mask=key_mask, bias=randn(2, 2, 1, 336, dtype=dtype, gen=gen),
                       causal=True, deterministic=det, label=f"per-key bias det={det} D={dim}")
        check_backward(q, k, v, bias=randn(2, 8, 200, 336, dtype=dtype, gen=gen), bias_grad=False,
                       deterministic=det, label=f"staged full bias det={det} D={dim}")
        check_backward(q, k, v, mask=tiles, bias=randn(1, 2, 1, 336, dtype=dtype, gen=gen),
                       deterministic=det, label=f"tile states det={det} D={dim}")
        check_backward(q1, k1, v1, bias=randn(1, 1, 1, 1000, dtype=dtype, gen=gen), causal=True,
                       deterministic=det, label=f"one kv head det={det} D={dim}")


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0),
                    reason="the fused backward is an sm_90a kernel")
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bias_shape", [None, (1, 2, 1, 1024)])
def test_fused_backward_is_the_default_at_head_dims_64_and_128(dim, bias_shape, gen, monkeypatch):
    """At head dims 64 and 128 over one block map without a mask no dQ pass runs by default (the
    fused pass, its pairs in index order, and dq_accum's conversion do); the two passes run under
    deterministic=True, with a mask (a key mask over compacted keys, or one with a query dim) and
    over a per-kv-head block selection (issue #5's scratch bar), their key tiles sorted longest
    first over a map per head that is not compacted. FSA_CUDA_DQ=fused runs the block selection fused with its pairs
    sorted longest first."""
    monkeypatch.delenv("FSA_CUDA_DQ", raising=False)
    q, k, v = qkv(1, 1024, 1024, 4, 2, dim, torch.bfloat16, gen)
    bias = None if bias_shape is None else randn(*bias_shape, dtype=torch.bfloat16, gen=gen)
    key_mask = torch.rand(1, 2, 1, 1024, device="cuda", generator=gen) < 0.5
    element_mask = torch.rand(1, 2, 1024, 1024, device="cuda", generator=gen) < 0.5
    blocks = torch.rand(1, 2, 8, 8, device="cuda", generator=gen) < 0.4
    blocks |= torch.eye(8, device="cuda", dtype=torch.bool)
    dout = torch.randn_like(q)

    def step(det, mask=None, selection=None):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        how = {} if selection is None else {"block_mask": selection, "block_size": 128}
        flash_sparse_attn_func(*leaves, attn_mask=mask, attn_bias=bias, is_causal=True,
                               deterministic=det, **how).backward(dout)

    step(False)  # warm-up: first-call setup stays out of the profile
    step(False, key_mask)
    step(False, element_mask)
    step(False, selection=blocks)
    fused = cuda_kernel_names(lambda: step(False))
    two_pass = cuda_kernel_names(lambda: step(True))
    keys = cuda_kernel_names(lambda: step(False, key_mask))
    masked = cuda_kernel_names(lambda: step(False, element_mask))
    selected = cuda_kernel_names(lambda: step(False, selection=blocks))
    monkeypatch.setenv("FSA_CUDA_DQ", "fused")
    selected_fused = cuda_kernel_names(lambda: step(False, selection=blocks))
    for names in (masked, keys, selected):
        assert any("dq_kernel_sm90" in n for n in names), names
        assert not any("dkdvq_kernel_sm90" in n for n in names), names
    for names in (fused, selected_fused):
        assert any("dkdvq_kernel_sm90" in n for n in names), names
        assert any("dq_convert_kernel" in n for n in names), names
        assert not any("dq_kernel" in n for n in names), names
    # Units sorted longest first over a map per head: key tiles in the two passes, pairs fused;
    # one list and compacted keys keep index order.
    for names in (fused, two_pass, keys):
        assert not any("dkv_order_kernel" in n for n in names), names
    assert any("dkv_order_kernel<1024, true>" in n for n in selected_fused), selected_fused
    for names in (masked, selected):
        assert any("dkv_order_kernel<1024, false>" in n for n in names), names
    assert any("dq_kernel_sm90" in n for n in two_pass), two_pass
    assert not any("dkdvq_kernel_sm90" in n or "dq_convert_kernel" in n for n in two_pass), two_pass


def test_bias_only_requires_grad(gen):
    q, k, v = qkv(2, 300, 300, 4, 2, 64, torch.bfloat16, gen)
    bias = randn(2, 2, 1, 300, dtype=torch.bfloat16, gen=gen).requires_grad_(True)
    out = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
    out.backward(torch.randn_like(out))
    assert bias.grad is not None and bias.grad.shape == bias.shape
    assert not bias.grad.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_block_selection_gqa_bias_grad(dtype, D, gen):
    """The trainable-mask path as users run it: a per-(batch, kv head) block selection of 128 x 128
    tiles (diagonal + random earlier blocks), causal, GQA 4, a per-kv-head key bias requiring
    grad. The reference gets the selection expanded to entries."""
    B, S, H, Hk, block = 1, 1024, 8, 2, 128
    q, k, v = qkv(B, S, S, H, Hk, D, dtype, gen)
    bias = randn(B, Hk, 1, S, dtype=dtype, gen=gen)
    nb = S // block
    sel = torch.rand(B, Hk, nb, nb, device="cuda", generator=gen) < 0.4
    sel |= torch.eye(nb, device="cuda", dtype=torch.bool)
    mask = sel.repeat_interleave(block, 2).repeat_interleave(block, 3)  # (B, Hk, S, S)
    check_backward(q, k, v, mask=mask, bias=bias, causal=True, label="block selection",
                   selection=(sel, block))


# The kernel head dims with lean sm90 dK/dV and dQ passes (backward_launch.cuh,
# sm90_backward_lean); the fused pass has its lean instantiation at both of its head dims.
LEAN_BACKWARD_DIMS = (128,)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq, Sk", [(808, 1000), (1000, 704)])
def test_lean_backward_passes_causal_key_bias(D, Sq, Sk, gen):
    """The Hopper passes' lean instantiations (dkdv_kernel_sm90's and dq_kernel_sm90's kLean:
    causality alone drops entries, the bias query-invariant) against float64, over a per-kv-head
    block selection (the two passes) and deterministic=True: Sq < Sk with a ragged last key tile
    (its key rows past Sk dropped) and a last query tile of 40 rows (the fused pass's second half
    of it has no query: under memcheck, scripts/gpu_check.sh), and Sq > Sk, whose first rows see
    no key. On sm_90 the profile shows which ran (LEAN_BACKWARD_DIMS): the lean dK/dV pass in
    both, the lean dQ pass where every key tile is whole (the staged bias needs it), neither with
    a mask that has a query dim.
    Without a mask or selection (causal and not), the fused pass runs, lean at D = 64 and 128
    (dkdvq_kernel_sm90's kLean). Two biases:
    16-bit per kv head, and fp32 per head, whose values the lean passes must read again at each of
    the G heads a CTA walks (KeyRowBiasHeld)."""
    B, H, Hk, block = 1, 8, 2, 128
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.bfloat16, gen)
    biases = (randn(B, Hk, 1, Sk, dtype=torch.bfloat16, gen=gen),
              randn(B, H, 1, Sk, dtype=torch.float32, gen=gen))
    mb, nb = (Sq + block - 1) // block, (Sk + block - 1) // block
    sel = torch.rand(B, Hk, mb, nb, device="cuda", generator=gen) < 0.5
    sel[..., -1] = True  # the ragged last key tile and the causal band's last blocks
    mask = sel.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :Sq, :Sk]
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    # (kSoftcap false; either kFinite: the pair is launched together)
    lean_dkdv = f"dkdv_kernel_sm90<{D}, fsa::detail::cuda::Bf16, false, true, false, "
    lean_fused = f"dkdvq_kernel_sm90<{D}, fsa::detail::cuda::Bf16, true, false, "
    hows = ("selection", "deterministic", "mask", "dense", "dense non-causal")
    for bias, how in itertools.product(biases, hows):
        kwargs = ({"mask": mask, "selection": (sel, block)} if how == "selection" else
                  {"deterministic": True} if how == "deterministic" else
                  {"mask": mask} if how == "mask" else {})
        label = f"lean passes {how} D={D} bias {tuple(bias.shape)} {bias.dtype}"
        names = cuda_kernel_names(lambda: check_backward(
            q, k, v, bias=bias, causal=how != "dense non-causal", label=label, **kwargs))
        if sm90 and names:  # (no profile under compute-sanitizer: CUPTI is taken)
            lean_dq = any(f"dq_kernel_sm90<{D}," in n and "false, false, false, true, false, " in n
                          for n in names)
            fused = how.startswith("dense")
            lean = D in LEAN_BACKWARD_DIMS and how != "mask"
            assert any(lean_dkdv in n for n in names) == (lean and not fused), (how, names)
            assert lean_dq == (lean and not fused and Sk % 64 == 0), (how, names)
            assert any(lean_fused in n for n in names) == fused, (how, names)
            assert any("dkdvq_kernel_sm90" in n for n in names) == fused, (how, names)


@pytest.mark.parametrize("scale", [0.0, 0.03, 0.5])
def test_lean_backward_passes_scale(scale, gen):
    """Without a bias the lean passes fold the softmax scale into P's fma with the LSE
    (key_row_logits leaves it to probabilities_t; the lean dQ pass does the same), with a per-key
    bias they apply it first: against float64 at scales other than 1 / sqrt(D), 0 included (every
    row uniform over the keys it keeps, dQ and dK exactly 0), over a block selection (the lean
    dK/dV and dQ passes) and dense causal attention (the lean fused pass), with and without a
    per-kv-head bias. On sm_90 the profile shows that the lean passes ran."""
    B, Sq, Sk, H, Hk, D, block = 1, 1000, 1024, 4, 2, 128, 128
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.bfloat16, gen)
    sel = torch.rand(B, Hk, (Sq + block - 1) // block, Sk // block, device="cuda",
                     generator=gen) < 0.5
    sel[..., -1] = True
    mask = sel.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :Sq, :Sk]
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    lean_dkdv = f"dkdv_kernel_sm90<{D}, fsa::detail::cuda::Bf16, false, true, false, "
    lean_fused = f"dkdvq_kernel_sm90<{D}, fsa::detail::cuda::Bf16, true, false, "
    for bias, how in itertools.product((None, randn(B, Hk, 1, Sk, dtype=torch.bfloat16, gen=gen)),
                                       ("selection", "dense")):
        kwargs = {"mask": mask, "selection": (sel, block)} if how == "selection" else {}
        label = f"lean passes scale={scale} {how} bias={bias is not None}"
        names = cuda_kernel_names(lambda: check_backward(
            q, k, v, bias=bias, causal=True, scale=scale, label=label, **kwargs))
        if sm90 and names:  # (no profile under compute-sanitizer: CUPTI is taken)
            fused = how == "dense"
            lean_dq = any(f"dq_kernel_sm90<{D}," in n and "false, false, false, true, false, " in n
                          for n in names)
            assert any(lean_dkdv in n for n in names) == (not fused), (label, names)
            assert lean_dq == (not fused), (label, names)
            assert any(lean_fused in n for n in names) == fused, (label, names)


@pytest.mark.parametrize("D, how", [(64, "dense"), (128, "dense"), (128, "selection")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_lean_pair_guards_nonfinite_v(D, how, value, gen):
    """The lean passes run as a pair (BackwardParams::nonfinite): the twin without per-entry guards
    where V, rowdot and LSE hold no NaN / Inf, the guarded one where they do. A NaN (or Inf) in V
    at keys 100 and 200 of causal attention, dense (the lean fused pass) or over a block selection
    that keeps the diagonal blocks (the lean dK/dV and dQ passes): rows 0 .. 99 see neither key,
    and their dQ must be what it is with those values zeroed (against float64). Rows 64 .. 99
    share a diagonal tile with key 100, where dP = NaN at the dropped entry: the guarded twin's
    dS is 0 there, the twin without guards would give 0 x NaN = NaN, so this fails unless V's scan
    flags the call. (The other lean tests run the twins without guards: their inputs are finite.)
    On sm_90 the profile shows both twins launched."""
    B, Sq, Sk, H, Hk, block = 1, 256, 256, 4, 2, 128
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, torch.bfloat16, gen)
    v_bad = v.clone()
    v_bad[:, 100, 0, :3] = value
    v_bad[:, 200, 1, 5] = value
    v_clean = v_bad.masked_fill(~torch.isfinite(v_bad), 0)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(D)
    sel = mask = None
    if how == "selection":
        sel = torch.rand(B, Hk, Sq // block, Sk // block, device="cuda", generator=gen) < 0.5
        sel |= torch.eye(Sq // block, dtype=torch.bool, device="cuda")
        mask = sel.repeat_interleave(block, 2).repeat_interleave(block, 3)

    def dq_of(values, dtype, ours):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, values)]
        if ours:
            selection = {} if sel is None else {"block_mask": sel, "block_size": (block, block)}
            out = flash_sparse_attn_func(*leaves, is_causal=True, **selection)
        else:
            out = attention(*leaves, mask, None, scale, True, 0.0, dtype)[0]
        out.backward(dout.to(dtype))
        return leaves[0].grad

    names = cuda_kernel_names(lambda: dq_of(v_bad, torch.bfloat16, True))
    ours = dq_of(v_bad, torch.bfloat16, True)[:, :100]
    ref = dq_of(v_clean, torch.float64, False)[:, :100]
    naive = dq_of(v_clean, torch.bfloat16, False)[:, :100]
    where = f"lean pair {how} D={D} V {value} seed={SEED}"
    assert torch.isfinite(ours).all(), f"non-finite dQ in rows that see no bad key: {where}"
    err = (ours.double() - ref).abs().max().item()
    naive_err = (naive.double() - ref).abs().max().item()
    atol = 2.0 ** -9 * ref.abs().max().item()
    assert err <= 2 * naive_err + atol, f"dq error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"
    if torch.cuda.get_device_capability() == (9, 0) and names:  # (none under compute-sanitizer)
        elt = "fsa::detail::cuda::Bf16"
        pair = ([f"dkdvq_kernel_sm90<{D}, {elt}, true, false, "] if how == "dense" else
                [f"dkdv_kernel_sm90<{D}, {elt}, false, true, false, ",
                 f"dq_kernel_sm90<{D}, {elt}, (fsa::detail::cuda::DqBiasDuty)0, false, false, "
                 "false, true, false, "])
        for kernel in pair:
            for finite in ("false>", "true>"):
                assert any(kernel + finite in n for n in names), (where, kernel + finite, names)


@pytest.mark.parametrize("layout", ["fp32", "unaligned"])
def test_key_bias_staged_and_read_from_global(layout, gen):
    """A per-key bias (B, Hk, 1, S) travels with the dQ pass's K/V tiles where its key dim is
    contiguous and 16-byte aligned (fp32 here; 16-bit in the cases above), and is read from global
    memory where its rows start off that alignment (a view one element in). Both against float64,
    with S = 1000 ending in a ragged key tile, which reads global memory either way."""
    B, S, H, Hk, D = 1, 1000, 4, 2, 128
    q, k, v = qkv(B, S, S, H, Hk, D, torch.bfloat16, gen)
    if layout == "fp32":
        bias = randn(B, Hk, 1, S, dtype=torch.float32, gen=gen)
        check_backward(q, k, v, bias=bias, causal=True, label="fp32 key bias")
        return

    def shifted(q_, k_, v_, b_):
        view = torch.cat([b_[..., :1], b_], -1)[..., 1:]  # the same values, rows 2 bytes in
        assert view.data_ptr() % 16 != 0
        return flash_sparse_attn_func(q_, k_, v_, attn_bias=view, is_causal=True)

    bias = randn(B, Hk, 1, S, dtype=torch.bfloat16, gen=gen)
    check_backward(q, k, v, bias=bias, causal=True, label="unaligned key bias", ours_call=shifted)


def test_trainable_backward_peak_memory(gen):
    """Issue #5: the backward of the trainable-mask path allocates, beyond the gradients it
    returns, less than 10% of the bytes of q + k + v (no (B, H, Sq, Sk) temporary, no fp32 copies
    of q/k/v-sized tensors). Measured with the caching allocator's peak around the backward alone,
    plus what the library's own pool (docs/numerics.md, "Scratch memory"), which torch does not
    see, grew by across it after giving back what it held unused; what is legitimately new is
    exactly dq, dk, dv and dbias (each rounded up to the allocator's 512-byte granularity)."""
    B, S, H, Hk, D, block, top = 1, 4096, 32, 8, 128, 128, 8
    q, k, v = qkv(B, S, S, H, Hk, D, torch.bfloat16, gen)
    bias = randn(B, Hk, 1, S, dtype=torch.bfloat16, gen=gen)
    nb = S // block
    # diagonal block + the top-8 earlier blocks by mean bias, per (batch, kv head, query block)
    mean = bias.float().view(B, Hk, nb, block).mean(-1)
    earlier = torch.ones(nb, nb, device="cuda", dtype=torch.bool).tril(-1)
    scores = mean[:, :, None, :].expand(B, Hk, nb, nb).masked_fill(~earlier, -math.inf)
    idx = scores.topk(top, dim=-1).indices
    sel = torch.zeros(B, Hk, nb, nb, device="cuda", dtype=torch.bool)
    sel.scatter_(-1, idx, torch.gather(scores, -1, idx) > -math.inf)
    sel |= torch.eye(nb, device="cuda", dtype=torch.bool)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    dout = torch.randn_like(q)
    out = flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True,
                                 block_mask=sel, block_size=block)
    torch.cuda.synchronize()
    release_cuda_memory()
    pool_before = cuda_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    pool = cuda_memory_reserved() - pool_before

    def alloc_bytes(t):
        return -(-t.numel() * t.element_size() // 512) * 512

    grads = sum(alloc_bytes(t.grad) for t in leaves)
    assert all(t.grad is not None for t in leaves)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    scratch = peak - grads + pool
    assert scratch < 0.1 * qkv_bytes, (
        f"backward scratch {scratch / 2**20:.2f} MiB (peak {peak / 2**20:.2f} MiB minus grads "
        f"{grads / 2**20:.2f} MiB, plus the library pool's growth {pool / 2**20:.2f} MiB) >= 10% "
        f"of q+k+v = {0.1 * qkv_bytes / 2**20:.2f} MiB")


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Sq,Sk", [(0, 200), (200, 0)])
def test_empty_sequences_backward_from_a_sum(Sq, Sk, D, gen):
    """No queries or no keys, out.sum().backward(): autograd hands the backward the empty
    output's expanded gradient (stride 0 on every dim). No keys: O = 0, LSE = -inf, dq = 0; no
    queries: dk, dv and the bias gradient are 0."""
    q = torch.randn(2, Sq, 4, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(2, Sk, 2, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(2, Sk, 2, D, device="cuda", generator=gen).to(torch.bfloat16)
    bias = torch.randn(2, 2, 1, Sk, device="cuda", generator=gen).to(torch.bfloat16)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    out, lse, _ = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True,
                                         return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 4, Sq)
    if Sk == 0:
        assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v, bias):
        assert t.grad.shape == t.shape and (t.grad == 0).all(), t.shape
