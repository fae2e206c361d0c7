"""PyTorch front end of the C++ core: ``flash_sparse_attn_func`` with autograd and torch.compile.

Routes into the one core:

* eager, no gradient needed: a direct call into the extension (the cheapest route; the
  tiny-problem overhead bar of the project is measured here);
* eager with gradients: ``FlashSparseAttnFunc`` (torch.autograd.Function); the block-map plan is
  built once in forward, kept on ``ctx`` and reused by backward;
* plans are also cached across calls that share a mask (``_PlanCache``: the layers of one step),
  and, on CUDA, across mask-free calls of the same shapes;
* under torch.compile: the torch.library custom ops ``flash_sparse_attn::fwd`` / ``::bwd`` with
  fake kernels (so ``fullgraph=True`` traces without graph breaks) and ``register_autograd``. The
  plan is handed from the forward op to the backward op through a small int64 handle tensor
  (an id into a bounded registry; an evicted plan is rebuilt, never reused wrongly).

Outputs are allocated here, by torch, and written in place by the core; tensors reach C++ through
DLPack (no torch headers in C++). CUDA tensors run on the current CUDA stream.
"""

import collections
import itertools
import os
import threading
import weakref
from typing import Optional, Tuple

import torch

from . import _C
# _stream: the current CUDA stream's handle through torch's C-level getter, about 0.3 us against
# about 6 us for torch.cuda.current_stream(device).cuda_stream; a per-row top-k call asks for it
# three times, and its forward + backward took 0.2-0.4 ms more host time with the public getter
# (H200 host, docs/perf.md).
from .utils.mask import _block_pair, _stream

_Tensor = torch.Tensor


# ---- helpers -------------------------------------------------------------------------------------


def _last_dim_contiguous(x: Optional[_Tensor]) -> Optional[_Tensor]:
    """The core needs unit stride on the head dim only; any other layout passes through."""
    if x is not None and x.dim() > 0 and x.stride(-1) != 1:
        return x.contiguous()
    return x




def _check_inputs(query, key, value, attn_mask, attn_bias) -> None:
    """Python-side checks that must come before outputs are allocated; the core checks the rest."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if query.dim() != 4:
        raise ValueError(
            "query: expected 4 dims (batch, seqlen_q, num_heads, head_dim), "
            f"got shape {tuple(query.shape)}"
        )


def _block_tile(block_mask, block_size) -> Tuple[Optional[int], Optional[int]]:
    """block_mask's (bm, bn) tile, default (128, 128); (None, None) without a block_mask. A
    block_size without a block_mask describes nothing: an error rather than silently ignored."""
    if block_mask is None:
        if block_size is not None:
            raise ValueError(
                f"block_size: gives block_mask's tile, but block_mask is None; pass a block_mask "
                f"or leave block_size out (got block_size={block_size!r})"
            )
        return None, None
    return (128, 128) if block_size is None else _block_pair(block_size)


def _new_outputs(query: _Tensor, need_lse: bool):
    # empty_like / new_empty: about half the host time of torch.empty(shape, dtype=, device=)
    # (5.8 against 11 us on the H200 host), which a decode step pays per layer.
    if query.is_contiguous():
        out = torch.empty_like(query)
    else:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    lse = None
    if need_lse:
        batch, seqlen_q, num_heads, _ = query.shape
        lse = query.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
    return out, lse


# Tensors cross into C++ as DLPack capsules made by torch's C-level exporter: about 0.2 us each,
# against about 2 us for the Python-level Tensor.__dlpack__ that nanobind would call otherwise
# (which also refuses tensors that require grad; the core never records history anyway). The
# tensors come from the current stream, on which the core runs, so no stream handshake is needed.
_to_dlpack = getattr(torch._C, "_to_dlpack", None) or torch.utils.dlpack.to_dlpack


def _dl(t: Optional[_Tensor]):
    return None if t is None else _to_dlpack(t)


_COMPACT_MIN_QUERIES = 128  # the core's CompactKeys::kAuto threshold (kCompactMinQueries)


def _interval_candidate(q, attn_mask, block_mask, attn_bias, row_topk, max_kept) -> bool:
    """Whether a call's mask may run as one interval of rows per key (the core's
    PlanOptions::mask_key_intervals): a mask with a query dim, no block selection or top-k, a
    query block the core would compact, and a bias (if any) without a query dim, so that every
    call with the plan runs over the compacted keys."""
    return (attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[2] > 1
            and attn_mask.stride(2) != 0 and block_mask is None and not row_topk
            and not max_kept and q.shape[1] >= _COMPACT_MIN_QUERIES
            and _query_invariant(attn_bias) and (not q.is_cuda or _cuda_mask_intervals()))


def _cuda_mask_intervals() -> bool:
    """FSA_CUDA_MASK_INTERVALS=0 keeps every mask with a query dim on the block map on CUDA
    (A/B measurements, docs/perf.md)."""
    return os.environ.get("FSA_CUDA_MASK_INTERVALS") != "0"


def _query_invariant(attn_bias) -> bool:
    """No bias, or one (and so its gradient) without a query dim: calls that run over a
    compacted plan's keys."""
    return attn_bias is None or attn_bias.dim() != 4 or attn_bias.shape[2] == 1


