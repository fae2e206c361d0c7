"""CUDA forward against a float64 PyTorch reference on the GPU: every SPEC section 7 forward case.

Runs only where a CUDA device and a CUDA build of the package exist (scripts/gpu_check.sh).
Inputs are drawn fresh each run (seeded from the clock; the seed is printed on failure), outputs
are poisoned with NaN before each launch so unwritten elements fail, and the pass rule is SPEC's:
max|ours - ref| <= 2 * max|naive same-dtype - ref| + atol, no NaN, exact zeros and -inf on empty
rows.
"""

import math
import os
import subprocess
import sys
import time

import pytest
import torch

import flash_sparse_attn
from flash_sparse_attn import _C
from flash_sparse_attn.utils.mask import create_mask

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)

SEED = int(os.environ.get("FSA_TEST_SEED", time.time_ns() % (2**31)))
DTYPES = [torch.bfloat16, torch.float16]
ATOL = 1e-4  # below one ulp of bf16/fp16 outputs of magnitude ~1: only absorbs exact-zero refs


def expand_heads(x, heads):
    return x if x is None or x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def attention(q, k, v, mask, bias, scale, causal, softcap, compute_dtype):
    """Attention per SPEC section 2 in `compute_dtype` (float64: the reference; the input dtype: the
    naive same-precision implementation). Returns out (B, Sq, H, D) and lse (B, H, Sq)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = expand_heads(k.to(compute_dtype).transpose(1, 2), H)
    vh = expand_heads(v.to(compute_dtype).transpose(1, 2), H)
    x = qh @ kh.transpose(-1, -2)
    s = softcap * torch.tanh(scale * x / softcap) if softcap else x * scale
    if bias is not None:
        s = s + expand_heads(bias.to(compute_dtype), H)
    keep = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & expand_heads(mask, H)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        keep = keep & (j <= i + Sk - Sq)
    s = s.float() if compute_dtype != torch.float64 else s
    s = s.masked_fill(~keep, -math.inf)
    # Empty rows (no kept key): LSE = -inf and P = 0, computed so that autograd sees no
    # -inf - (-inf) either (the rows' logits are replaced before logsumexp, its result after).
    empty = ~keep.any(-1)
    lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])
    out = p.to(compute_dtype) @ vh
    return out.transpose(1, 2), lse.masked_fill(empty, -math.inf)


def run_ours(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0):
    """The CUDA forward through the extension, into NaN-poisoned outputs."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=q.device)
    _C.forward(q, k, v, mask, bias, out, lse, scale, causal, float(softcap), None,
               torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out, lse


def check(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0, label=""):
    scale_ = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = run_ours(q, k, v, mask, bias, scale, causal, softcap)
    ref_out, ref_lse = attention(q, k, v, mask, bias, scale_, causal, softcap, torch.float64)
    naive_out, _ = attention(q, k, v, mask, bias, scale_, causal, softcap, q.dtype)
    where = f"{label} seed={SEED} dtype={q.dtype}"
    assert not out.isnan().any(), f"NaN (or unwritten) output: {where}"
    assert not lse.isnan().any(), f"NaN (or unwritten) lse: {where}"
    empty = ref_lse == -math.inf  # (B, H, Sq)
    if empty.any():
        assert (lse[empty] == -math.inf).all(), f"empty rows need LSE = -inf: {where}"
        out_rows = out.transpose(1, 2)[empty]
        assert (out_rows == 0).all(), f"empty rows need O = 0 exactly: {where}"
    err = (out.double() - ref_out).abs().max().item()
    naive_err = (naive_out.double() - ref_out).abs().max().item()
    assert err <= 2 * naive_err + ATOL, f"out error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"
    finite = ~empty
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), \
        f"lse error {lse_err:.3e}: {where}"
    return out, lse


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


@pytest.fixture
def gen():
    g = torch.Generator(device="cuda")
    g.manual_seed(SEED)
    return g


