"""New queries over a K / V cache (flash_sparse_attn_with_kvcache, issue #15): a paged cache gives
bitwise what the same keys in a contiguous cache give, and cache_seqlens give what each sequence's
own keys give (flash_sparse_attn_func on them, and float64); bad input names the argument."""

import math

import pytest
import torch

from flash_sparse_attn import flash_sparse_attn_func, flash_sparse_attn_with_kvcache

H, HK, D = 4, 2, 16


def _paged(k, v, page_size, g):
    """The contiguous cache (B, Sk, Hk, D) as shuffled pages plus their table (and spare pages)."""
    B, Sk = k.shape[:2]
    max_pages = Sk // page_size
    n = B * max_pages
    perm = torch.randperm(n + 3, generator=g)[:n]  # pages in any order, some unused
    k_pages = torch.randn(n + 3, page_size, *k.shape[2:], generator=g).to(k.dtype)
    v_pages = torch.randn(n + 3, page_size, *v.shape[2:], generator=g).to(v.dtype)
    table = perm.view(B, max_pages).to(torch.int32)
    for b in range(B):
        for p in range(max_pages):
            rows = slice(p * page_size, (p + 1) * page_size)
            k_pages[table[b, p]] = k[b, rows]
            v_pages[table[b, p]] = v[b, rows]
    return k_pages, v_pages, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (1, True), (37, True), (37, False),
                                             (130, False)])  # 130: the key mask's compacted keys
def test_paged_equals_contiguous_bitwise(dtype, page_size, seqlen_q, causal):
    g = torch.Generator().manual_seed(page_size + seqlen_q)
    B, Sk = 3, 512
    q = torch.randn(B, seqlen_q, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Sk, HK, D, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([512, 300, 37])
    mask = torch.rand(B, HK, 1, Sk, generator=g) < 0.8
    bias = torch.randn(B, HK, 1, Sk, generator=g).to(dtype)
    k_pages, v_pages, table = _paged(k, v, page_size, g)
    with torch.no_grad():
        ref, ref_lse = flash_sparse_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, attn_mask=mask, attn_bias=bias, is_causal=causal,
            return_softmax_lse=True)
        out, lse = flash_sparse_attn_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=lens, page_table=table, attn_mask=mask,
            attn_bias=bias, is_causal=causal, return_softmax_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
        # Without lengths the whole Sk keys, causality as flash_sparse_attn_func's.
        whole = flash_sparse_attn_with_kvcache(q, k_pages, v_pages, page_table=table,
                                               attn_bias=bias, is_causal=causal)
        assert torch.equal(whole, flash_sparse_attn_func(q, k, v, attn_bias=bias,
                                                         is_causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_cache_seqlens_are_each_sequence_alone(causal):
    g = torch.Generator().manual_seed(3)
    B, Sq, Sk = 3, 5, 96
    q = torch.randn(B, Sq, H, D, generator=g)
    k, v = (torch.randn(B, Sk, HK, D, generator=g) for _ in range(2))
    bias = torch.randn(B, HK, 1, Sk, generator=g)
    lens = [96, 40, 5]
    k_pages, v_pages, table = _paged(k, v, 16, g)
    with torch.no_grad():
        out = flash_sparse_attn_with_kvcache(q, k_pages, v_pages, torch.tensor(lens, dtype=torch.int32),
                                             table, attn_bias=bias, is_causal=causal)
    for b, L in enumerate(lens):
        alone = flash_sparse_attn_func(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L],
                                       attn_bias=bias[b:b + 1, ..., :L], is_causal=causal)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)
        # float64: rows see keys j <= i + L - Sq under causality.
        qd, kd, vd = (t[b].double().transpose(0, 1) for t in (q, k[:, :L], v[:, :L]))
        kd, vd = kd.repeat_interleave(H // HK, 0), vd.repeat_interleave(H // HK, 0)
        s = qd @ kd.transpose(-1, -2) / math.sqrt(D) + bias[b, :, 0, :L].double().repeat_interleave(
            H // HK, 0)[:, None, :]
        if causal:
            i = torch.arange(Sq)[:, None]
            s = s.masked_fill(torch.arange(L)[None, :] > i + L - Sq, -math.inf)
        ref = (s.softmax(-1) @ vd).transpose(0, 1)
        assert (out[b].double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (1, True), (70, True), (70, False)])
def test_keys_past_a_length_never_reach_the_result(seqlen_q, causal):
    # NaN past each length (an unwritten cache); a length of 0 gives empty rows (O = 0, LSE =
    # -inf); 70 query rows span two of the CPU's 64-row tiles, whose causal bounds differ.
    g = torch.Generator().manual_seed(seqlen_q)
    B, Sk = 4, 200
    q = torch.randn(B, seqlen_q, H, D, generator=g)
    k, v = (torch.randn(B, Sk, HK, D, generator=g) for _ in range(2))
    lens = [200, 0, 71, 130]
    clean = [t.clone() for t in (k, v)]
    for b, L in enumerate(lens):
        k[b, L:] = float("nan")
        v[b, L:] = float("inf")
    mask = torch.rand(B, 1, 1, Sk, generator=g) < 0.7
    with torch.no_grad():
        out, lse = flash_sparse_attn_with_kvcache(q, k, v, torch.tensor(lens), attn_mask=mask,
                                                  is_causal=causal, return_softmax_lse=True)
        ref, ref_lse = flash_sparse_attn_with_kvcache(q, *clean, torch.tensor(lens),
                                                      attn_mask=mask, is_causal=causal,
                                                      return_softmax_lse=True)
    assert not out.isnan().any()
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()
    for b, L in enumerate(lens):
        if L == 0:
            continue
        alone = flash_sparse_attn_func(q[b:b + 1], clean[0][b:b + 1, :L], clean[1][b:b + 1, :L],
                                       attn_mask=mask[b:b + 1, ..., :L], is_causal=causal)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)