def _offsets(cu_seqlens, device):
    """Packed sequences' offsets as the core takes them: contiguous int32 on the query's device
    (a CPU tensor is copied over without waiting; a device tensor is converted there)."""
    return cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True).contiguous()


class _PagedKeyAxis:
    """The (B, Sk, Hk, D) key axis a paged cache presents, standing in for k where a plan is
    made: its shape keys the plan cache, and the view make_plan reads (shapes only) is made on a
    cache miss alone (an expand costs a decode step several microseconds of host time)."""

    __slots__ = ("shape", "_pages")

    def __init__(self, pages, batch, seqlen_k):
        self._pages = pages
        self.shape = (batch, seqlen_k) + tuple(pages.shape[2:])

    def view(self):
        return self._pages[:1, :1].expand(self.shape)


def _make_plan(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias=None,
               row_topk=0, max_kept=0, intervals=False, compacted_only=False, packed=None,
               compact_keys="auto"):
    """block_m x block_n is the tile of block_mask (the selection); the plan's own tile is the
    backend's default, except on the CPU, which runs any tile and then simply uses the
    selection's (a selection tile must be a whole multiple of the plan's). row_topk > 0: the plan
    holds per-row top-k thresholds of attn_bias (``topk_causal``). max_kept > 0: attn_mask keeps at
    most that many keys per (batch, head) (it came from ``topk``), which sizes compacted keys.
    intervals: attn_mask is an _interval_candidate; the plan checks it (one read of the mask and,
    on a GPU, one wait for the answer) and, if every key's rows are one interval (create_mask's
    per-row top-k masks, sliding windows), compacts its keys like per-row top-k. compacted_only:
    every call with the plan has a _query_invariant bias (the plan cache keys by it), so a
    compacted CUDA plan need not map the full key axis. packed: (cu_seqlens_q, cu_seqlens_k) of
    packed sequences (q and k are (1, total, heads, D)). compact_keys: make_plan's ('never' for
    calls with cache lengths, which run the map of the full key axis)."""
    if isinstance(k, _PagedKeyAxis):
        k = k.view()
    if packed is not None:
        return _C.make_plan(
            _dl(q), _dl(k), _dl(attn_mask), is_causal, stream=_stream(q),
            cu_seqlens_q=_dl(_offsets(packed[0], q.device)),
            cu_seqlens_k=_dl(_offsets(packed[1], q.device)))
    mask_key_intervals = bool(intervals) and _C.mask_rows_are_intervals(
        _dl(q), _dl(k), _dl(attn_mask), is_causal, _stream(q))
    plan_m = plan_n = None
    if block_mask is not None and not q.is_cuda:
        plan_m, plan_n = block_m, block_n
    topk_args = {}
    if row_topk:
        topk_args = dict(topk_bias=_dl(attn_bias), topk=row_topk,
                         topk_min_value=float(torch.finfo(attn_bias.dtype).min))
    return _C.make_plan(
        _dl(q), _dl(k), _dl(attn_mask), is_causal, plan_m, plan_n, _dl(block_mask), block_m,
        block_n, _stream(q), compact_keys=compact_keys, max_kept_keys=max_kept,
        mask_key_intervals=mask_key_intervals, compacted_calls_only=bool(compacted_only),
        **topk_args,
    )


