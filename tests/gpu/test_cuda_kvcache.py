"""K / V caches on CUDA (flash_sparse_attn_with_kvcache, issue #15): a contiguous cache with
cache_seqlens equals each sequence's own keys run alone, and a paged cache is refused with an error
naming paged_kv (the CUDA kernels have no paged loads yet), before anything is written."""

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


def test_paged_cache_is_refused_on_cuda():
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    pages = torch.randn(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    with torch.no_grad(), pytest.raises(Exception, match="paged_kv"):
        flash_sparse_attn_with_kvcache(q, pages, pages, page_table=table)
