"""Packed sequences (varlen): several sequences of different lengths in one tensor, no token
attending across them (FlashAttention's ``flash_attn_varlen_func`` layout, with this library's
mask, bias and top-k).

Layout (documented in docs/numerics.md, "Packed sequences"):
    query (total_q, H, D), key / value (total_k, Hk, D): sequence b owns query rows
    cu_seqlens_q[b] : cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b] : cu_seqlens_k[b + 1].
    attn_mask: bool key mask ({H|Hk|1}, total_k), per key of its sequence.
    attn_bias: per-key bias ({H|Hk|1}, total_k), its gradient in the same layout.
    Causality (is_causal) is per sequence, bottom-right aligned as in SPEC.

Without topk_causal the whole packed batch is one call of the core (PlanOptions::packed): the
plan compacts each sequence's keys, each with the rows of its sequence that see it, reading
cu_seqlens where they are (on a GPU: on the device, no copy to the host), so a call costs one
planning pass and one launch per kernel, and its work follows every sequence's own (causal)
square. topk (per sequence, non-causal) first becomes a key mask with tensor ops on the device
(_packed_topk_mask: create_mask's selection on each sequence, all sequences at once). Offsets on
a GPU cannot be checked without waiting for the device: the plan clamps them into range (wrong
values give wrong rows, never a read out of bounds); offsets on the CPU are checked. With
topk_causal the sequences run one after the other on views of the packed tensors (each row's
top-k among its sequence's causal prefix), which needs the boundaries on the host: cu_seqlens on
a GPU then cost one device-to-host copy per call (a warning says so once).
"""

import warnings
from typing import List, Optional, Tuple

import torch

from . import _C
from .flash_sparse_attn_interface import _check_topk, _dl, _make_plan, _plan_cache, _stream

__all__ = ["flash_sparse_attn_varlen_func"]

_warned_device_bounds = False