class _PlanCache:
    """Plans reused across calls: the layers of one model step share their mask (and a call
    without a mask has a plan that depends on shapes only), so the block map is built once, not
    once per layer. A mask or block selection is keyed by the tensor object itself (a weak
    reference, so a freed tensor never matches a new one at the same address) and its version
    counter (so an in-place update through torch replans). The key also holds the shapes, the
    device and the CUDA stream the plan was built on. Writes that bypass torch's version counter
    (``tensor.data[...] = ...``, writes through a numpy / DLPack alias) are not seen: call
    ``clear_plan_cache()`` after those. Bounded; least recently used plans go first, and a plan
    goes as soon as a tensor it is keyed by is freed (it can never match again, and its memory,
    e.g. a leased planning graph on CUDA, goes back)."""

    def __init__(self, capacity: int = 32):
        self._entries = collections.OrderedDict()
        self._capacity = capacity
        self._recent = None  # the entry last inserted or moved to the end
        # Reentrant: a weak reference's callback may run in a garbage collection that this thread
        # started while holding the lock.
        self._lock = threading.RLock()

    @staticmethod
    def _tensor_key(t):
        if t is None:
            return None
        return (id(t), t._version, t.data_ptr(), t.shape, t.stride(), t.dtype)

    def get(self, q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias=None,
            row_topk=0, max_kept=0, packed=None, compact_keys="auto", stream=None):
        # A decode step pays this lookup per layer, so a hit stays cheap: no helper calls for
        # absent tensors, weak references checked for the present ones only (torch.Size hashes as
        # the tuple it is). `stream`: the caller's _stream(q), when it has it.
        if stream is None:
            stream = _stream(q)
        topk_bias = attn_bias if row_topk else None
        cu_q, cu_k = packed if packed is not None else (None, None)
        intervals = packed is None and compact_keys != "never" and _interval_candidate(
            q, attn_mask, block_mask, attn_bias, row_topk, max_kept)
        compacted_only = compact_keys != "never" and _query_invariant(attn_bias)
        tk = self._tensor_key
        key = (q.shape, k.shape, q.device, stream, is_causal, block_m, block_n,
               None if attn_mask is None else tk(attn_mask),
               None if block_mask is None else tk(block_mask), row_topk, max_kept,
               None if topk_bias is None else tk(topk_bias), intervals, compacted_only,
               None if cu_q is None else tk(cu_q), None if cu_k is None else tk(cu_k),
               compact_keys)
        tensors = (attn_mask, block_mask, topk_bias, cu_q, cu_k)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                plan, refs = entry
                for ref, t in zip(refs, tensors):
                    if t is not None and ref() is not t:
                        break
                else:
                    if entry is not self._recent:  # least recently used goes first
                        self._entries.move_to_end(key)
                        self._recent = entry
                    return plan
        plan = _make_plan(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias,
                          row_topk, max_kept, intervals, compacted_only, packed, compact_keys)
        drop = self._drop_callback(key)
        refs = tuple(None if t is None else weakref.ref(t, drop) for t in tensors)
        with self._lock:
            self._entries[key] = self._recent = (plan, refs)
            while len(self._entries) > self._capacity:
                if self._entries.popitem(last=False)[1] is self._recent:  # (capacity 0)
                    self._recent = None
        return plan

    def _drop_callback(self, key):
        cache = weakref.ref(self)

        def drop(_ref):
            self_ = cache()
            if self_ is not None:
                with self_._lock:
                    if self_._entries.pop(key, None) is self_._recent:
                        self_._recent = None  # nor is its plan kept alive here
        return drop

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._recent = None


_plan_cache = _PlanCache()


def clear_plan_cache() -> None:
    """Forget every cached plan (see ``_PlanCache``)."""
    _plan_cache.clear()


