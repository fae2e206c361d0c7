"""Context parallelism: attention over a sequence sharded across a ``torch.distributed`` group.

Each rank holds the queries, keys and values of its own tokens and their global positions
(``positions``, strictly increasing; over the group a permutation of ``0 .. S-1``). K and V, with
the key mask and the per-key bias that belong to them, travel around the ring (rank i sends to
i + 1) while the block in hand is computed; partial outputs merge by log-sum-exp. In the backward
the same blocks travel again with their dK / dV / dbias accumulators, which end on the rank that
owns the keys. Causality is by global position (key p is visible to query q iff p <= q, SPEC's
causal mask on the whole sequence); a (query run, key run) pair that causality leaves empty is
skipped (its transfer still happens), a pair it leaves whole runs without the causal mask.

Layouts: ``shard_positions(S, rank, world, "zigzag")`` gives each rank two chunks, i and
2 W - 1 - i, so that every rank has the same causal work; ``"contiguous"`` gives chunk i. Any
lengths work (S need not divide evenly).

What it takes (everything the single-device call takes that shards with the keys): GQA / MQA,
``attn_mask`` as a key mask ({B|1}, {Hk|H|1}, 1, L) and ``attn_bias`` as a per-key bias
({B|1}, {Hk|H|1}, 1, L) (its gradient returned in the same shape on the owning rank), softcap,
``topk=w``: the w keys with the largest bias per (batch, head) over the *whole* sequence (the same
selection as ``flash_sparse_attn_func(..., topk=w)`` on the unsharded tensors: the per-key biases
are gathered once, O(S) per rank, and every rank applies the library's selection to them), and
``block_mask``: a block selection over the whole sequence, (B|1, H|Hk|1, ceil(S / bm),
ceil(S / bn)) by global position, the same tensor on every rank, with ``block_size`` (bm, bn)
(default 128): each (query run, key run) pair runs with its slice of it, so every run must start
at a multiple of the tile (zigzag shards: S a multiple of 2 * world * tile). A pair is not
computed (its block still travels) when causality leaves it empty, when its key run keeps no key
under the key mask or top-k, or when its slice of the selection selects nothing; the last two
are found once, before the ring (one small all_gather and one read back).
Not here yet: per-row top-k (``topk_causal``), a bias or mask with a query dim.

Backends: whatever the tensors' device runs (the CPU backend with gloo, CUDA with NCCL). Each
step starts the transfer of the next K / V block before computing the block in hand; in the
backward the block's dK / dV / dbias sums follow it once computed. Transfers are point-to-point
(``batch_isend_irecv``); nothing reads a tensor back to the host inside the ring (the positions
are exchanged before it, once per positions tensor).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .flash_sparse_attn_interface import (_block_tile, _make_plan, _run_backward,
                                          flash_sparse_attn_func)

__all__ = ["shard_positions", "ring_flash_sparse_attn_func"]


def shard_positions(seqlen: int, rank: int, world_size: int, layout: str = "zigzag"):
    """The global positions (int64, increasing) of rank ``rank``'s tokens.

    ``"zigzag"``: the sequence in 2 W nearly equal chunks, rank i holding chunks i and
    2 W - 1 - i (equal causal work per rank). ``"contiguous"``: W nearly equal chunks, rank i
    holding chunk i."""
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"layout: expected 'zigzag' or 'contiguous', got {layout!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
    chunks = 2 * world_size if layout == "zigzag" else world_size
    bounds = [seqlen * c // chunks for c in range(chunks + 1)]
    mine = [rank, chunks - 1 - rank] if layout == "zigzag" else [rank]
    return torch.cat([torch.arange(bounds[c], bounds[c + 1]) for c in mine])


def _runs(positions: torch.Tensor) -> List[Tuple[int, int, int]]:
    """Contiguous runs of increasing positions: (first index, length, first position)."""
    pos = positions.tolist()
    runs = []
    start = 0
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            runs.append((start, i - start, pos[start]))
            start = i
    return runs


class _Ring:
    """The group, this rank's neighbours and every rank's positions and runs."""

    def __init__(self, group, positions: torch.Tensor, device):
        self.group = group
        whole = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(whole, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(whole, (self.rank - 1) % self.world)
        # Every rank's positions (collectives work on the group's device: gloo on the CPU).
        comm_device = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
        self.comm_device = comm_device
        length = torch.tensor([positions.numel()], dtype=torch.int64, device=comm_device)
        lengths = [torch.empty_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length, group=group)
        self.lengths = [int(x.item()) for x in lengths]  # once per call, before the ring
        width = max(self.lengths)
        padded = torch.full((width,), -1, dtype=torch.int64, device=comm_device)
        padded[: positions.numel()] = positions.to(comm_device)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=group)
        self.positions = [g[:n].cpu() for g, n in zip(gathered, self.lengths)]
        self.seqlen = sum(self.lengths)
        every = torch.cat(self.positions)
        if not torch.equal(every.sort().values, torch.arange(self.seqlen)):
            raise ValueError(
                "positions: over the group, expected a permutation of 0 .. S-1 (each token on "
                f"exactly one rank), got {self.seqlen} positions that are not"
            )
        self.runs = [_runs(p) for p in self.positions]

    def owner(self, step: int) -> int:
        """The rank whose keys this rank holds at ring step ``step``."""
        return (self.rank - step) % self.world

    def exchange(self, tensors: Sequence["_Keyed"], step: int):
        """Sends `tensors` (the block held at `step`) to the next rank and receives the block of
        step + 1 from the previous one. Returns (received tensors, requests to wait on)."""
        incoming = self.lengths[self.owner(step + 1)]
        received = []
        ops = []
        for t in tensors:
            shape = list(t.data.shape)
            shape[t.dim] = incoming
            buf = _Keyed(torch.empty(shape, dtype=t.data.dtype, device=t.data.device), t.dim)
            received.append(buf)
            ops.append(dist.P2POp(dist.isend, t.data.contiguous(), self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, buf.data, self.prev, self.group))
        return received, dist.batch_isend_irecv(ops)


class _Keyed:
    """A tensor that travels with the keys, and its key dim: 1 for K, V and their gradients
    (B, L, Hk, D), 3 for a key mask or bias and its gradient (B, H, 1, L). Masks travel as
    uint8 (point-to-point transfers of bool are not supported by every backend)."""

    def __init__(self, data: torch.Tensor, dim: int):
        self.data, self.dim = data, dim

    def keys(self, start: int, length: int) -> torch.Tensor:
        return self.data.narrow(self.dim, start, length)


_ring_cache = {}  # (id(group), id(positions), device) -> (weakref, version, _Ring)


def _ring_for(group, positions: torch.Tensor, device) -> _Ring:
    """The _Ring of these positions: its setup (two all_gathers and a read back to the host) runs
    once per positions tensor, not once per layer (a model's layers share it within a step)."""
    import weakref

    key = (id(group), id(positions), device)
    cached = _ring_cache.get(key)
    if cached is not None and cached[0]() is positions and cached[1] == positions._version:
        return cached[2]
    ring = _Ring(group, positions, device)
    _ring_cache.clear()
    _ring_cache[key] = (weakref.ref(positions), positions._version, ring)
    return ring


def _pair_call(q_run, k_run, causal: bool):
    """How a (query run, key run) pair is computed: None (causality leaves it empty), or
    (is_causal, extra element mask or None)."""
    q_start, q_len, q_pos = q_run
    k_start, k_len, k_pos = k_run
    if not causal:
        return False, None
    if k_pos > q_pos + q_len - 1:
        return None
    if k_pos + k_len - 1 <= q_pos:
        return False, None
    # Key j of the run is visible to query i iff k_pos + j <= q_pos + i; SPEC's bottom-right
    # causal mask keeps j <= i + k_len - q_len, the same when the runs end at the same position.
    if q_pos - k_pos == k_len - q_len:
        return True, None
    i = torch.arange(q_len)[:, None] + q_pos
    j = torch.arange(k_len)[None, :] + k_pos
    return False, (j <= i)[None, None]


def _pair_mask(mask: Optional[_Keyed], cols, element: Optional[torch.Tensor], device):
    """The key mask of a pair's key run (bool), with the pair's causal element mask if any."""
    keys = None if mask is None else mask.keys(*cols).bool()
    if element is None:
        return keys
    element = element.to(device)
    return element if keys is None else keys & element


class _Selection:
    """A global block selection (B|1, H|Hk|1, ceil(S / bm), ceil(S / bn)) and its tile: each
    (query run, key run) pair's slice, and which pairs select something (read back once)."""

    def __init__(self, ring: "_Ring", block_mask: torch.Tensor, bm: int, bn: int):
        S = ring.seqlen
        want = (-(-S // bm), -(-S // bn))
        if (block_mask.dtype != torch.bool or block_mask.dim() != 4
                or tuple(block_mask.shape[2:]) != want):
            raise ValueError(
                f"block_mask: expected a bool ({{B|1}}, {{H|Hk|1}}, {want[0]}, {want[1]}) "
                f"selection over the whole sequence of {S} tokens in tiles of {bm} x {bn}, got "
                f"{block_mask.dtype} with shape {tuple(block_mask.shape)}"
            )
        for runs in ring.runs:
            for _, length, pos in runs:
                if pos % bm or pos % bn:
                    raise ValueError(
                        f"block_mask: every shard's runs must start at a multiple of the "
                        f"selection tile {bm} x {bn}; a run starts at position {pos} (zigzag "
                        f"shards: make S a multiple of 2 * world size * tile)"
                    )
        self.mask, self.bm, self.bn = block_mask, bm, bn
        pairs = [(q_run, k_run) for q_run in ring.runs[ring.rank]
                 for runs in ring.runs for k_run in runs]
        flags = torch.stack([self.slice(q, k).any() for q, k in pairs]).tolist() if pairs else []
        self.selected = {(q[2], k[2]): bool(f) for (q, k), f in zip(pairs, flags)}

    def slice(self, q_run, k_run) -> torch.Tensor:
        q_len, q_pos = q_run[1], q_run[2]
        k_len, k_pos = k_run[1], k_run[2]
        return self.mask[:, :, q_pos // self.bm: -(-(q_pos + q_len) // self.bm),
                         k_pos // self.bn: -(-(k_pos + k_len) // self.bn)]

    def pair(self, q_run, k_run) -> Optional[torch.Tensor]:
        """The pair's slice, or None when it selects nothing."""
        return self.slice(q_run, k_run) if self.selected[(q_run[2], k_run[2])] else None


def _merge(out_acc, lse_acc, rows: slice, out_b, lse_b):
    """out_acc (B, L, H, D) fp32 and lse_acc (B, H, L) absorb a partial result over `rows`."""
    lse_old = lse_acc[:, :, rows]
    lse_new = torch.logaddexp(lse_old, lse_b)
    empty = lse_new == -math.inf
    w_old = torch.where(empty, 0.0, torch.exp(lse_old - lse_new)).transpose(1, 2)[..., None]
    w_new = torch.where(empty, 0.0, torch.exp(lse_b - lse_new)).transpose(1, 2)[..., None]
    out_acc[:, rows] = out_acc[:, rows] * w_old + out_b.float() * w_new
    lse_acc[:, :, rows] = lse_new


def _check(query, key, value, positions, attn_mask, attn_bias):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key, value: expected (B, L, heads, D) shards")
    if positions.dim() != 1 or positions.dtype != torch.int64:
        raise ValueError(f"positions: expected a 1-D int64 tensor, got {positions.dtype} with "
                         f"shape {tuple(positions.shape)}")
    L = positions.numel()
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[1] != L:
            raise ValueError(f"{name}: expected {L} tokens (len(positions)) in dim 1, got shape "
                             f"{tuple(t.shape)}")
    if L > 1 and not bool((positions[1:] > positions[:-1]).all()):
        raise ValueError("positions: expected strictly increasing global positions")
    for name, t in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if t is not None and (t.dim() != 4 or t.shape[2] != 1 or t.shape[3] != L):
            raise ValueError(
                f"{name}: sharded with the keys, expected ({{B|1}}, {{Hk|H|1}}, 1, {L}), got shape "
                f"{tuple(t.shape)} (a mask or bias with a query dim is not supported here)"
            )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask: expected bool, got {attn_mask.dtype}")


def _global_topk_mask(ring: _Ring, attn_mask, attn_bias, topk: int, batch: int):
    """This rank's shard of the top-`topk` key mask over the whole sequence."""
    from .utils.mask import create_mask

    def gather(t):
        width = max(ring.lengths)
        padded = torch.zeros(*t.shape[:3], width, dtype=t.dtype, device=t.device)
        padded[..., : t.shape[3]] = t
        parts = [torch.empty_like(padded) for _ in range(ring.world)]
        dist.all_gather(parts, padded, group=ring.group)
        whole = torch.empty(*t.shape[:3], ring.seqlen, dtype=t.dtype, device=t.device)
        for part, pos, n in zip(parts, ring.positions, ring.lengths):
            whole[..., pos.to(t.device)] = part[..., :n]
        return whole

    bias = gather(attn_bias.detach())
    mask = gather(attn_mask.to(torch.uint8)).bool() if attn_mask is not None else None
    kept = create_mask(bias, mask, batch, 1, ring.seqlen, topk, torch.finfo(bias.dtype).min)
    return kept[..., ring.positions[ring.rank].to(kept.device)]


def _runs_with_keys(ring: _Ring, attn_mask) -> Optional[dict]:
    """With a key mask (the caller's, or the top-k's): whether each key run of each rank keeps
    some key (for some batch and head), by the run's first global position; found once before the
    ring (one all_gather of a flag per run, one read back). None without a mask."""
    if attn_mask is None:
        return None
    mine = ring.runs[ring.rank]
    width = max(len(r) for r in ring.runs)
    flags = torch.zeros(width, dtype=torch.uint8, device=ring.comm_device)
    for n, (start, length, _) in enumerate(mine):
        flags[n] = attn_mask.narrow(3, start, length).any().to(ring.comm_device)
    gathered = [torch.empty_like(flags) for _ in range(ring.world)]
    dist.all_gather(gathered, flags, group=ring.group)
    kept = torch.stack(gathered).tolist()
    return {run[2]: bool(kept[r][n]) for r, runs in enumerate(ring.runs)
            for n, run in enumerate(runs)}


def _block(key, value, attn_mask, attn_bias) -> dict:
    block = {"k": _Keyed(key, 1), "v": _Keyed(value, 1)}
    if attn_mask is not None:
        block["mask"] = _Keyed(attn_mask.to(torch.uint8), 3)
    if attn_bias is not None:
        block["bias"] = _Keyed(attn_bias.detach(), 3)
    return block


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_bias, attn_mask, ring, scale, causal, softcap,
                deterministic, selection, runs_with_keys):
        B, L, H, D = query.shape
        out_acc = torch.zeros(B, L, H, D, dtype=torch.float32, device=query.device)
        lse_acc = torch.full((B, H, L), -math.inf, dtype=torch.float32, device=query.device)
        block = _block(key, value, attn_mask, attn_bias)
        q_runs = ring.runs[ring.rank]
        for step in range(ring.world):
            pending = None
            if step + 1 < ring.world:  # the next block travels while this one is computed
                incoming, pending = ring.exchange(list(block.values()), step)
            for q_run in q_runs:
                rows = slice(q_run[0], q_run[0] + q_run[1])
                for k_run in ring.runs[ring.owner(step)]:
                    how = _pair_call(q_run, k_run, causal)
                    if how is None or (runs_with_keys is not None
                                       and not runs_with_keys[k_run[2]]):
                        continue
                    flag, element = how
                    sel = None if selection is None else selection.pair(q_run, k_run)
                    if selection is not None and sel is None:
                        continue
                    cols = (k_run[0], k_run[1])
                    bias = block.get("bias")
                    out_b, lse_b, _ = flash_sparse_attn_func(
                        query[:, rows], block["k"].keys(*cols), block["v"].keys(*cols),
                        attn_mask=_pair_mask(block.get("mask"), cols, element, query.device),
                        attn_bias=None if bias is None else bias.keys(*cols),
                        softmax_scale=scale, is_causal=flag, softcap=softcap or None,
                        return_attn_probs=True, block_mask=sel,
                        block_size=None if sel is None else (selection.bm, selection.bn))
                    _merge(out_acc, lse_acc, rows, out_b, lse_b)
            if pending is not None:
                for req in pending:
                    req.wait()
                block = dict(zip(block.keys(), incoming))
        out = out_acc.to(query.dtype)
        ctx.save_for_backward(query, key, value, attn_bias, attn_mask, out, lse_acc)
        ctx.ring, ctx.scale, ctx.causal = ring, scale, causal
        ctx.softcap, ctx.deterministic, ctx.selection = softcap, deterministic, selection
        ctx.runs_with_keys = runs_with_keys
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, attn_bias, attn_mask, out, lse = ctx.saved_tensors
        ring = ctx.ring
        need_dbias = attn_bias is not None and ctx.needs_input_grad[3]
        dq = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        # The travelling block (K, V, [mask], [bias]) and its fp32 accumulators (dK, dV, [dbias]).
        block = _block(key, value, attn_mask, attn_bias)
        accs = {"dk": _Keyed(torch.zeros(key.shape, dtype=torch.float32, device=key.device), 1),
                "dv": _Keyed(torch.zeros(value.shape, dtype=torch.float32, device=key.device), 1)}
        if need_dbias:
            accs["dbias"] = _Keyed(
                torch.zeros(attn_bias.shape, dtype=torch.float32, device=attn_bias.device), 3)
        dout = dout.contiguous()
        q_runs = ring.runs[ring.rank]
        for step in range(ring.world):
            last = step + 1 == ring.world
            pending = []
            if not last:  # K / V (and mask, bias) travel while this block is computed
                incoming, pending = ring.exchange(list(block.values()), step)
            for q_run in q_runs:
                rows = slice(q_run[0], q_run[0] + q_run[1])
                for k_run in ring.runs[ring.owner(step)]:
                    how = _pair_call(q_run, k_run, ctx.causal)
                    if how is None or (ctx.runs_with_keys is not None
                                       and not ctx.runs_with_keys[k_run[2]]):
                        continue
                    flag, element = how
                    selection = ctx.selection
                    sel = None if selection is None else selection.pair(q_run, k_run)
                    if selection is not None and sel is None:
                        continue
                    cols = (k_run[0], k_run[1])
                    q_b, k_b, v_b = query[:, rows], block["k"].keys(*cols), block["v"].keys(*cols)
                    mask_b = _pair_mask(block.get("mask"), cols, element, query.device)
                    bias_b = block["bias"].keys(*cols) if "bias" in block else None
                    plan = (_make_plan(q_b, k_b, mask_b, flag, None, None, None) if sel is None
                            else _make_plan(q_b, k_b, mask_b, flag, sel, selection.bm,
                                            selection.bn))
                    dq_b, dk_b, dv_b, dbias_b = _run_backward(
                        dout[:, rows], q_b, k_b, v_b, out[:, rows], lse[:, :, rows], mask_b,
                        bias_b, ctx.scale, flag, ctx.softcap, ctx.deterministic, plan, need_dbias)
                    dq[:, rows] += dq_b.float()
                    accs["dk"].keys(*cols).add_(dk_b.float())
                    accs["dv"].keys(*cols).add_(dv_b.float())
                    if need_dbias:
                        accs["dbias"].keys(*cols).add_(dbias_b.float())
            if ring.world > 1:  # the block's sums follow it; after the last step they go home
                sums, pending_sums = ring.exchange(list(accs.values()), step)
                for req in pending + pending_sums:
                    req.wait()
                accs = dict(zip(accs.keys(), sums))
                if not last:
                    block = dict(zip(block.keys(), incoming))
        dk, dv = accs["dk"].data.to(key.dtype), accs["dv"].data.to(value.dtype)
        dbias = accs["dbias"].data.to(attn_bias.dtype) if need_dbias else None
        return dq.to(query.dtype), dk, dv, dbias, None, None, None, None, None, None, None, None


def ring_flash_sparse_attn_func(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    softcap: Optional[float] = None,
    deterministic: bool = False,
    *,
    topk: Optional[int] = None,
    block_mask: Optional[torch.Tensor] = None,
    block_size=None,
    group=None,
) -> torch.Tensor:
    """Attention of this rank's queries over the whole sharded sequence (module docstring).

    query (B, L, H, D), key / value (B, L, Hk, D): this rank's L tokens, at global ``positions``
    (1-D int64, increasing). attn_mask / attn_bias: the keys' shards, ({B|1}, {Hk|H|1}, 1, L).
    ``topk``: keep the topk keys with the largest bias per (batch, head) over the whole sequence
    (among those attn_mask allows). ``block_mask`` / ``block_size``: a block selection over the
    whole sequence by global position, the same on every rank (module docstring). Returns this rank's output (B, L, H, D); gradients flow to
    query, key, value and attn_bias (each on its own rank, in its own shape). Every rank of
    ``group`` (default: the world) must call it with the same sizes and options."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_flash_sparse_attn_func: torch.distributed is not initialized")
    _check(query, key, value, positions, attn_mask, attn_bias)
    block_m, block_n = _block_tile(block_mask, block_size)
    ring = _ring_for(group, positions, query.device)
    if topk is not None:
        if attn_bias is None:
            raise ValueError("topk: selects keys by attn_bias, which is None; pass attn_bias")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected a positive int, got {topk!r}")
        attn_mask = _global_topk_mask(ring, attn_mask, attn_bias, topk, query.shape[0])
    selection = None if block_mask is None else _Selection(ring, block_mask, block_m, block_n)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    softcap = float(softcap) if softcap else 0.0
    return _RingAttention.apply(query, key, value, attn_bias, attn_mask, ring, scale,
                                bool(is_causal), softcap, bool(deterministic), selection,
                                _runs_with_keys(ring, attn_mask))