def qkv(B, Sq, Sk, H, Hk, D, dtype, gen):
    return (randn(B, Sq, H, D, dtype=dtype, gen=gen), randn(B, Sk, Hk, D, dtype=dtype, gen=gen),
            randn(B, Sk, Hk, D, dtype=dtype, gen=gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_case1_dense_and_against_sdpa(dtype, causal, gen):
    q, k, v = qkv(2, 512, 512, 8, 8, 64, dtype, gen)
    out, _ = check(q, k, v, causal=causal, label="case 1")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    ref, _ = attention(q, k, v, None, None, 1 / 8, causal, 0.0, torch.float64)
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * sdpa_err + ATOL, f"ours {err:.3e} vs SDPA {sdpa_err:.3e} (seed {SEED})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_case2_causal_large_heads_and_d256(dtype, gen):
    check(*qkv(2, 1024, 1024, 16, 16, 128, dtype, gen), causal=True, label="case 2a")
    check(*qkv(1, 1024, 1024, 4, 4, 256, dtype, gen), causal=True, label="case 2b")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case3_trainable_mask_topk_causal(dtype, gen):
    B, S, H, Hk, D, window = 2, 2048, 8, 2, 128, 256
    q, k, v = qkv(B, S, S, H, Hk, D, dtype, gen)
    bias = randn(B, Hk, 1, S, dtype=dtype, gen=gen)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None, None]
    mask = create_mask(bias, causal, B, S, S, window, torch.finfo(dtype).min, type="topk")
    assert mask.shape == (B, Hk, S, S)
    check(q, k, v, mask=mask, bias=bias, causal=True, label="case 3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case4_bias_query_dim_1_gqa4(dtype, gen):
    q, k, v = qkv(2, 1000, 1000, 8, 2, 64, dtype, gen)
    bias = randn(2, 2, 1, 1000, dtype=dtype, gen=gen)
    check(q, k, v, bias=bias, causal=True, label="case 4")


def kernel_names(fn):
    """The CUDA kernels `fn` launches (demangled, with their template arguments)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def lean_walk_name(D, dtype, band, bias):
    """The demangled name of the Hopper forward's lean walk (kLean; kBand the band walk) for a
    call with or without a bias (kLeanBias: the walk that adds it to every tile, or the one
    without bias code)."""
    elt = {torch.bfloat16: "Bf16", torch.float16: "Fp16"}[dtype]
    args = ["false", "false", "false", "true", str(band).lower(), str(bias).lower()]
    return f"forward_kernel_sm90<{D}, fsa::detail::cuda::{elt}, {', '.join(args)}>"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_lean_walk_causal_per_key_bias(dtype, D, gen):
    """The Hopper forward's lean walk (forward_kernel_sm90's kLean: persistent launches whose
    entries drop by causality alone, every key tile whole, no bias or a per-key one staged with
    its tile) against float64: Sq < Sk, and Sq > Sk whose first rows see no key (exact empty
    rows); no bias, a per-kv-head 16-bit bias, a per-head fp32 bias broadcast over the batch, and
    non-causal (no partial tile). On sm_90 the profile shows that these calls ran the band walk
    (kBand: blocks and key tiles of its own, 192 rows at D = 64, 128-key tiles at D = 128; a
    ragged last block of queries too) or, at D = 256 and where the keys are no whole number of
    the band's key tiles, the lean instantiation, each in its variant with bias code where the
    call has a bias and without where it has none (kLeanBias), and that a bias row off 16-byte
    alignment, a mask, softcap or a ragged last key tile ran neither (they take the general walk,
    checked against float64 too)."""
    B, H, Hk = 2, 8, 2
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    band_keys = {64: 64, 128: 128}.get(D)

    def run(label, expect_lean, *args, **kwargs):
        names = kernel_names(lambda: check(*args, label=f"{label} D={D}", **kwargs))
        if sm90 and names:  # (no profile under compute-sanitizer: CUPTI is taken)
            # The variant with bias code: calls with a bias (kLeanBias).
            has_bias = kwargs.get("bias") is not None
            ran = {(band, bias): any(lean_walk_name(D, dtype, band, bias) in n for n in names)
                   for band in (False, True) for bias in (False, True)}
            expect_band = expect_lean and band_keys is not None and args[1].shape[1] % band_keys == 0
            expect = {(False, has_bias): expect_lean and not expect_band,
                      (True, has_bias): expect_band}
            for walk, did in ran.items():
                assert did == expect.get(walk, False), (label, walk, names)

    # More CTA tiles than SMs (12 or 16 query blocks x 8 heads x 2): a persistent launch.
    for Sq, Sk in [(1536, 2048), (2048, 1024)]:
        q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
        key_bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
        run(f"no bias {Sq}x{Sk}", True, q, k, v, causal=True)
        run(f"kv-head bias {Sq}x{Sk}", True, q, k, v, bias=key_bias, causal=True)
        run(f"fp32 head bias {Sq}x{Sk}", True, q, k, v,
            bias=randn(1, H, 1, Sk, dtype=torch.float32, gen=gen), causal=True)
        run(f"non-causal {Sq}x{Sk}", True, q, k, v, bias=key_bias, causal=False)
        shifted = torch.cat([key_bias[..., :1], key_bias], -1)[..., 1:]  # rows 2 bytes in
        assert shifted.data_ptr() % 16 != 0
        run(f"unaligned bias {Sq}x{Sk}", False, q, k, v, bias=shifted, causal=True)
        mask = torch.rand(B, Hk, Sq, Sk, device="cuda", generator=gen) < 0.7
        run(f"mask {Sq}x{Sk}", False, q, k, v, mask=mask, bias=key_bias, causal=True)
        run(f"softcap {Sq}x{Sk}", False, q, k, v, bias=key_bias, causal=True, softcap=20.0)
    q, k, v = qkv(B, 1536, 2000, H, Hk, D, dtype, gen)
    run("ragged keys", False, q, k, v, bias=randn(B, Hk, 1, 2000, dtype=dtype, gen=gen),
        causal=True)
    # 1088 keys: whole 64-key tiles, 8.5 of the 128-key band tiles (D = 128 takes the lean walk).
    q, k, v = qkv(B, 1536, 1088, H, Hk, D, dtype, gen)
    run("half a band tile", True, q, k, v, bias=randn(B, Hk, 1, 1088, dtype=dtype, gen=gen),
        causal=True)
    run("half a band tile, no bias", True, q, k, v, causal=True)
    # 1960 queries: the band walk's last block of 192 rows holds 40 (its last warps none), of 128
    # rows 40 too. (As many query tiles as above: with fewer the call splits its keys, which the
    # band walk does not.)
    q, k, v = qkv(B, 1960, 2048, H, Hk, D, dtype, gen)
    run("ragged queries", True, q, k, v, bias=randn(B, Hk, 1, 2048, dtype=dtype, gen=gen),
        causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lean_walk_key_pairs(dtype, gen):
    """The lean walk's 128-key steps over the plan's 64-key lists at D = 128 (KeyPairWalk): a
    causal block selection of 64-key blocks keeps pairs and lone halves (the other half dropped,
    and its K/V zero-filled), in the full and in the partial (causal) lists; 1088 keys end in a
    lone half; a per-key bias staged with each step (its slice cut at the keys' end); query blocks
    that select nothing (exact empty rows). Against float64 through the public API; on sm_90 the
    profile shows that the lean instantiation ran."""
    B, H, Hk, D, block = 2, 8, 2, 128, (128, 64)  # the plan's tiles at D = 128
    Sq, Sk = 1536, 1088
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
    sel = torch.rand(B, Hk, Sq // block[0], Sk // block[1], device="cuda", generator=gen) < 0.5
    sel[0, 1, 5:7] = False  # two query tiles with no key
    mask = sel.repeat_interleave(block[0], 2).repeat_interleave(block[1], 3)
    scale = 1.0 / math.sqrt(D)

    def ours():
        return flash_sparse_attn.flash_sparse_attn_func(
            q, k, v, attn_bias=bias, is_causal=True, block_mask=sel, block_size=block)

    names = kernel_names(ours)
    out = ours()
    ref, ref_lse = attention(q, k, v, mask, bias, scale, True, 0.0, torch.float64)
    naive, _ = attention(q, k, v, mask, bias, scale, True, 0.0, dtype)
    where = f"key pairs seed={SEED} dtype={dtype}"
    assert not out.isnan().any(), where
    empty = (ref_lse == -math.inf).transpose(1, 2)  # (B, Sq, H)
    assert empty.any() and (out[empty] == 0).all(), where
    err = (out.double() - ref).abs().max().item()
    naive_err = (naive.double() - ref).abs().max().item()
    assert err <= 2 * naive_err + ATOL, f"out error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"
    if torch.cuda.get_device_capability() == (9, 0) and names:
        lean = lean_walk_name(128, dtype, band=False, bias=True)
        assert any(lean in n for n in names), names


@pytest.mark.parametrize("dtype", DTYPES)
def test_case5_decode_gqa_mask_bias(dtype, gen):
    q, k, v = qkv(3, 1, 1025, 32, 4, 128, dtype, gen)
    mask = torch.rand(3, 4, 1, 1025, device="cuda", generator=gen) < 0.5
    bias = randn(3, 4, 1, 1025, dtype=torch.float32, gen=gen)
    check(q, k, v, mask=mask, bias=bias, causal=True, label="case 5")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case6_decode_per_head_sparse_mask(dtype, gen):
    q, k, v = qkv(2, 1, 4096, 16, 2, 64, dtype, gen)
    mask = torch.rand(2, 16, 1, 4096, device="cuda", generator=gen) < 0.1
    bias = randn(1, 1, 1, 4096, dtype=dtype, gen=gen)
    check(q, k, v, mask=mask, bias=bias, label="case 6")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Sq", [1, 5])
def test_long_decode_many_splits(dtype, D, Sq, gen):
    # MQA decode over 40K keys: one kv head per batch, so split-KV cuts each list into many
    # splits, and every split walks its tiles through the kernel's ring of stages. Sq = 1: 8
    # GQA-packed rows, the split-key layout at D <= 128 (the warps share the rows, each takes a
    # quarter of every key tile, their states merge at the end); Sq = 5: 40 packed rows over two
    # warps, the row-split layout. Whole 64-key blocks kept, partial blocks, a block of one key,
    # an empty batch, and a bias.
    B, Sk, H, Hk = 3, 40000, 8, 1
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, dtype, gen)
    blocks = torch.rand(B, 1, 1, (Sk + 63) // 64, device="cuda", generator=gen) < 0.15
    mask = blocks.repeat_interleave(64, -1)[..., :Sk].clone()
    mask &= torch.rand(B, 1, 1, Sk, device="cuda", generator=gen) < 0.9
    mask[0, ..., 64 * 301 + 7] = True
    mask[2] = False  # an empty batch: O = 0, LSE = -inf through the combine
    bias = randn(B, Hk, 1, Sk, dtype=dtype, gen=gen)
    out, lse = check(q, k, v, mask=mask, bias=bias, label="long decode")
    assert (out[2] == 0).all() and (lse[2] == -math.inf).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_case7_fully_masked_rows_and_batch(dtype, gen):
    q, k, v = qkv(2, 256, 256, 4, 4, 64, dtype, gen)
    mask = torch.rand(2, 4, 256, 256, device="cuda", generator=gen) < 0.5
    mask[1] = False          # a fully masked batch
    mask[0, :, 17] = False   # fully masked rows
    mask[0, 2, 100:140] = False
    out, lse = check(q, k, v, mask=mask, label="case 7")
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_case8_block_structured_mask(dtype, gen):
    q, k, v = qkv(1, 1024, 1024, 4, 4, 128, dtype, gen)
    mask = torch.rand(1, 4, 1024, 1024, device="cuda", generator=gen) < 0.3
    tiles64 = torch.rand(1, 4, 16, 16, device="cuda", generator=gen) < 0.3
    tiles128 = torch.rand(1, 4, 8, 8, device="cuda", generator=gen) < 0.3
    mask &= ~tiles64.repeat_interleave(64, 2).repeat_interleave(64, 3)
    mask &= ~tiles128.repeat_interleave(128, 2).repeat_interleave(128, 3)
    check(q, k, v, mask=mask, label="case 8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 20, 40, 50, 72, 100, 130, 200, 224, 256])
def test_case9_head_dim_sweep(dtype, D, gen):
    check(*qkv(1, 333, 517, 4, 2, D, dtype, gen), causal=True, label=f"case 9 D={D}")


def test_case9_head_dim_264_raises(gen):
    q, k, v = qkv(1, 16, 16, 2, 2, 264, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="head_dim"):
        run_ours(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_case10_batch1_mask_bias_and_key_dim_1_bias(dtype, gen):
    q, k, v = qkv(4, 200, 300, 4, 2, 64, dtype, gen)
    mask = torch.rand(1, 2, 200, 300, device="cuda", generator=gen) < 0.7
    bias = randn(1, 4, 200, 300, dtype=dtype, gen=gen)
    check(q, k, v, mask=mask, bias=bias, causal=True, label="case 10a")
    check(q, k, v, bias=randn(4, 4, 200, 1, dtype=dtype, gen=gen), label="case 10b")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case11_full_bias_sq_ne_sk(dtype, gen):
    q, k, v = qkv(2, 256, 384, 8, 8, 64, dtype, gen)
    check(q, k, v, bias=randn(2, 8, 256, 384, dtype=dtype, gen=gen), label="case 11")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_case12_softcap_with_bias(dtype, softcap, gen):
    q, k, v = qkv(1, 512, 512, 4, 4, 64, dtype, gen)
    bias = randn(1, 4, 512, 512, dtype=dtype, gen=gen)
    check(q, k, v, bias=bias, softcap=softcap, causal=True, label="case 12")


@pytest.mark.parametrize("dtype", DTYPES)
def test_case14_lse_and_out_identical_with_or_without_lse(dtype, gen):
    q, k, v = qkv(2, 300, 500, 4, 2, 128, dtype, gen)
    out, lse = check(q, k, v, causal=True, label="case 14")
    out_only = torch.full_like(q, float("nan"))
    _C.forward(q, k, v, None, None, out_only, None, None, True, 0.0, None,
               torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(out, out_only)


def test_public_api_on_cuda_matches_the_op(gen):
    q, k, v = qkv(2, 257, 300, 8, 2, 64, torch.bfloat16, gen)
    bias = randn(2, 2, 1, 300, dtype=torch.bfloat16, gen=gen)
    out = flash_sparse_attn.flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
    ref, _ = run_ours(q, k, v, bias=bias, causal=True)
    assert torch.equal(out, ref)


def test_poisoned_strided_inputs_transposed_layout(gen):
    # (B, H, S, D) buffers viewed as (B, S, H, D): any strides with a contiguous last dim.
    q = randn(2, 8, 300, 64, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    k = randn(2, 2, 400, 64, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    v = randn(2, 2, 400, 64, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    check(q, k, v, causal=True, label="strided")


TMA_FALLBACK = """
import sys, torch, flash_sparse_attn
g = torch.Generator(device="cuda").manual_seed({seed})
q = torch.randn(1, 384, 4, {D}, generator=g, device="cuda").to(torch.bfloat16)
k1, v1 = (torch.randn(1, 384, 1, {D}, generator=g, device="cuda").to(torch.bfloat16)
          for _ in range(2))
k, v = k1.expand(1, 384, 2, {D}), v1.expand(1, 384, 2, {D})  # kv-head stride 0
dense = flash_sparse_attn.flash_sparse_attn_func(q, k.contiguous(), v.contiguous(), is_causal=True)
torch.cuda.synchronize()
print("<expanded>", file=sys.stderr, flush=True)
outs = [flash_sparse_attn.flash_sparse_attn_func(q, k, v, is_causal=True) for _ in range(3)]
torch.cuda.synchronize()
print("equal" if all(torch.equal(o, dense) for o in outs) else "differ", flush=True)
"""


def check_tma_fallback(script, *logged, D=None):
    # `script` (a fresh process: the message is logged once per process; {D} in it: the head dim)
    # runs a contiguous call, prints <expanded> on stderr, runs the call whose stride-0 tensors no
    # tensor map describes three times, and prints whether their results equal the contiguous
    # call's. They must, and each kernel's cp.async path (`logged`: (tensors, kernel) pairs) must
    # be named on stderr once after the marker and never before it, and no other.
    run = subprocess.run([sys.executable, "-c", script.format(seed=SEED, D=D)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["equal"], run.stdout + run.stderr
    before, marker, after = run.stderr.partition("<expanded>")
    assert marker and "TMA cannot address" not in before, run.stderr
    assert after.count("TMA cannot address") == len(logged), run.stderr
    for tensors, kernel in logged:
        assert after.count(f"TMA cannot address this call's {tensors}") >= 1, run.stderr
        assert after.count(f"; {kernel} copies them with cp.async") == 1, run.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Hopper forward's TMA path")
@pytest.mark.parametrize("D", [64, 128])
def test_tma_fallback_is_logged_once_and_exact(D):
    # K and V expanded over kv heads (stride 0): the Hopper forward at head dim 128 copies them
    # with cp.async, and says so. At D = 64 the forward loads them with cp.async anyway (nothing
    # logged), but for the experiment FSA_SM90_BAND64_TMA (the band walk's K/V by TMA), whose
    # fallback this is then.
    tma = D == 128 or _C.cuda_kernel_experiments().get("FSA_SM90_BAND64_TMA", 0) != 0
    check_tma_fallback(TMA_FALLBACK, *([("key or value", "the Hopper forward")] if tma else []),
                       D=D)