def _plan_for_call(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias=None,
                   row_topk=0, max_kept=0, compact_keys="auto", stream=None):
    """The plan of an eager call: cached where planning costs something (any CUDA call: small
    planning kernels; a CPU call with a mask, block selection or per-row top-k: one read of it).
    A mask-free CPU call returns None and the core plans inline (cheaper than the cache lookup)."""
    if q.is_cuda or attn_mask is not None or block_mask is not None or row_topk:
        return _plan_cache.get(q, k, attn_mask, is_causal, block_mask, block_m, block_n,
                               attn_bias, row_topk, max_kept, compact_keys=compact_keys,
                               stream=stream)
    return None


def _run_backward(
    dout, q, k, v, out, lse, attn_mask, attn_bias, softmax_scale, is_causal, softcap,
    deterministic, plan, need_dbias,
):
    dout = _last_dim_contiguous(dout)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbias = None
    if need_dbias:
        # Exactly the bias's shape (broadcast dims included): the core reduces into it.
        dbias = torch.empty(attn_bias.shape, dtype=attn_bias.dtype, device=attn_bias.device)
    _C.backward(
        _dl(dout), _dl(q), _dl(k), _dl(v), _dl(out), _dl(lse),
        _dl(attn_mask), _dl(attn_bias), _dl(dq), _dl(dk), _dl(dv), _dl(dbias),
        softmax_scale, is_causal, softcap, deterministic, plan, _stream(q),
    )
    return dq, dk, dv, dbias


# ---- eager autograd ------------------------------------------------------------------------------


class FlashSparseAttnFunc(torch.autograd.Function):
    """Gradients for query, key, value and attn_bias (also when only the bias requires grad)."""

    @staticmethod
    def forward(
        ctx, q, k, v, attn_mask, attn_bias, softmax_scale, is_causal, softcap, deterministic,
        block_mask, block_m, block_n, row_topk, max_kept,
    ):
        plan = _plan_for_call(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias,
                              row_topk, max_kept)
        if plan is None:  # mask-free CPU call: still one plan for forward and backward
            plan = _make_plan(q, k, attn_mask, is_causal, block_mask, block_m, block_n)
        out, lse = _new_outputs(q, need_lse=True)
        _C.forward(
            _dl(q), _dl(k), _dl(v), _dl(attn_mask), _dl(attn_bias), _dl(out), _dl(lse),
            softmax_scale, is_causal, softcap, plan, _stream(q),
        )
        ctx.save_for_backward(q, k, v, attn_mask, attn_bias, out, lse)
        ctx.plan = plan  # built once (or taken from the cache), reused by backward
        ctx.softmax_scale = softmax_scale
        ctx.is_causal = is_causal
        ctx.softcap = softcap
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        # lse never has a gradient, and out's may be absent: no zero tensors made for them.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:  # out did not reach the loss: nothing flows back
            return (None,) * 14
        q, k, v, attn_mask, attn_bias, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv, dbias = _run_backward(
            dout, q, k, v, out, lse, attn_mask, attn_bias, ctx.softmax_scale, ctx.is_causal,
            ctx.softcap, ctx.deterministic, ctx.plan, attn_bias is not None and need[4],
        )
        return (
            dq if need[0] else None,
            dk if need[1] else None,
            dv if need[2] else None,
            None,
            dbias,
            None, None, None, None, None, None, None, None, None,
        )


# ---- torch.library custom ops (the torch.compile route) -----------------------------------------


class _PlanRegistry:
    """Plans handed from the forward op to the backward op by id. Bounded: an evicted id makes the
    backward op rebuild the plan (same result, one more pass over the mask)."""

    def __init__(self, capacity: int = 256):
        self._plans = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, plan) -> int:
        with self._lock:
            plan_id = next(self._ids)
            self._plans[plan_id] = plan
            while len(self._plans) > self._capacity:
                self._plans.popitem(last=False)
            return plan_id

    def get(self, plan_id: int):
        with self._lock:
            return self._plans.get(plan_id)


_plans = _PlanRegistry()