def test_decode_loop_reuses_one_plan():
    # The lengths are the kernels', not the plan's: growing them keeps the plan of (shapes, mask).
    from flash_sparse_attn.flash_sparse_attn_interface import _plan_cache
    g = torch.Generator().manual_seed(11)
    B, Sk = 2, 256
    q = torch.randn(B, 1, H, D, generator=g)
    k, v = (torch.randn(B, Sk, HK, D, generator=g) for _ in range(2))
    mask = torch.rand(B, HK, 1, Sk, generator=g) < 0.5
    _plan_cache.clear()
    with torch.no_grad():
        for step in range(3):
            lens = torch.tensor([10 + step, 200 + step], dtype=torch.int32)
            out = flash_sparse_attn_with_kvcache(q, k, v, lens, attn_mask=mask)
            for b in range(B):
                L = int(lens[b])
                alone = flash_sparse_attn_func(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L],
                                               attn_mask=mask[b:b + 1, ..., :L])
                torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)
    assert len(_plan_cache._entries) == 1


def test_bad_input_names_the_argument():
    q = torch.randn(2, 1, H, D)
    k_pages = torch.randn(6, 16, HK, D)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="page_table"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, page_table=table.clone().fill_(6))
        with pytest.raises(ValueError, match="page_table"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, page_table=table.clone().fill_(-1))
        with pytest.raises(ValueError, match="page_table"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, page_table=table.long())
        with pytest.raises(ValueError, match="page_table"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, page_table=table[:1])
        with pytest.raises(ValueError, match="cache_seqlens"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, torch.tensor([3]), table)
        for bad in ([3, 33], [-1, 4], [3, 1 << 40]):  # the cache holds 32 keys
            with pytest.raises(ValueError, match=r"cache_seqlens.*\[0, 32\]"):
                flash_sparse_attn_with_kvcache(q, k_pages, k_pages, torch.tensor(bad), table)
        with pytest.raises(ValueError, match="attn_mask"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages, torch.tensor([3, 4]), table,
                                           attn_mask=torch.ones(2, 1, 1, 7, dtype=torch.bool))
        # the core's query / key / value errors name this function's q / k_cache / v_cache
        with pytest.raises(ValueError, match=r"^v_cache: .*\(k_cache's\)"):
            flash_sparse_attn_with_kvcache(q, k_pages, k_pages[:, :8], page_table=table)
        with pytest.raises(ValueError, match="^k_cache: "):
            flash_sparse_attn_with_kvcache(q, k_pages[..., :8], k_pages[..., :8],
                                           page_table=table)
        with pytest.raises(TypeError, match="^q: "):
            flash_sparse_attn_with_kvcache(q.int(), k_pages, k_pages, page_table=table)
    with pytest.raises(ValueError, match="inference"):
        flash_sparse_attn_with_kvcache(q.requires_grad_(True), k_pages, k_pages, page_table=table)
