"""K / V caches on CUDA (flash_sparse_attn_with_kvcache, issue #15): a contiguous cache with
cache_seqlens equals each sequence's own keys run alone; a paged cache equals the contiguous one
(bitwise where both run the same kernel: decode's GQA-packed rows, and compacted keys, which are
gathered through the table), for pages of 16, 64 and 256 keys; cache_seqlens against float64 with
NaN past every length, one plan for a decode loop, no host read; out-of-range table entries and
lengths are clamped on the device, never read past the cache; rows that are not 16-byte chunks are
refused."""

import math

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func, flash_sparse_attn_with_kvcache
from flash_sparse_attn.flash_sparse_attn_interface import _plan_cache
from test_cuda_forward import ATOL, SEED, attention

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)


@pytest.mark.parametrize("seqlen_q", [1, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_contiguous_cache_with_lengths(seqlen_q, causal):
    g = torch.Generator(device="cuda").manual_seed(1)
    B, Sk, H, Hk, D, dtype = 3, 1024, 8, 2, 128, torch.bfloat16
    q = torch.randn(B, seqlen_q, H, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, Sk, Hk, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    bias = torch.randn(B, Hk, 1, Sk, device="cuda", generator=g).to(dtype)
    lens = [1024, 300, 64]
    with torch.no_grad():
        out = flash_sparse_attn_with_kvcache(q, k, v, torch.tensor(lens, device="cuda"),
                                             attn_bias=bias, is_causal=causal)
    for b, L in enumerate(lens):
        alone = flash_sparse_attn_func(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L],
                                       attn_bias=bias[b:b + 1, ..., :L], is_causal=causal)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=2e-2, atol=2e-2,
                                   msg=f"batch {b} length {L}")


def _paged(k, v, page_size, g):
    """The contiguous cache (B, Sk, Hk, D) as shuffled pages plus their table (and spare pages
    of noise no entry names)."""
    B, Sk = k.shape[:2]
    max_pages = Sk // page_size
    n = B * max_pages
    perm = torch.randperm(n + 3, generator=g, device="cuda")[:n]
    k_pages = torch.randn(n + 3, page_size, *k.shape[2:], generator=g, device="cuda").to(k.dtype)
    v_pages = torch.randn(n + 3, page_size, *v.shape[2:], generator=g, device="cuda").to(v.dtype)
    table = perm.view(B, max_pages).to(torch.int32)
    rows = k.view(B, max_pages, page_size, *k.shape[2:])
    k_pages[table.long()] = rows
    v_pages[table.long()] = v.view(B, max_pages, page_size, *v.shape[2:])
    return k_pages, v_pages, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (1, True), (37, True), (130, False)])