@torch.library.custom_op("flash_sparse_attn::fwd", mutates_args=())
def _fwd_op(
    q: _Tensor,
    k: _Tensor,
    v: _Tensor,
    attn_mask: Optional[_Tensor],
    attn_bias: Optional[_Tensor],
    block_mask: Optional[_Tensor],
    softmax_scale: Optional[float],
    is_causal: bool,
    softcap: float,
    deterministic: bool,
    block_m: Optional[int],
    block_n: Optional[int],
    row_topk: int = 0,
    max_kept: int = 0,
) -> Tuple[_Tensor, _Tensor, _Tensor]:
    plan = _plan_for_call(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias,
                          row_topk, max_kept)
    if plan is None:
        plan = _make_plan(q, k, attn_mask, is_causal, block_mask, block_m, block_n)
    out, lse = _new_outputs(q, need_lse=True)
    _C.forward(
        _dl(q), _dl(k), _dl(v), _dl(attn_mask), _dl(attn_bias), _dl(out), _dl(lse),
        softmax_scale, is_causal, softcap, plan, _stream(q),
    )
    handle = torch.tensor([_plans.put(plan)], dtype=torch.int64)
    return out, lse, handle


@_fwd_op.register_fake
def _fwd_fake(
    q, k, v, attn_mask, attn_bias, block_mask, softmax_scale, is_causal, softcap, deterministic,
    block_m, block_n, row_topk=0, max_kept=0,
):
    out, lse = _new_outputs(q, need_lse=True)
    return out, lse, torch.empty((1,), dtype=torch.int64)


@torch.library.custom_op("flash_sparse_attn::bwd", mutates_args=())
def _bwd_op(
    dout: _Tensor,
    q: _Tensor,
    k: _Tensor,
    v: _Tensor,
    out: _Tensor,
    lse: _Tensor,
    attn_mask: Optional[_Tensor],
    attn_bias: Optional[_Tensor],
    block_mask: Optional[_Tensor],
    plan_handle: _Tensor,
    softmax_scale: Optional[float],
    is_causal: bool,
    softcap: float,
    deterministic: bool,
    block_m: Optional[int],
    block_n: Optional[int],
    need_dbias: bool,
    row_topk: int = 0,
    max_kept: int = 0,
) -> Tuple[_Tensor, _Tensor, _Tensor, _Tensor]:
    plan = _plans.get(int(plan_handle[0]))
    if plan is None:
        plan = _make_plan(q, k, attn_mask, is_causal, block_mask, block_m, block_n, attn_bias,
                          row_topk, max_kept,
                          _interval_candidate(q, attn_mask, block_mask, attn_bias, row_topk,
                                              max_kept), _query_invariant(attn_bias))
    dq, dk, dv, dbias = _run_backward(
        dout, q, k, v, out, lse, attn_mask, attn_bias, softmax_scale, is_causal, softcap,
        deterministic, plan, need_dbias,
    )
    if dbias is None:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias


@_bwd_op.register_fake
def _bwd_fake(
    dout, q, k, v, out, lse, attn_mask, attn_bias, block_mask, plan_handle, softmax_scale,
    is_causal, softcap, deterministic, block_m, block_n, need_dbias, row_topk=0, max_kept=0,
):
    dbias = q.new_empty((0,))
    if need_dbias:
        dbias = attn_bias.new_empty(attn_bias.shape)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, attn_bias, block_mask, softmax_scale, is_causal, softcap, deterministic,
     block_m, block_n, row_topk, max_kept) = inputs
    out, lse, handle = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, attn_bias, block_mask, handle)
    ctx.softmax_scale = softmax_scale
    ctx.is_causal = is_causal
    ctx.softcap = softcap
    ctx.deterministic = deterministic
    ctx.block_m = block_m
    ctx.block_n = block_n
    ctx.row_topk = row_topk
    ctx.max_kept = max_kept
    ctx.has_bias = attn_bias is not None
    ctx.mark_non_differentiable(lse, handle)


def _fwd_backward(ctx, dout, _dlse, _dhandle):
    q, k, v, out, lse, attn_mask, attn_bias, block_mask, handle = ctx.saved_tensors
    need_dbias = ctx.has_bias and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = _bwd_op(
        dout, q, k, v, out, lse, attn_mask, attn_bias, block_mask, handle, ctx.softmax_scale,
        ctx.is_causal, ctx.softcap, ctx.deterministic, ctx.block_m, ctx.block_n, need_dbias,
        ctx.row_topk, ctx.max_kept,
    )
    return (
        dq, dk, dv, None, dbias if need_dbias else None,
        None, None, None, None, None, None, None, None, None,
    )


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---- public API ----------------------------------------------------------------------------------


