"""K / V caches on CUDA (flash_sparse_attn_with_kvcache, issue #15): a contiguous cache with
cache_seqlens equals each sequence's own keys run alone; a paged cache equals the contiguous one
(bitwise where both run the same kernel: decode's GQA-packed rows, and compacted keys, which are
gathered through the table), for pages of 16, 64 and 256 keys; out-of-range table entries are
clamped on the device, never read past the cache; rows that are not 16-byte chunks are refused."""

import pytest
import torch

from flash_sparse_attn import _C, flash_sparse_attn_func, flash_sparse_attn_with_kvcache

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