def _check_offsets(cu_seqlens, name: str) -> None:
    """Shape and dtype of offsets (their values need them on the host)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D int32 / int64 tensor of batch + 1 offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name}: expected batch + 1 >= 1 offsets, got none")


def _bounds(cu_seqlens, name: str, total: int) -> List[int]:
    global _warned_device_bounds
    _check_offsets(cu_seqlens, name)
    if cu_seqlens.device.type != "cpu" and not _warned_device_bounds:
        _warned_device_bounds = True
        warnings.warn(
            f"{name}: on {cu_seqlens.device}, read back to the host once per call (the varlen "
            "path loops over sequences on the host); pass cu_seqlens on the CPU to avoid the copy",
            stacklevel=3,
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{name}: expected non-decreasing offsets from 0 to {total} (the packed length), got "
            f"{bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-2:]}"
        )
    return bounds


def _offsets_checked(cu_seqlens, name: str, total: int):
    """The offsets of the one-call path: shape and dtype always; values where they are on the
    host (on a GPU that would cost a wait: the plan clamps them instead)."""
    _check_offsets(cu_seqlens, name)
    return _bounds(cu_seqlens, name, total) if cu_seqlens.device.type == "cpu" else None


def _per_key(t: Optional[torch.Tensor], name: str, total_k: int, heads: Tuple[int, int]):
    if t is None:
        return None
    if t.dim() != 2 or t.shape[1] != total_k or t.shape[0] not in (1, *heads):
        raise ValueError(
            f"{name}: packed per key, expected ({{{heads[0]}|{heads[1]}|1}}, {total_k}) "
            f"(heads, total_k), got shape {tuple(t.shape)}"
        )
    return t


def _sequence(t: Optional[torch.Tensor], start: int, end: int):
    """Packed (total, heads, D) -> this sequence's (1, L, heads, D) view; per-key (heads, total)
    -> (1, heads, 1, L) view."""
    if t is None:
        return None
    if t.dim() == 3:
        return t[start:end].unsqueeze(0)
    return t[:, start:end].unsqueeze(0).unsqueeze(2)


class _VarlenAttention(torch.autograd.Function):
    """One core call per sequence on views: per-row top-k (topk_causal) among each sequence's
    causal prefix, whose thresholds each sequence's plan holds."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, bq, bk, scale, causal, softcap, deterministic, topk):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        calls = []  # per sequence: (q rows, k rows, its mask, plan)
        stream = _stream(q)
        for b in range(len(bq) - 1):
            (qs, qe), (ks, ke) = (bq[b], bq[b + 1]), (bk[b], bk[b + 1])
            if qe == qs:
                continue
            q_b, k_b, v_b = (_sequence(t, *rows) for t, rows in ((q, (qs, qe)), (k, (ks, ke)),
                                                                 (v, (ks, ke))))
            mask_b, bias_b = _sequence(mask, ks, ke), _sequence(bias, ks, ke)
            row_topk = topk if ke > ks else 0  # per row of this sequence: thresholds
            # The packed bias is per key: every call with this plan runs compacted if it can.
            plan = _make_plan(q_b, k_b, mask_b, causal, None, None, None, attn_bias=bias_b,
                              row_topk=row_topk, compacted_only=True)
            _C.forward(
                _dl(q_b), _dl(k_b), _dl(v_b), _dl(mask_b), _dl(bias_b),
                _dl(out[qs:qe].unsqueeze(0)), _dl(lse[:, qs:qe].unsqueeze(0)), scale, causal,
                softcap, plan, stream,
            )
            calls.append(((qs, qe), (ks, ke), mask_b, plan))
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.calls, ctx.scale, ctx.causal = calls, scale, causal
        ctx.softcap, ctx.deterministic = softcap, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dout = dout.contiguous()
        dq = torch.zeros_like(q)  # rows of every sequence are written; zeros cover none
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys no query sees stay 0
        dbias = torch.zeros_like(bias) if need_dbias else None
        stream = _stream(q)
        for (qs, qe), (ks, ke), mask_b, plan in ctx.calls:
            _C.backward(
                _dl(dout[qs:qe].unsqueeze(0)), _dl(_sequence(q, qs, qe)),
                _dl(_sequence(k, ks, ke)), _dl(_sequence(v, ks, ke)),
                _dl(out[qs:qe].unsqueeze(0)), _dl(lse[:, qs:qe].unsqueeze(0)), _dl(mask_b),
                _dl(_sequence(bias, ks, ke)), _dl(dq[qs:qe].unsqueeze(0)),
                _dl(_sequence(dk, ks, ke)), _dl(_sequence(dv, ks, ke)),
                _dl(_sequence(dbias, ks, ke) if need_dbias else None), ctx.scale, ctx.causal,
                ctx.softcap, ctx.deterministic, plan, stream,
            )
        return dq, dk, dv, dbias, None, None, None, None, None, None, None, None


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered as create_mask ranks the values of x (docs/numerics.md, "Mask
    utilities"): as floats, -0.0 just below +0.0, every NaN above +inf."""
    bits, wide = {torch.float16: (torch.int16, torch.int32),
                  torch.bfloat16: (torch.int16, torch.int32),
                  torch.float32: (torch.int32, torch.int64),
                  torch.float64: (torch.int64, torch.int64)}[x.dtype]
    i = x.view(bits).to(wide)
    top = torch.iinfo(bits).max
    keys = torch.where(i >= 0, i, i ^ top)  # negative floats: larger magnitude, smaller key
    return keys.masked_fill(torch.isnan(x), torch.iinfo(wide).max)


def _packed_topk_mask(bias, mask, cu_k, topk: int):
    """Per sequence and head, the key mask create_mask(bias, mask, window_size=topk,
    min_dtype=finfo.min) gives on that sequence alone (the top-topk keys by bias, ties to the lower
    index, never a masked key or one equal to the fill), for all sequences at once with tensor ops
    on the bias's device: one stable sort by value, one by sequence, ranks from the offsets. No
    host read. bias ({H|Hk|1}, total_k), mask None or ({H|Hk|1}, total_k); returns bool (heads,
    total_k) with the finer of their head counts."""
    bias = bias.detach()
    if mask is not None:
        hm, hb = mask.shape[0], bias.shape[0]
        if hm != hb and hm > 1 and hb > 1:  # the coarser repeated to the finer, as topk= does
            if hm < hb:
                mask = mask.repeat_interleave(hb // hm, dim=0)
            else:
                bias = bias.repeat_interleave(hm // hb, dim=0)
    fill = torch.finfo(bias.dtype).min
    heads = max(bias.shape[0], 1 if mask is None else mask.shape[0])
    filled = bias.expand(heads, bias.shape[1])
    if mask is not None:
        filled = filled.masked_fill(~mask.expand(heads, bias.shape[1]), fill)
    total = filled.shape[1]
    offsets = cu_k.to(device=filled.device, dtype=torch.int64)
    keys = torch.arange(total, device=filled.device)
    sequence = torch.searchsorted(offsets[1:], keys, right=True)  # key j's sequence
    by_value = torch.sort(_order_keys(filled.contiguous()), dim=1, descending=True,
                          stable=True).indices  # ties keep ascending indices
    by_sequence = torch.sort(sequence[by_value], dim=1, stable=True).indices
    order = by_value.gather(1, by_sequence)  # by sequence, then value descending, then index
    rank = keys[None, :] - offsets[sequence[order]]  # position within its sequence
    kept = (rank < topk) & (filled.gather(1, order) != fill)
    return torch.zeros_like(kept).scatter_(1, order, kept)


class _PackedAttention(torch.autograd.Function):
    """The packed batch as one problem of batch 1 (PlanOptions::packed)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, cu_q, cu_k, scale, causal, softcap, deterministic):
        q1, k1, v1 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        mask1 = None if mask is None else mask.unsqueeze(0).unsqueeze(2)  # (1, Hm, 1, total_k)
        bias1 = None if bias is None else bias.unsqueeze(0).unsqueeze(2)
        plan = _plan_cache.get(q1, k1, mask1, causal, None, None, None, bias1,
                               packed=(cu_q, cu_k))
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        _C.forward(_dl(q1), _dl(k1), _dl(v1), _dl(mask1), _dl(bias1), _dl(out.unsqueeze(0)),
                   _dl(lse.unsqueeze(0)), scale, causal, softcap, plan, _stream(q))
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.mask1, ctx.plan, ctx.scale, ctx.causal = mask1, plan, scale, causal
        ctx.softcap, ctx.deterministic = softcap, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.empty_like(bias) if need_dbias else None
        bias1 = None if bias is None else bias.unsqueeze(0).unsqueeze(2)
        dbias1 = None if dbias is None else dbias.unsqueeze(0).unsqueeze(2)
        _C.backward(
            _dl(dout.unsqueeze(0)), _dl(q.unsqueeze(0)), _dl(k.unsqueeze(0)),
            _dl(v.unsqueeze(0)), _dl(out.unsqueeze(0)), _dl(lse.unsqueeze(0)), _dl(ctx.mask1),
            _dl(bias1), _dl(dq.unsqueeze(0)), _dl(dk.unsqueeze(0)), _dl(dv.unsqueeze(0)),
            _dl(dbias1), ctx.scale, ctx.causal, ctx.softcap, ctx.deterministic, ctx.plan,
            _stream(q),
        )
        return dq, dk, dv, dbias, None, None, None, None, None, None, None, None


def flash_sparse_attn_varlen_func(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    attn_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap: Optional[float] = None,
    deterministic: Optional[bool] = None,
    return_attn_probs: Optional[bool] = None,
    *,
    topk: Optional[int] = None,
    topk_causal: bool = False,
):
    """Attention over packed sequences (module docstring for the layout).

    query (total_q, H, D), key / value (total_k, Hk, D), cu_seqlens_q / cu_seqlens_k (batch + 1,)
    int32 / int64 offsets, read on their device without topk_causal (a GPU call then never waits
    for the GPU; the plan clamps offsets it cannot check) and on the host with it; max_seqlen_q /
    max_seqlen_k are checked against offsets on the host when given (FlashAttention's signature),
    not needed. attn_mask / attn_bias: per key, ({H|Hk|1}, total_k). topk: each
    sequence keeps its topk keys by bias (per head), as ``flash_sparse_attn_func(..., topk=)``
    on that sequence alone; with topk_causal (and is_causal) each row of a sequence keeps the topk
    keys of its causal prefix in that sequence, as ``flash_sparse_attn_func(..., topk=,
    topk_causal=True)``. Returns out (total_q, H, D), or (out, lse (H, total_q), None) with
    return_attn_probs. Differentiable in query, key, value and attn_bias."""
    for name, t, heads_dim in (("query", query, 3), ("key", key, 3), ("value", value, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != heads_dim:
            raise ValueError(f"{name}: expected packed (total, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if key.shape != value.shape:
        raise ValueError(f"value: expected the shape of key {tuple(key.shape)}, got "
                         f"{tuple(value.shape)}")
    packed = not topk_causal  # one call; topk_causal runs per sequence
    if packed:  # one call (PlanOptions::packed): offsets checked where they are on the host
        bq = _offsets_checked(cu_seqlens_q, "cu_seqlens_q", query.shape[0])
        bk = _offsets_checked(cu_seqlens_k, "cu_seqlens_k", key.shape[0])
    else:  # one call per sequence: the boundaries on the host
        bq = _bounds(cu_seqlens_q, "cu_seqlens_q", query.shape[0])
        bk = _bounds(cu_seqlens_k, "cu_seqlens_k", key.shape[0])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets (as "
                         f"cu_seqlens_q), got {cu_seqlens_k.numel()}")
    for name, given, bounds in (("max_seqlen_q", max_seqlen_q, bq), ("max_seqlen_k", max_seqlen_k,
                                                                      bk)):
        if bounds is None:
            continue
        longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
        if given is not None and int(given) < longest:
            raise ValueError(f"{name}: {given} is shorter than the longest sequence ({longest})")
    heads = (query.shape[1], key.shape[1])
    attn_mask = _per_key(attn_mask, "attn_mask", key.shape[0], heads)
    attn_bias = _per_key(attn_bias, "attn_bias", key.shape[0], heads)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask: expected bool, got {attn_mask.dtype}")
    if topk is not None and attn_bias is None:
        raise ValueError("topk: selects keys by attn_bias, which is None; pass attn_bias")
    scale = float(softmax_scale) if softmax_scale is not None else None
    causal = bool(is_causal) if is_causal is not None else False
    if topk_causal:
        if topk is None:
            raise ValueError("topk_causal: selects the topk keys of each row; pass topk as well")
        if not causal:
            raise ValueError(
                "topk_causal: selects among the keys causality lets each row see, so it needs "
                "is_causal=True (without causality, topk alone selects the same keys)"
            )
        _check_topk(topk, attn_bias.unsqueeze(0).unsqueeze(2), key)
    cap = float(softcap) if softcap else 0.0
    if packed:
        for name, t in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
            if t is not None and t.device != query.device:
                raise ValueError(f"{name}: expected device {query.device} (the query's), got "
                                 f"{t.device}")
        if topk is not None:
            _check_topk(topk, attn_bias.unsqueeze(0).unsqueeze(2), key)
            attn_mask = _packed_topk_mask(attn_bias, attn_mask, cu_seqlens_k, topk)
        out, lse = _PackedAttention.apply(
            query, key, value, attn_bias, attn_mask, cu_seqlens_q, cu_seqlens_k, scale, causal,
            cap, bool(deterministic) if deterministic is not None else False)
        if return_attn_probs:
            return out, lse, None
        return out
    out, lse = _VarlenAttention.apply(
        query, key, value, attn_bias, attn_mask, bq, bk, scale, causal, cap,
        bool(deterministic) if deterministic is not None else False, topk)
    if return_attn_probs:
        return out, lse, None
    return out