def _check_topk(topk, attn_bias, key) -> int:
    """Python-side checks of ``topk=`` (the core checks the bias's shape against the problem)."""
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk: expected an int or None, got {type(topk).__name__}")
    if topk < 1:
        raise ValueError(f"topk: expected a positive number of keys per row, got {topk}")
    if attn_bias is None:
        raise ValueError("topk: selects keys by attn_bias, which is None; pass attn_bias")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias: expected a float dtype for topk, got {attn_bias.dtype}")
    if attn_bias.dim() != 4:
        raise ValueError(
            "attn_bias: expected 4 dims ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}), got shape "
            f"{tuple(attn_bias.shape)}"
        )
    seqlen_k = key.shape[1] if key.dim() == 4 else attn_bias.shape[-1]
    if attn_bias.shape[-1] != seqlen_k:
        raise ValueError(
            f"attn_bias: topk selects along the key dim, expected its size {seqlen_k} (seqlen_k), "
            f"got shape {tuple(attn_bias.shape)}"
        )
    return topk


def _topk_mask(query, key, attn_mask, attn_bias, topk):
    """The mask ``topk=`` asks for: create_mask's selection on the bias's device (no gradient)."""
    from .utils.mask import create_mask

    _check_topk(topk, attn_bias, key)
    batch, seqlen_q, seqlen_k = query.shape[0], query.shape[1], key.shape[1]
    if attn_mask is not None and attn_mask.dim() == 4:
        # The attention maps mask and bias heads to query heads separately (h // (H / Hx)), so a
        # mask per kv head and a bias per query head go together; create_mask broadcasts like
        # torch, so the coarser one is repeated to the finer head count first.
        hm, hb = attn_mask.shape[1], attn_bias.shape[1]
        if hm != hb and hm > 1 and hb > 1 and max(hm, hb) % min(hm, hb) == 0:
            if hm < hb:
                attn_mask = attn_mask.repeat_interleave(hb // hm, dim=1)
            else:
                attn_bias = attn_bias.repeat_interleave(hm // hb, dim=1)
    try:
        return create_mask(
            attn_bias.detach(), attn_mask, batch, seqlen_q, seqlen_k, topk,
            torch.finfo(attn_bias.dtype).min,
        )
    except (ValueError, TypeError) as e:  # named as this function's caller knows the arguments
        message = str(e).replace("attention_mask", "attn_mask").replace("attention_bias", "attn_bias")
        raise type(e)(message) from e



def flash_sparse_attn_func(
    query: _Tensor,
    key: _Tensor,
    value: _Tensor,
    attn_mask: Optional[_Tensor] = None,
    attn_bias: Optional[_Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap: Optional[float] = None,
    deterministic: Optional[bool] = None,
    return_attn_probs: Optional[bool] = None,
    *,
    block_mask: Optional[_Tensor] = None,
    block_size=None,
    topk: Optional[int] = None,
    topk_causal: bool = False,
):
    """Exact attention with an optional boolean mask and additive bias (SPEC.md sections 1-4).

    Arguments (the reference project's names and order):
        query: (batch, seqlen_q, num_heads, head_dim); float16 / bfloat16, or float32 on the CPU.
            Only the head dim must be contiguous: e.g. a transposed (B, H, S, D) view is fine.
        key, value: (batch, seqlen_k, num_kv_heads, head_dim); GQA / MQA when num_kv_heads <
            num_heads (query head h reads kv head h // (num_heads // num_kv_heads)).
        attn_mask: optional bool ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}), True = keep. Expanded
            (stride-0) views are read without being materialized. A mask with a query dim whose
            kept rows are one interval per key (create_mask's per-row causal top-k, a sliding
            window) runs over its kept keys only: the plan checks that once per mask tensor (one
            read of it; on a GPU one wait for the answer) when seqlen_q >= 128.
        attn_bias: optional ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}) in the query dtype or float32, added
            to the scaled scores; receives a gradient in exactly its own shape.
        softmax_scale: default 1 / sqrt(head_dim).
        is_causal: bottom-right aligned causal mask (default False).
        softcap: 0 / None = off; c > 0 computes c * tanh(scale * qk / c) + bias.
        deterministic: bitwise reproducible backward (always so on the CPU).
        return_attn_probs: also return the log-sum-exp: ``(out, lse, None)``, lse (B, H, Sq)
            float32. The unnormalized probability matrix of the reference is not returned.
    Beyond the reference (keyword only):
        block_mask: bool (B|1, H|Hk|1, ceil(Sq / bm), ceil(Sk / bn)) block selection, e.g. from
            ``flash_sparse_attn.utils.mask.create_block_mask``; tiles marked False are skipped.
        block_size: the (bm, bn) tile of ``block_mask`` (an int for both); default (128, 128),
            as ``create_block_mask``'s. On CUDA it must be a whole multiple of the kernel's tile
            (128 x 128 always is). Given without a ``block_mask``, it is an error.
        topk: keep in every row only the ``topk`` largest ``attn_bias`` entries among the keys
            ``attn_mask`` allows (all keys without one); causality then applies to the kept keys.
            Exactly the keys ``create_mask(attn_bias, attn_mask, ..., window_size=topk,
            min_dtype=finfo(attn_bias.dtype).min)`` keeps (ties go to the lower key index; an
            entry equal to min_dtype is never kept), selected on the tensors' device. With a
            query-invariant bias (e.g. Doge's (B, Hk, 1, Sk)) the kept set is a key mask of
            O(B * Hk * Sk) bytes and the attention runs over the kept keys only.
        topk_causal: with ``topk`` and ``is_causal``, select each row's keys among those
            causality lets it see (and attn_mask allows): what create_mask keeps when given the
            causal 4-D mask (the reference's benchmarks). The bias must be query-invariant; the
            selection is one threshold per row, O(B * H * Sq), never an Sq x Sk mask.

    Returns ``out`` (B, Sq, H, D) in the query dtype, or ``(out, lse, None)``.
    """
    _check_inputs(query, key, value, attn_mask, attn_bias)
    block_m, block_n = _block_tile(block_mask, block_size)
    is_causal = bool(is_causal) if is_causal is not None else False
    row_topk = max_kept = 0
    if topk_causal:
        if topk is None:
            raise ValueError("topk_causal: selects the topk keys of each row; pass topk as well")
        if not is_causal:
            raise ValueError(
                "topk_causal: selects among the keys causality lets each row see, so it needs "
                "is_causal=True (without causality, topk alone selects the same keys)"
            )
        row_topk = _check_topk(topk, attn_bias, key)
    elif topk is not None:
        attn_mask = _topk_mask(query, key, attn_mask, attn_bias, topk)
        max_kept = topk  # every (batch, head) of that mask keeps at most topk keys
    softcap = float(softcap) if softcap is not None else 0.0
    deterministic = bool(deterministic) if deterministic is not None else False
    return_lse = bool(return_attn_probs)
    if softmax_scale is not None:
        softmax_scale = float(softmax_scale)

    query = _last_dim_contiguous(query)
    key = _last_dim_contiguous(key)
    value = _last_dim_contiguous(value)

    if torch.compiler.is_compiling():
        out, lse, _ = torch.ops.flash_sparse_attn.fwd(
            query, key, value, attn_mask, attn_bias, block_mask, softmax_scale, is_causal,
            softcap, deterministic, block_m, block_n, row_topk, max_kept,
        )
    elif torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_bias is not None and attn_bias.requires_grad)
    ):
        out, lse = FlashSparseAttnFunc.apply(
            query, key, value, attn_mask, attn_bias, softmax_scale, is_causal, softcap,
            deterministic, block_mask, block_m, block_n, row_topk, max_kept,
        )
    else:
        # Inference: straight into the core, no autograd bookkeeping, lse only when asked for.
        stream = _stream(query)
        plan = _plan_for_call(query, key, attn_mask, is_causal, block_mask, block_m, block_n,
                              attn_bias, row_topk, max_kept, stream=stream)
        out, lse = _new_outputs(query, need_lse=return_lse)
        _C.forward(
            _dl(query), _dl(key), _dl(value), _dl(attn_mask), _dl(attn_bias),
            _dl(out), _dl(lse), softmax_scale, is_causal, softcap, plan, stream,
        )
    if return_lse:
        return out, lse, None
    return out
