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

The sequence lengths go to the kernels (ForwardArgs::cache_seqlens), not into a mask: the plan
depends on the shapes, attn_mask and causality only, so a decode loop whose lengths grow reuses one
plan (the plan cache's) while its mask stays, and the kernels skip each sequence's key blocks past
its length. Keys past a length may hold anything (NaN included): they are never part of a result.
int64 lengths are converted on the query's device; on CUDA they are never read on the host (a
length outside [0, Sk] is clamped into it there, where the CPU backend raises), and a call with
lengths runs the sm80 forward kernel. Nor is the page table read on the host on CUDA:
the kernels load each K / V row through it (an entry outside [0, num_pages) is clamped into that
range there, where the CPU backend raises), and a paged call runs the sm80 forward kernel (the
one GQA-packed decode runs anyway; prefill-sized calls give up the Hopper kernel's speed).
"""

import contextlib
from typing import Optional

import torch

from . import _C
from .flash_sparse_attn_interface import (_dl, _new_outputs, _PagedKeyAxis, _plan_for_call,
                                          _stream)

__all__ = ["flash_sparse_attn_with_kvcache"]

# The core names its operands query / key / value; this function's are q / k_cache / v_cache.
_CACHE_NAMES = {"query": "q", "key": "k_cache", "value": "v_cache"}


@contextlib.contextmanager
def _cache_argument_names():
    """Errors of the core's calls inside, re-raised naming this function's arguments."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as e:
        name, colon, rest = str(e).partition(":")
        if not colon or name not in _CACHE_NAMES:
            raise
        for core, ours in _CACHE_NAMES.items():
            rest = rest.replace(f"(the {core}'s)", f"({ours}'s)")
        raise type(e)(_CACHE_NAMES[name] + colon + rest) from e


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
    batch = q.shape[0]
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
        key_axis = _PagedKeyAxis(k_cache, batch, seqlen_k)
    else:
        seqlen_k = k_cache.shape[1]
        key_axis = k_cache
    seqlens = None
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,) or \
                cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cache_seqlens: expected ({batch},) int32 / int64, got "
                             f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens))} "
                             f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
        seqlens = cache_seqlens
        if seqlens.dtype == torch.int64:  # out of range stays out of range (the core's rule)
            seqlens = seqlens.clamp(-1, seqlen_k + 1)
        # On the query's device, int32, contiguous: tensor ops, no read on the host.
        seqlens = seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    # The plan sees shapes, the mask and causality only (the lengths are the kernels'), so a decode
    # loop reuses it while the mask stays; calls with lengths keep the map of the full key axis.
    stream = _stream(q)
    with _cache_argument_names():
        plan = _plan_for_call(q, key_axis, attn_mask, bool(is_causal), None, None, None,
                              attn_bias, compact_keys="auto" if seqlens is None else "never",
                              stream=stream)
        out, lse = _new_outputs(q, return_softmax_lse)
        _C.forward(_dl(q), _dl(k_cache), _dl(v_cache), _dl(attn_mask), _dl(attn_bias), _dl(out),
                   _dl(lse), softmax_scale, bool(is_causal), float(softcap) if softcap else 0.0,
                   plan, stream, page_table=_dl(page_table), cache_seqlens=_dl(seqlens))
    return (out, lse) if return_softmax_lse else out