def test_paged_equals_contiguous(dtype, page_size, seqlen_q, causal):
    # Sq = 1: decode (GQA-packed rows, the sm80 kernel either way): bitwise. Sq = 130: the key
    # mask's keys are compacted, gathered through the table into the same buffers: bitwise.
    # Sq = 37: the contiguous call runs the Hopper kernel, the paged one the sm80 kernel: equal
    # to rounding.
    g = torch.Generator(device="cuda").manual_seed(page_size + seqlen_q)
    B, Sk, H, Hk, D = 3, 2048, 8, 2, 128
    q = torch.randn(B, seqlen_q, H, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(B, Sk, Hk, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    lens = torch.tensor([2048, 1000, 37], device="cuda")
    mask = torch.rand(B, Hk, 1, Sk, generator=g, device="cuda") < 0.8
    bias = torch.randn(B, Hk, 1, Sk, generator=g, device="cuda").to(dtype)
    k_pages, v_pages, table = _paged(k, v, page_size, g)
    with torch.no_grad():
        ref, ref_lse = flash_sparse_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, attn_mask=mask, attn_bias=bias, is_causal=causal,
            return_softmax_lse=True)
        out, lse = flash_sparse_attn_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=lens, page_table=table, attn_mask=mask,
            attn_bias=bias, is_causal=causal, return_softmax_lse=True)
    assert not out.isnan().any()
    if seqlen_q == 37:
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_long_paged_decode_equals_contiguous():
    # 64K keys in pages of 64, one kv head per batch: split-KV over many splits, each walking its
    # pages through the decode kernel's stages; a key mask keeping whole blocks and partial ones.
    g = torch.Generator(device="cuda").manual_seed(7)
    B, Sk, H, Hk, D, dtype = 2, 65536, 8, 1, 128, torch.bfloat16
    q = torch.randn(B, 1, H, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(B, Sk, Hk, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    mask = (torch.rand(B, 1, 1, Sk // 128, generator=g, device="cuda") < 0.2).repeat_interleave(
        128, -1) & (torch.rand(B, 1, 1, Sk, generator=g, device="cuda") < 0.95)
    k_pages, v_pages, table = _paged(k, v, 64, g)
    with torch.no_grad():
        ref = flash_sparse_attn_with_kvcache(q, k, v, attn_mask=mask)
        out = flash_sparse_attn_with_kvcache(q, k_pages, v_pages, page_table=table, attn_mask=mask)
    assert torch.equal(out, ref)


def test_out_of_range_entries_are_clamped():
    # The table is never read on the host: an entry below 0 reads page 0, one past the end the
    # last page, exactly as if the table named them.
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 1, 4, 64, generator=g, device="cuda").to(torch.bfloat16)
    pages = torch.randn(5, 16, 2, 64, generator=g, device="cuda").to(torch.bfloat16)
    bad = torch.tensor([[-7, 1], [2, 1 << 30]], dtype=torch.int32, device="cuda")
    clamped = torch.tensor([[0, 1], [2, 4]], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        out = flash_sparse_attn_with_kvcache(q, pages, pages, page_table=bad)
        ref = flash_sparse_attn_with_kvcache(q, pages, pages, page_table=clamped)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_paged_rows_must_be_16_byte_chunks():
    q = torch.randn(2, 1, 4, 60, device="cuda", dtype=torch.bfloat16)
    pages = torch.randn(4, 16, 2, 60, device="cuda", dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    with torch.no_grad(), pytest.raises(Exception, match="16-byte rows"):
        flash_sparse_attn_with_kvcache(q, pages, pages, page_table=table)


def _lengths_reference(q, k, v, lens, mask, bias, causal, compute_dtype):
    """attention() with batch b's keys [0, lens[b]) and causality within them: each sequence
    alone, its keys past the length cut off (their NaN never reach the reference)."""
    outs, lses = [], []
    for b, L in enumerate(lens):
        m = None if mask is None else mask[b:b + 1, ..., :L]
        bi = None if bias is None else bias[b:b + 1, ..., :L]
        o, lse = attention(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L], m, bi,
                           1.0 / math.sqrt(q.shape[-1]), causal, 0.0, compute_dtype)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen_q", [1, 3, 130])  # decode (split keys), packed rows, row tiles
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_lengths_against_float64(dtype, seqlen_q, causal, paged):
    # Lengths 0, 1, ragged and whole; K / V past every length NaN (what an unwritten cache may
    # hold); a key mask with whole and partial blocks and a per-key bias. Decode runs many splits
    # over 8K keys, so splits past a length have nothing to do.
    g = torch.Generator(device="cuda").manual_seed(SEED)
    B, Sk, H, Hk, D = 5, 8192, 8, 2, 128
    lens = [Sk, 0, 1, 1000, 4161]
    q = torch.randn(B, seqlen_q, H, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, Sk, Hk, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    for b, L in enumerate(lens):
        k[b, L:] = float("nan")
        v[b, L:] = float("nan")
    mask = (torch.rand(B, Hk, 1, Sk // 64, generator=g, device="cuda") < 0.7).repeat_interleave(
        64, -1) & (torch.rand(B, Hk, 1, Sk, generator=g, device="cuda") < 0.9)
    bias = torch.randn(B, Hk, 1, Sk, generator=g, device="cuda").to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kk, vv, table = (k, v, None) if not paged else _paged(k, v, 64, g)
    with torch.no_grad():
        out, lse = flash_sparse_attn_with_kvcache(q, kk, vv, seqlens, table, attn_mask=mask,
                                                  attn_bias=bias, is_causal=causal,
                                                  return_softmax_lse=True)
    ref, ref_lse = _lengths_reference(q, k, v, lens, mask, bias, causal, torch.float64)
    naive, _ = _lengths_reference(q, k, v, lens, mask, bias, causal, dtype)
    where = f"seed={SEED} dtype={dtype} Sq={seqlen_q} causal={causal} paged={paged}"
    assert not out.isnan().any() and not lse.isnan().any(), f"NaN: {where}"
    empty = ref_lse == -math.inf
    assert empty[1].all(), "length 0: every row empty"
    assert (lse[empty] == -math.inf).all() and (out.transpose(1, 2)[empty] == 0).all(), where
    err = (out.double() - ref).abs().max().item()
    naive_err = (naive.double() - ref).abs().max().item()
    assert err <= 2 * naive_err + ATOL, f"out error {err:.3e} > 2 x naive {naive_err:.3e}: {where}"
    kept = ~empty
    lse_err = (lse.double() - ref_lse)[kept].abs().max().item()
    assert lse_err <= 1e-2, f"lse error {lse_err:.3e}: {where}"


def _decode_inputs(B, Sk, H, Hk, D):
    """A seeded generator, one bf16 query per head, a K / V cache and a key mask keeping half."""
    g = torch.Generator(device="cuda").manual_seed(SEED)
    q = torch.randn(B, 1, H, D, device="cuda", generator=g).to(torch.bfloat16)
    k, v = (torch.randn(B, Sk, Hk, D, device="cuda", generator=g).to(torch.bfloat16)
            for _ in range(2))
    mask = torch.rand(B, Hk, 1, Sk, generator=g, device="cuda") < 0.5
    return g, q, k, v, mask


def test_decode_loop_reuses_one_plan_and_reads_nothing_on_the_host():
    # Growing lengths with one key mask: the plan cache holds one plan for every step, and a step
    # (int64 lengths converted on the device included) never waits for the GPU.
    _, q, k, v, mask = _decode_inputs(2, 4096, 8, 2, 64)
    lens = torch.tensor([100, 2000], device="cuda")
    _plan_cache.clear()
    outs = []
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(4):
                outs.append(flash_sparse_attn_with_kvcache(q, k, v, lens + step, attn_mask=mask))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(_plan_cache._entries) == 1
    for step, out in enumerate(outs):
        now = (lens + step).tolist()
        ref, _ = _lengths_reference(q, k, v, now, mask, None, False, torch.float64)
        naive, _ = _lengths_reference(q, k, v, now, mask, None, False, q.dtype)
        err = (out.double() - ref).abs().max().item()
        naive_err = (naive.double() - ref).abs().max().item()
        assert err <= 2 * naive_err + ATOL, f"step {step}: {err:.3e} > 2 x {naive_err:.3e}"


def test_out_of_range_lengths_are_clamped():
    # Lengths are never read on the host: below 0 is 0 (empty rows), past Sk is Sk.
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(3, 1, 4, 64, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(3, 256, 2, 64, generator=g, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        out, lse = flash_sparse_attn_with_kvcache(
            q, k, k, torch.tensor([-5, 1 << 30, 256], dtype=torch.int32, device="cuda"),
            return_softmax_lse=True)
        whole = flash_sparse_attn_with_kvcache(q, k, k)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert torch.equal(out[1:], whole[1:])


def test_decode_step_replays_from_a_cuda_graph():
    # A decode step with cache_seqlens has no host read and a plan made before capture, so a
    # serving loop can capture it once and replay it with new lengths and queries written in place.
    B, H, D = 3, 8, 128
    g, q, k, v, mask = _decode_inputs(B, 8192, H, 2, D)
    lens = torch.tensor([100, 5000, 8192], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        # The warm-up plans on the capture's own stream (plans are cached per stream), so the
        # capture finds the plan and holds no planning kernels.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            flash_sparse_attn_with_kvcache(q, k, v, lens, attn_mask=mask, is_causal=True)
        torch.cuda.current_stream().wait_stream(stream)
        plans = len(_plan_cache._entries)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = flash_sparse_attn_with_kvcache(q, k, v, lens, attn_mask=mask, is_causal=True)
        assert len(_plan_cache._entries) == plans, "the capture planned again"
        for step, now in enumerate(([1, 4999, 8000], [0, 64, 8192], [7, 7, 7])):
            lens.copy_(torch.tensor(now, dtype=torch.int32))
            q.copy_(torch.randn(B, 1, H, D, device="cuda", generator=g).to(torch.bfloat16))
            graph.replay()
            eager = flash_sparse_attn_with_kvcache(q, k, v, lens, attn_mask=mask, is_causal=True)
            torch.cuda.synchronize()
            assert torch.equal(out, eager), f"step {step} lengths {now}"
