"""New queries over a K / V cache, contiguous or paged (decode and chunked prefill; inference only).

Layout (docs/numerics.md, "Paged KV cache"):
    query (B, Sq, H, D): the last Sq tokens of each sequence, already written into the cache.
    Contiguous cache: k_cache / v_cache (B, Sk, Hk, D).
    Paged cache: k_cache / v_cache (num_pages, page_size, Hk, D) and page_table (B, max_pages)
        int32: batch b's key j is row j % page_size of page page_table[b, j // page_size], so
        Sk = max_pages * page_size (ForwardArgs::paged_kv in C++).
    cache_seqlens (B,): batch b holds keys [0, cache_seqlens[b]); default all Sk. With is_causal,
        query row i of batch b sees keys j <= i + cache_seqlens[b] - Sq (bottom-right within the
        sequence's own length).
    attn_mask / attn_bias: as flash_sparse_attn_func's, over the Sk keys.

The sequence lengths become a key mask (and, with causality, a (B, 1, Sq, Sk) mask) built with
tensor ops on the query's device: no host read. On CUDA the page table is never read on the host:
the kernels load each K / V row through it (an entry outside [0, num_pages) is clamped into that
range there, where the CPU backend raises), and a paged call runs the sm80 forward kernel (the
one GQA-packed decode runs anyway; prefill-sized calls give up the Hopper kernel's speed).
"""

from typing import Optional

import torch

from . import _C
from .flash_sparse_attn_interface import _dl, _new_outputs, _plan_for_call, _stream

__all__ = ["flash_sparse_attn_with_kvcache"]


def _length_mask(cache_seqlens, batch: int, seqlen_q: int, seqlen_k: int, causal: bool, device):
    """The keys each batch holds ((B, 1, 1, Sk)), and with causality the keys each of its rows
    sees ((B, 1, Sq, Sk)): j <= i + cache_seqlens[b] - Sq."""
    lengths = cache_seqlens.to(device=device, dtype=torch.int64).view(batch, 1, 1, 1)
    keys = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    held = keys < lengths
    if not causal:
        return held
    rows = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    return held & (keys <= rows + lengths - seqlen_q)


def flash_sparse_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    softcap: Optional[float] = None,
    return_softmax_lse: bool = False,
):
    """Attention of q (B, Sq, H, D) over a cache (module docstring for the layouts). Returns out
    (B, Sq, H, D), or (out, lse (B, H, Sq) fp32) with return_softmax_lse. No gradient: a call
    whose inputs require one while grad is enabled raises ValueError (use
    flash_sparse_attn_func for training)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k_cache, v_cache, attn_bias)):
        raise ValueError("q: flash_sparse_attn_with_kvcache is inference only (no gradient); "
                         "call it under torch.no_grad(), or use flash_sparse_attn_func")
    batch, seqlen_q = q.shape[0], q.shape[1]
    if page_table is not None:
        if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or \
                page_table.dtype != torch.int32:
            raise ValueError("page_table: expected a (batch, max_pages) int32 tensor, got "
                             f"{getattr(page_table, 'dtype', type(page_table))} "
                             f"{tuple(getattr(page_table, 'shape', ()))}")
        if page_table.shape[0] != batch:
            raise ValueError(f"page_table: expected batch {batch} (the query's), got "
                             f"{page_table.shape[0]}")
        page_table = page_table.contiguous()
        seqlen_k = page_table.shape[1] * k_cache.shape[1]
        # make_plan reads shapes only: the key axis the pages present, (B, Sk, Hk, D).
        key_axis = k_cache[:1, :1].expand(batch, seqlen_k, *k_cache.shape[2:])
    else:
        seqlen_k = k_cache.shape[1]
        key_axis = k_cache
    causal = bool(is_causal)
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,) or \
                cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cache_seqlens: expected ({batch},) int32 / int64, got "
                             f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens))} "
                             f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
        held = _length_mask(cache_seqlens, batch, seqlen_q, seqlen_k, causal, q.device)
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or \
                    attn_mask.dim() != 4:
                raise ValueError("attn_mask: expected a 4-D bool tensor (True = keep)")
            try:
                held = held & attn_mask.to(held.device)
            except RuntimeError as e:
                raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast "
                                 f"with ({batch}, 1, {seqlen_q}, {seqlen_k}): {e}") from e
        attn_mask, causal = held, False  # causality within each sequence's length is in the mask
    plan = _plan_for_call(q, key_axis, attn_mask, causal, None, None, None, attn_bias)
    out, lse = _new_outputs(q, return_softmax_lse)
    _C.forward(_dl(q), _dl(k_cache), _dl(v_cache), _dl(attn_mask), _dl(attn_bias), _dl(out),
               _dl(lse), softmax_scale, causal, float(softcap) if softcap else 0.0, plan,
               _stream(q), page_table=_dl(page_table))
    return (out, lse) if return_softmax_lse else out
