#!/usr/bin/env python3
"""Forward timings of flash_sparse_attn next to its peers, in one process on one GPU.

Peers: PyTorch SDPA with the flash and cuDNN backends (dense), and FlexAttention (compiled) with a
BlockMask built from block lists (kv_num_blocks / kv_indices, never by evaluating a mask over
Sq x Sk) and a bias score_mod. Every peer's output is checked against ours before it is timed; a
peer that errors or runs out of memory is reported as such. Times are CUDA-event medians.

    python3 bench/compare.py [--reps 20] [--json out.json]
                             [--only dense,trainable,decode,bias,topk,varlen,kvcache,dense256]
                             [--topk-cases key16k,row16k,key32k,mem32k,keyref,rowref]

(`bias` is not in the default set: forward + backward with full biases broadcast over batch/heads,
the atomics and the deterministic path of the bias gradient side by side.)

`topk` (not in the default set either) decides issues #11 and #12: the reference's workflow, a
per-key bias (B, Hk, 1, S) whose top-`keep` keys are kept, causal, forward and forward + backward
with the bias gradient. Two forms: the key mask (the global top-`keep` keys per (batch, kv head),
what the transformers integration builds for Doge) and the per-row form (each row's top-`keep`
causal keys: create_mask with a causal 4-D mask, a (B, Hk, S, S) bool tensor). Rows: ours with the
mask precomputed, ours with the selection inside the call (`topk=` / `topk_causal=True` where this
build has them, else create_mask inside the timed region, as the row says), our dense causal, SDPA
cuDNN and flash dense causal, FlexAttention over the gathered keys (flex_gather: the floor a user
writes in torch) and the reference project's Triton kernel on the same mask; then the ratios the
issues set bars on, and the peak memory of the per-row forward + backward against dense causal.
`decode` is issue #15's decode bars: one query per head over 32K and 512K keys, a key mask keeping
1/8 of the 128-key blocks, batches 1, 8 and 64, the L2 cache flushed before every rep; ours one
call between the events and 8 back to back, ours over a paged cache (pages of 64), the kernels'
time alone of the contiguous and the paged call (torch profiler: without the host time a one-call
figure includes), SDPA flash over all keys, FlexAttention at batch 1, and the device's copy
bandwidth measured in the same run.
`dense256` (not in the default set): the dense causal group at head dim 256, (1, 16384, 16, 16,
256), issue #14's bar shape.
`kvcache` (not in the default set): a decode step over caches with per-sequence lengths
(cache_seqlens in the kernels, one plan for every step; the same step captured in a CUDA graph
and replayed) against the lengths written into the mask and SDPA over every cache key, 8 calls
back to back, L2 flushed.
`varlen` (not in the default set) is issue #15's packed training batch: 16 documents of random
lengths in 64K tokens, causal, a per-key bias with its gradient; one packed call against the
documents one by one and against FlexAttention with a document mask.
The reference kernel is never committed: scripts/fetch_reference.sh puts it into .peers/ (carry
.peers to the GPU machine, which has no network); without it its rows say "not available".
"""

import argparse
import collections
import functools
import importlib.util
import json
import math
import operator
import os
import sys
import time

import torch
import torch.nn.functional as F

import flash_sparse_attn
from flash_sparse_attn import flash_sparse_attn_func, flash_sparse_attn_varlen_func
from flash_sparse_attn.flash_sparse_attn_interface import clear_plan_cache
from flash_sparse_attn.utils.mask import create_mask

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    flex_compiled = torch.compile(flex_attention, dynamic=False)
except Exception as e:  # noqa: BLE001 - reported per workload
    flex_compiled = None
    FLEX_ERROR = repr(e)


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


class Table:
    def __init__(self):
        self.rows = []

    def add(self, workload, impl, ms=None, flops=None, note="", bytes_moved=None, **extra):
        """Prints a row and keeps it for --json; `extra` fields (e.g. peak_mb, ratio) go to the
        JSON only."""
        row = {"workload": workload, "impl": impl, "ms": ms, "note": note, **extra}
        if ms is not None and flops is not None:
            row["tflops"] = flops / ms * 1e-9
        if ms is not None and bytes_moved is not None:
            row["gbps"] = bytes_moved / ms * 1e-6
        self.rows.append(row)
        rate = (f"{row['tflops']:8.1f} TFLOP/s" if "tflops" in row else
                f"{row['gbps']:8.0f} GB/s" if "gbps" in row else "")
        time_s = f"{ms:9.3f} ms" if ms is not None else "        -   "
        print(f"  {impl:34s} {time_s} {rate:16s} {note}", flush=True)


def peer(table, workload, name, fn, ours, tol, reps, flops=None, bytes_moved=None):
    """Checks a peer's output against ours, then times it; failures are reported, not dropped."""
    try:
        out = fn()
        torch.cuda.synchronize()
        err = max_err(out, ours)
        if not math.isfinite(err) or err > tol:
            table.add(workload, name, note=f"WRONG: max|peer - ours| = {err:.3g} > {tol}")
            return
        table.add(workload, name, median_ms(fn, reps), flops, f"max|diff| {err:.2e}", bytes_moved)
    except torch.cuda.OutOfMemoryError:
        table.add(workload, name, note="out of memory")
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        table.add(workload, name, note=f"error: {type(e).__name__}: {str(e)[:120]}")


def check_rows(name, out, q, k, v, keep_fn, bias_fn=None, rows=(0, 1, 127, 128, -1)):
    """Checks sampled query rows of `out` (every head) against float64; raises when wrong, so no
    peer is compared with a wrong result of ours."""
    B, Sq, H, D = q.shape
    G = H // k.shape[2]
    worst = 0.0
    for b in range(B):
        for i in rows:
            i = i % Sq
            for h in range(H):
                keep = keep_fn(b, h, i)                              # (Sk,) bool
                kk = k[b, :, h // G].double()[keep]
                vv = v[b, :, h // G].double()[keep]
                s = kk @ q[b, i, h].double() / math.sqrt(D)
                if bias_fn is not None:
                    s = s + bias_fn(b, h, i)[keep].double()
                ref = torch.softmax(s, 0) @ vv if kk.shape[0] else torch.zeros(D, device=q.device)
                worst = max(worst, (out[b, i, h].double() - ref).abs().max().item())
    if not worst <= 2e-2:
        raise AssertionError(f"{name}: flash_sparse_attn differs from float64 by {worst:.3g}")
    print(f"  (flash_sparse_attn vs float64 on sampled rows: max|diff| {worst:.2e})")


def fwd_bwd(fn, leaves, dout):
    """A closure running forward + backward of fn() with the given leaves requiring grad."""
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(dout)
    return run


def time_fwd_bwd(table, name, label, fn, leaves, dout, reps, flops):
    """Reports the median time of forward + backward through autograd."""
    try:
        ms = median_ms(fwd_bwd(fn, leaves, dout), reps)
        table.add(name, label + " fwd+bwd", ms, 3.5 * flops if flops else None)
    except torch.cuda.OutOfMemoryError:
        table.add(name, label + " fwd+bwd", note="out of memory")
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        table.add(name, label + " fwd+bwd", note=f"error: {type(e).__name__}: {str(e)[:120]}")


def sdpa(q, k, v, backend, **kw):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)


def flex_block_mask(kv_num_blocks, kv_indices, full_num, full_idx, B, H, Sq, Sk, block, mask_mod):
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num, full_idx,
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Sq, Sk))


def dense_causal(table, reps, B=2, S=16384, H=16, D=128):
    from torch.nn.attention import SDPBackend
    name = f"dense causal fwd ({B},{S},{H},{H},{D}) bf16"
    print(name, flush=True)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * S * S * D * B * H / 2
    ours = flash_sparse_attn_func(q, k, v, is_causal=True)
    ar = torch.arange(S, device="cuda")
    check_rows(name, ours, q, k, v, lambda b, h, i: ar <= i, rows=(0, 1, 8191, -1))
    table.add(name, "flash_sparse_attn", median_ms(
        lambda: flash_sparse_attn_func(q, k, v, is_causal=True), reps), flops)
    for label, backend in [("SDPA flash", SDPBackend.FLASH_ATTENTION),
                           ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)]:
        peer(table, name, label, lambda b=backend: sdpa(q, k, v, b, is_causal=True), ours, 2e-2,
             reps, flops)
    bm = None
    if flex_compiled is None:
        table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
    else:
        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device="cuda")
        peer(table, name, "FlexAttention (causal BlockMask)",
             lambda: flex_compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   block_mask=bm).transpose(1, 2), ours, 2e-2, reps, flops)
    # Forward + backward (TFLOP/s over 3.5x the forward's flops: fwd 1 + bwd 2.5).
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    dout = torch.randn_like(q)
    time_fwd_bwd(table, name, "flash_sparse_attn",
                 lambda: flash_sparse_attn_func(*leaves, is_causal=True), leaves, dout, reps, flops)
    for label, backend in [("SDPA flash", SDPBackend.FLASH_ATTENTION),
                           ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)]:
        time_fwd_bwd(table, name, label, lambda b=backend: sdpa(*leaves, b, is_causal=True),
                     leaves, dout, reps, flops)
    if bm is not None:
        time_fwd_bwd(table, name, "FlexAttention",
                     lambda: flex_compiled(*(x.transpose(1, 2) for x in leaves),
                                           block_mask=bm).transpose(1, 2), leaves, dout, reps, flops)


def trainable_mask(table, reps, B=1, S=16384, H=32, Hk=8, D=128, top=16, block=128):
    """Causal, bias (B, Hk, 1, S); per (batch, kv head, 128-query block) the diagonal block plus
    the top-`top` earlier 128-key blocks by mean bias."""
    name = f"trainable mask fwd ({B},{S},{H},{Hk},{D}) top-{top} bf16"
    print(name, flush=True)
    G = H // Hk
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = -F.softplus(torch.randn(B, Hk, 1, S, device="cuda")).to(torch.bfloat16)
    nb = S // block
    mean = bias.float().view(B, Hk, nb, block).mean(-1)            # (B, Hk, nb)
    earlier = torch.ones(nb, nb, device="cuda", dtype=torch.bool).tril(-1)
    scores = mean[:, :, None, :].expand(B, Hk, nb, nb).masked_fill(~earlier, -math.inf)
    top_idx = scores.topk(min(top, nb), dim=-1).indices            # (B, Hk, nb, top)
    valid = torch.gather(scores, -1, top_idx) > -math.inf
    sel = torch.zeros(B, Hk, nb, nb, device="cuda", dtype=torch.bool)
    sel.scatter_(-1, top_idx, valid)
    sel |= torch.eye(nb, device="cuda", dtype=torch.bool)
    density = (sel.float().sum() * block * block - B * Hk * nb * block * (block - 1) / 2) / (
        B * Hk * S * S)
    flops = 4 * S * S * D * B * H * density.item()

    run = lambda: flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True,  # noqa: E731
                                         block_mask=sel, block_size=block)
    ours = run()
    ar = torch.arange(S, device="cuda")
    check_rows(name, ours, q, k, v,
               lambda b, h, i: sel[b, h // G, i // block].repeat_interleave(block) & (ar <= i),
               lambda b, h, i: bias[b, h // G, 0], rows=(0, 5000, -1))
    table.add(name, "flash_sparse_attn", median_ms(run, reps), flops,
              f"density {100 * density.item():.1f}%")
    plan_ms = median_ms(lambda: flash_sparse_attn._C.make_plan(
        q, k, None, True, None, None, sel, block, block, torch.cuda.current_stream().cuda_stream),
        reps)
    table.add(name, "  of which: plan (selection -> lists)", plan_ms)

    # Reference check of ours on a few rows (float64): the block selection expanded to keys.
    if flex_compiled is None:
        table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
        return
    # BlockMask from the same lists, per (b, h) (heads expanded from kv heads): the diagonal block
    # is partial (causal mask_mod), the others full.
    sel_h = sel.repeat_interleave(G, 1)                             # (B, H, nb, nb)
    diag = torch.eye(nb, device="cuda", dtype=torch.bool)[None, None]
    full = sel_h & ~diag
    part = sel_h & diag
    def lists(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx
    kv_num, kv_idx = lists(part)
    full_num, full_idx = lists(full)
    bm = flex_block_mask(kv_num, kv_idx, full_num, full_idx, B, H, S, S, block,
                         lambda b, h, qi, ki: ki <= qi)
    bias_k = bias[:, :, 0, :]                                       # (B, Hk, S)

    def score_mod(score, b, h, qi, ki):
        return score + bias_k[b, h // G, ki].float()

    peer(table, name, "FlexAttention (BlockMask + bias)",
         lambda: flex_compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               score_mod=score_mod, block_mask=bm, enable_gqa=True).transpose(1, 2),
         ours, 3e-2, reps, flops)

    # Forward + backward with the bias requiring grad.
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    dout = torch.randn_like(q)
    time_fwd_bwd(table, name, "flash_sparse_attn",
                 lambda: flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True,
                                                block_mask=sel, block_size=block),
                 leaves, dout, reps, flops)
    bias_leaf = leaves[3]

    def score_mod_grad(score, b, h, qi, ki):
        return score + bias_leaf[b, h // G, 0, ki].float()

    time_fwd_bwd(table, name, "FlexAttention",
                 lambda: flex_compiled(*(x.transpose(1, 2) for x in leaves[:3]),
                                       score_mod=score_mod_grad, block_mask=bm,
                                       enable_gqa=True).transpose(1, 2),
                 leaves, dout, reps, flops)


_L2_FLUSH = None


def flushed_ms(fn, reps, calls=1, warmup=3):
    """Median ms of `calls` back-to-back calls of fn (per call), the L2 cache flushed before each
    rep (outside the timed region): a decode's K / V must come from HBM, as they would between
    two steps of a model. calls=1 is one call between the events, its host time before the first
    launch included; calls > 1 measures what a decode loop whose host runs ahead sees."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        _L2_FLUSH.zero_()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


def kernel_us(fn, reps):
    """Mean GPU time per call of fn's CUDA kernels (torch profiler; the L2 flush between calls
    excluded): what a call costs the device, without the host time that flushed_ms's one-call
    figure includes."""
    from torch.profiler import ProfilerActivity, profile
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            _L2_FLUSH.zero_()
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name.lower()
        if "fill" in name or "zero" in name:  # the flush
            continue
        total += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return total / reps


def device_copy_gbps(reps):
    """Device-to-device copy of 2 GiB: bytes read + written per second (the decode bar's unit)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = flushed_ms(lambda: y.copy_(x), reps)
    del x, y
    return 2 * (2 << 30) / ms * 1e-6


DECODE_CASES = [(1, 524288), (8, 524288), (1, 32768), (8, 32768), (64, 32768)]


def decode(table, reps, H=32, Hk=8, D=128, keep_every=8, block=128, page=64):
    """Issue #15's decode bars: one query per head over a long K / V, a key mask keeping 1/8 of
    the 128-key blocks, batches 1, 8 and 64 (64 x 512K keys do not fit the card). Per case: ours
    one call between the events and back to back (host hidden), ours over a paged cache (pages of
    `page` keys in shuffled order, same kept bytes; must equal the contiguous call bitwise), SDPA
    flash over all keys, and FlexAttention at batch 1. GB/s over the kept K + V bytes."""
    from torch.nn.attention import SDPBackend
    from flash_sparse_attn import flash_sparse_attn_with_kvcache
    copy = device_copy_gbps(reps)
    print(f"device copy: {copy:.0f} GB/s (2 GiB, read + write)", flush=True)
    table.add("device copy 2 GiB", "torch copy_", note=f"{copy:.0f} GB/s", gbps_copy=copy)
    for B, Sk in DECODE_CASES:
        name = f"decode fwd ({B},1,{Sk},{H},{Hk},{D}) 1/{keep_every} blocks bf16"
        print(name, flush=True)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        keep_blocks = (torch.arange(Sk // block, device="cuda") % keep_every) == 0
        mask = keep_blocks.repeat_interleave(block)[None, None, None, :]  # (1, 1, 1, Sk) key-only
        kept_bytes = 2 * B * (Sk // keep_every) * Hk * D * 2
        run = lambda: flash_sparse_attn_func(q, k, v, attn_mask=mask, is_causal=True)  # noqa: E731
        with torch.no_grad():
            ours = run()
            check_rows(name, ours, q, k, v, lambda b, h, i: mask[0, 0, 0], rows=(0,))
            ms1 = flushed_ms(run, reps)
            table.add(name, "flash_sparse_attn, one call", ms1, None, "kept K+V bytes", kept_bytes,
                      copy_share=kept_bytes / ms1 * 1e-6 / copy)
            msn = flushed_ms(run, reps, calls=8)
            table.add(name, "flash_sparse_attn, 8 calls back to back", msn, None,
                      "per call; kept K+V bytes", kept_bytes,
                      copy_share=kept_bytes / msn * 1e-6 / copy)
            # The same keys as pages of a cache, in shuffled order.
            kp, vp = (torch.empty(B * Sk // page, page, Hk, D, device="cuda",
                                  dtype=torch.bfloat16) for _ in range(2))
            table_ = torch.randperm(B * Sk // page, device="cuda").to(torch.int32).view(B, -1)
            kp[table_.view(-1).long()] = k.reshape(-1, page, Hk, D)
            vp[table_.view(-1).long()] = v.reshape(-1, page, Hk, D)
            paged = lambda: flash_sparse_attn_with_kvcache(  # noqa: E731
                q, kp, vp, page_table=table_, attn_mask=mask, is_causal=True)
            same = torch.equal(paged(), ours)
            msp = flushed_ms(paged, reps)
            table.add(name, f"flash_sparse_attn, paged (page {page})", msp, None,
                      "kept K+V bytes; " + ("bitwise equal to contiguous" if same else
                                            "WRONG: differs from contiguous"), kept_bytes,
                      paged_ratio=msp / ms1)
            # The device's share alone (host time excluded), contiguous and paged.
            us_c, us_p = kernel_us(run, reps), kernel_us(paged, reps)
            table.add(name, "flash_sparse_attn, kernels only (profiler)", us_c * 1e-3, None,
                      "kept K+V bytes", kept_bytes, copy_share=kept_bytes / us_c * 1e-3 / copy)
            table.add(name, f"flash_sparse_attn, paged (page {page}), kernels only", us_p * 1e-3,
                      None, f"paged / contiguous kernels {us_p / us_c:.3f}", kept_bytes,
                      paged_kernel_ratio=us_p / us_c)
            del kp, vp
            try:
                ms_sdpa = flushed_ms(
                    lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, enable_gqa=True), reps)
                table.add(name, "SDPA flash, all keys (dense)", ms_sdpa, None, "all K+V bytes",
                          2 * B * Sk * Hk * D * 2, ours_ratio=ms1 / ms_sdpa)
            except Exception as e:  # noqa: BLE001
                table.add(name, "SDPA flash, all keys (dense)", note=f"error: {str(e)[:100]}")
            if B != 1:
                continue
            if flex_compiled is None:
                table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
                continue
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            nb = Sk // block
            kv_num = keep_blocks.sum().to(torch.int32).view(1, 1, 1).expand(B, H, 1).contiguous()
            kv_idx = torch.nonzero(keep_blocks).flatten().to(torch.int32)
            kv_idx = torch.cat([kv_idx, torch.zeros(nb - kv_idx.numel(), dtype=torch.int32,
                                                    device="cuda")]).view(1, 1, 1, nb)
            kv_idx = kv_idx.expand(B, H, 1, nb).contiguous()
            bm = BlockMask.from_kv_blocks(torch.zeros_like(kv_num), torch.zeros_like(kv_idx),
                                          kv_num, kv_idx, BLOCK_SIZE=block, seq_lengths=(1, Sk))
            peer(table, name, "FlexAttention (BlockMask)",
                 lambda: flex_compiled(qh, kh, vh, block_mask=bm, enable_gqa=True).transpose(1, 2),
                 ours, 2e-2, reps, None, kept_bytes)
        del q, k, v
        torch.cuda.empty_cache()


# (B, cache keys, lengths drawn from [lo, hi) keys): a cache filled near its size, and one
# allocated for a longer context than the sequences hold so far (most of its blocks past them).
KVCACHE_CASES = [(8, 32768, 16384, 32768), (1, 524288, 393216, 524288), (8, 131072, 4096, 12288),
                 (64, 32768, 8192, 32768)]


def kvcache_lengths(table, reps, H=32, Hk=8, D=128, keep_every=8, block=128):
    """A decode step over a cache with per-sequence lengths (flash_sparse_attn_with_kvcache's
    cache_seqlens), a key mask keeping 1/8 of the 128-key blocks, causal, the L2 cache flushed
    before every rep, per call over 8 calls back to back (a decode loop's host running ahead; the
    lengths a new tensor every call). Ours with the lengths in the kernels (one plan for every
    step; blocks past a length skipped), against the lengths written into the mask (what the
    call did before: a new mask, so a new plan, every step), and SDPA flash over every key of the
    cache. GB/s over the kept K + V bytes within the lengths."""
    from torch.nn.attention import SDPBackend
    from flash_sparse_attn import flash_sparse_attn_with_kvcache
    for B, Sk, lo, hi in KVCACHE_CASES:
        name = (f"decode step, cache ({B},{Sk},{Hk},{D}) lengths [{lo},{hi}) "
                f"1/{keep_every} blocks bf16")
        print(name, flush=True)
        g = torch.Generator(device="cuda").manual_seed(B + Sk)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        keep_blocks = (torch.arange(Sk // block, device="cuda") % keep_every) == 0
        mask = keep_blocks.repeat_interleave(block)[None, None, None, :]
        lens = torch.randint(lo, hi, (B,), device="cuda", generator=g, dtype=torch.int32)
        kept = int((mask[0, 0, 0][None, :] & (torch.arange(Sk, device="cuda")[None, :] <
                                               lens[:, None])).sum())
        kept_bytes = 2 * kept * Hk * D * 2
        keys = torch.arange(Sk, device="cuda")

        def ours():
            return flash_sparse_attn_with_kvcache(q, k, v, lens.clone(), attn_mask=mask,
                                                  is_causal=True)

        def as_mask():
            held = keys[None, None, None, :] < lens.clone().view(B, 1, 1, 1)
            return flash_sparse_attn_with_kvcache(q, k, v, attn_mask=held & mask, is_causal=True)

        with torch.no_grad():
            out = ours()
            err = max_err(out, as_mask())
            ok = math.isfinite(err) and err <= 2e-2
            ms = flushed_ms(ours, reps, calls=8)
            table.add(name, "flash_sparse_attn, cache_seqlens", ms, None,
                      "per call, 8 back to back; kept K+V bytes", kept_bytes)
            # The step captured once in a CUDA graph and replayed: what a serving loop does to
            # drop the host's share (the plan is made by the warm-up call, before the capture).
            try:
                static_lens = lens.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    flash_sparse_attn_with_kvcache(q, k, v, static_lens, attn_mask=mask,
                                                   is_causal=True)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = flash_sparse_attn_with_kvcache(q, k, v, static_lens,
                                                              attn_mask=mask, is_causal=True)
                graph.replay()
                same = torch.equal(captured, out)
                ms_graph = flushed_ms(graph.replay, reps, calls=8)
                table.add(name, "flash_sparse_attn, cache_seqlens, CUDA graph replay", ms_graph,
                          None, "per replay, 8 back to back; " +
                          ("bitwise equal to the eager call" if same else
                           "WRONG: differs from the eager call"), kept_bytes,
                          graph_speedup=ms / ms_graph)
                del graph
            except Exception as e:  # noqa: BLE001
                table.add(name, "flash_sparse_attn, cache_seqlens, CUDA graph replay",
                          note=f"error: {type(e).__name__}: {str(e)[:100]}")
            ms_mask = flushed_ms(as_mask, reps, calls=8)
            table.add(name, "flash_sparse_attn, lengths as a mask", ms_mask, None,
                      ("max|diff| vs cache_seqlens %.2e" % err) if ok else
                      f"WRONG: max|diff| vs cache_seqlens {err:.3g}", kept_bytes,
                      lengths_speedup=ms_mask / ms)
            try:
                ms_sdpa = flushed_ms(
                    lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, enable_gqa=True), reps,
                    calls=8)
                table.add(name, "SDPA flash, every cache key (dense)", ms_sdpa, None,
                          "all K+V bytes", 2 * B * Sk * Hk * D * 2, ours_ratio=ms / ms_sdpa)
            except Exception as e:  # noqa: BLE001
                table.add(name, "SDPA flash, every cache key (dense)",
                          note=f"error: {str(e)[:100]}")
        del q, k, v
        torch.cuda.empty_cache()


def broadcast_bias(table, reps, B=2, S=4096, H=16, D=128):
    """Forward + backward with a full (Sq, Sk) bias broadcast over batch and/or heads, requiring
    grad: its gradient sums the dS of several (b, h). Ours by default (fp32 atomics) and with
    deterministic=True (one ordered dQ launch per (b, h) sharing a bias slice), next to a
    non-broadcast bias (each dS written once) and the peers that take a bias gradient."""
    from torch.nn.attention import SDPBackend
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4 * S * S * D * B * H / 2
    for shape in [(B, H, S, S), (1, H, S, S), (B, 1, S, S), (1, 1, S, S)]:
        name = f"bias {tuple(shape)} grad, causal ({B},{S},{H},{H},{D}) bf16"
        print(name, flush=True)
        bias = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        ours = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
        ar = torch.arange(S, device="cuda")
        check_rows(name, ours, q, k, v, lambda b, h, i: ar <= i,
                   lambda b, h, i: bias[b % shape[0], h % shape[1], i], rows=(0, 1000, -1))
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
        grads = {}
        for det in (False, True):
            label = "flash_sparse_attn" + (" deterministic" if det else "")
            run = fwd_bwd(lambda d=det: flash_sparse_attn_func(
                *leaves[:3], attn_bias=leaves[3], is_causal=True, deterministic=d), leaves, dout)
            run()
            grads[det] = leaves[3].grad.clone()
            time_fwd_bwd(table, name, label, lambda d=det: flash_sparse_attn_func(
                *leaves[:3], attn_bias=leaves[3], is_causal=True, deterministic=d),
                leaves, dout, reps, flops)
        diff = max_err(grads[False], grads[True])
        scale = grads[False].float().abs().max().item()
        print(f"  (dbias default vs deterministic: max|diff| {diff:.2e}, |dbias| max {scale:.2e})")
        if not diff <= 2e-2 * max(scale, 1e-3):
            raise AssertionError(f"{name}: default and deterministic dbias disagree by {diff:.3g}")

        def peer_fwd_bwd(label, fn):
            """Times a peer's forward + backward, then checks its bias gradient against ours."""
            leaves[3].grad = None
            time_fwd_bwd(table, name, label, fn, leaves, dout, reps, flops)
            if leaves[3].grad is not None:
                err = max_err(leaves[3].grad, grads[False])
                ok = err <= 3e-2 * max(scale, 1e-3)
                print(f"    ({label} dbias vs ours: max|diff| {err:.2e}{'' if ok else ' WRONG'})")
                if not ok:
                    table.rows[-1]["note"] = f"WRONG dbias: max|peer - ours| = {err:.3g}"

        # SDPA's memory-efficient backend takes a float mask and returns its gradient.
        peer_fwd_bwd("SDPA efficient (float mask)",
                     lambda: sdpa(*leaves[:3], SDPBackend.EFFICIENT_ATTENTION,
                                  attn_mask=leaves[3] + causal_additive(S)))
        if flex_compiled is None:
            table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
        else:
            from torch.nn.attention.flex_attention import create_block_mask
            bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device="cuda")
            bl = leaves[3]
            per_batch, per_head = shape[0] > 1, shape[1] > 1

            def score_mod(score, b, h, qi, ki):
                return score + bl[b if per_batch else 0, h if per_head else 0, qi, ki].float()

            peer_fwd_bwd("FlexAttention", lambda: flex_compiled(
                *(x.transpose(1, 2) for x in leaves[:3]), score_mod=score_mod,
                block_mask=bm).transpose(1, 2))
        del leaves, grads, bias
        torch.cuda.empty_cache()


# ---- topk: the reference's workflow (issues #11 and #12) ----------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_MIN = torch.finfo(torch.bfloat16).min
FLEX_GATHER_BLOCK = 128


def flex_gather(q, k, v, bias, keep):
    """Attention over the top-`keep` keys of a per-key bias, written in torch the way a user can
    today: the floor issue #12 sets. q (B, H, Sq, D), k / v (B, Hk, Sk, D) (head-first, as
    FlexAttention takes them), bias (B, Hk, 1, Sk); returns (B, H, Sq, D).

    idx = the top-`keep` key indices per (batch, kv head), sorted; K, V and the bias gathered by
    idx inside the autograd graph (so the bias gets its gradient); FlexAttention with the gathered
    bias as score_mod and a mask_mod keeping gathered key c for query q iff idx[c] <= q + Sk - Sq
    (bottom-right causal by original index); GQA through enable_gqa. The BlockMask comes from
    counts, not from evaluating the mask_mod over Sq x keep: idx is sorted, so query q sees exactly
    the first n(q) = #{c: idx[c] <= q + Sk - Sq} gathered keys, and a query block sees its first
    n(first row) // 128 key blocks whole and the following ones up to n(last row) in part.

    The gathers and the BlockMask run eagerly and the attention through the compiled
    flex_attention (flex_gather_compiled): compiling the whole function made Inductor fail on the
    H200 (torch 2.11) with "The argument '128*((-128)) + 127' is not comparable" when the gathered
    keys are fewer than the queries."""
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    G = H // Hk
    keep = min(keep, Sk)
    offset = Sk - Sq
    bias_k = bias[:, :, 0, :]                                                    # (B, Hk, Sk)
    idx = bias_k.detach().topk(keep, dim=-1).indices.sort(dim=-1).values         # (B, Hk, keep)
    k_g = k.gather(2, idx[..., None].expand(-1, -1, -1, D))                      # (B, Hk, keep, D)
    v_g = v.gather(2, idx[..., None].expand(-1, -1, -1, D))
    bias_g = bias_k.gather(2, idx)                                               # (B, Hk, keep)

    def score_mod(score, b, h, qi, c):
        return score + bias_g[b, h // G, c].float()

    def mask_mod(b, h, qi, c):
        return idx[b, h // G, c] <= qi + offset

    block = FLEX_GATHER_BLOCK
    nq, nk = -(-Sq // block), -(-keep // block)
    first = torch.arange(nq, device=q.device) * block
    rows = torch.cat([first, (first + block - 1).clamp(max=Sq - 1)]) + offset   # (2 nq,)
    seen = torch.searchsorted(idx, rows.expand(B, Hk, -1).contiguous(), right=True)
    full = seen[..., :nq] // block                                               # (B, Hk, nq)
    partial = -(-seen[..., nq:] // block) - full
    blocks = torch.arange(nk, device=q.device)
    full_idx = blocks.expand(B, Hk, nq, nk)
    partial_idx = (full[..., None] + blocks).clamp(max=nk - 1)                   # after the full
    per_head = lambda t: t.repeat_interleave(G, dim=1).to(torch.int32).contiguous()  # noqa: E731
    block_mask = BlockMask.from_kv_blocks(
        per_head(partial), per_head(partial_idx), per_head(full), per_head(full_idx),
        BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Sq, keep))
    attend = flex_compiled if (q.is_cuda and flex_compiled is not None) else flex_attention
    return attend(q, k_g, v_g, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


flex_gather_compiled = None if flex_compiled is None else flex_gather

REFERENCE_VERSION = "1.2.3"
REFERENCE_FILE = os.path.join(ROOT, ".peers", f"flash_sparse_attn-{REFERENCE_VERSION}",
                              "flash_sparse_attn", "flash_sparse_attn_triton.py")


@functools.lru_cache(maxsize=None)
def reference_kernel():
    """(triton_sparse_attn_func, None), or (None, why not): the reference project's Triton kernel
    (flash-sparse-attn 1.2.3), imported from .peers/ under a module name of its own, so that it
    cannot clash with our `flash_sparse_attn` package. Its call: (q, k, v, attn_mask, attn_bias,
    is_causal) with our (B, S, H, D) layout, a bool mask and a bias in q's dtype, ({B|1}, {H|Hk|1},
    {S|1}, S) with a unit key stride (it pads the key dim to a multiple of 128 itself). Its causal
    mask is top-left aligned: the same as ours here, where Sq = Sk."""
    if not os.path.exists(REFERENCE_FILE):
        return None, "not available (run scripts/fetch_reference.sh)"
    try:
        spec = importlib.util.spec_from_file_location("fsa_reference_triton", REFERENCE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.triton_sparse_attn_func, None
    except Exception as e:  # noqa: BLE001 - e.g. no triton: its rows say so
        return None, f"not available: {type(e).__name__}: {str(e)[:100]}"


# Cases, ordered so that the cases of one shape run together (they share inputs and baselines).
TOPK_CASES = {
    # id: (form, (B, S, H, Hk, D), keys kept)
    "key16k": ("key", (1, 16384, 32, 8, 128), 2048),
    "row16k": ("row", (1, 16384, 32, 8, 128), 2048),
    "key32k": ("key", (1, 32768, 32, 8, 128), 2048),
    "mem32k": ("memory", (1, 32768, 32, 8, 128), 2048),
    "keyref": ("key", (1, 32768, 2, 1, 64), 1024),     # the reference's own benchmark shape
    "rowref": ("row", (1, 32768, 2, 1, 64), 1024),
}
# A measurement takes at most `reps` calls and about this long (never under 3 calls): the rows that
# build a mask on a host copy inside the timed region take a second or more per call.
TOPK_BUDGET_S = 5.0


class _Wrong(Exception):
    """A peer disagrees with ours: reported as a WRONG row, never timed."""


def _median_ms_within(fn, reps, budget_s=TOPK_BUDGET_S):
    """median_ms with fewer calls when `reps` of them would take longer than budget_s. Returns
    (ms, calls timed)."""
    fn()  # first call: compiles, autotunes, plans
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(3, min(reps, int(budget_s / (time.perf_counter() - start))))
    return median_ms(fn, calls, warmup=1 if calls == reps else 0), calls


def _measure(table, name, label, fn, reps, flops=None, check=None, note=""):
    """Runs check() (raises _Wrong, or returns a note), then times fn; a failure of either is a
    row. Returns the median ms, or None."""
    try:
        if check is not None:
            note = " ".join(x for x in (note, check()) if x)
        ms, calls = _median_ms_within(fn, reps)
        if calls < reps:
            note += f" ({calls} calls timed)"
        table.add(name, label, ms, flops, note)
        return ms
    except _Wrong as e:
        table.add(name, label, note=f"WRONG: {e}")
    except torch.cuda.OutOfMemoryError:
        table.add(name, label, note="out of memory")
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        table.add(name, label, note=f"error: {type(e).__name__}: {str(e)[:120]}")
    return None


def _agree(what, got, ours, tol, nan_allowed=None):
    """max|got - ours| <= tol over the finite entries of `got`, else _Wrong. Non-finite entries are
    wrong, except with nan_allowed="empty rows": where ours is exactly 0 (our empty rows: the
    reference's Triton kernel has no guard for a row that keeps no key and returns NaN there), and
    with nan_allowed="anywhere" (its gradients: such a row's NaN spreads to the dK, dV and dbias of
    every key its tiles touch). Returns a note with the difference and any NaN count."""
    bad = ~torch.isfinite(got)
    note = ""
    if bad.any():
        if nan_allowed is None or (nan_allowed == "empty rows" and (ours[bad] != 0).any()):
            raise _Wrong(f"{what}: {int(bad.sum())} non-finite entries")
        note = f"{what}: {int(bad.sum())} NaN ({nan_allowed});"
    err = (got.float() - ours.float()).masked_fill(bad, 0).abs().max().item()
    if not err <= tol:
        raise _Wrong(f"{what}: max|peer - ours| = {err:.3g} > {tol:.3g}")
    return f"{note} {what} max|diff| {err:.2e}".strip()


def _grads(fn, leaves, dout):
    """One forward + backward of fn(*leaves); the leaves' gradients (None where none flows)."""
    for t in leaves:
        t.grad = None
    fn(*leaves).backward(dout)
    return [None if t.grad is None else t.grad.clone() for t in leaves]


def _agree_grads(grads, ours, nan_allowed=None):
    """Each gradient within 3% of the largest |gradient| of ours (bf16 sums over thousands of
    rows); a gradient ours has and the peer lacks is wrong."""
    notes = []
    for what, g, o in zip(("dq", "dk", "dv", "dbias"), grads, ours):
        if o is None:
            continue
        if g is None:
            raise _Wrong(f"{what}: no gradient")
        tol = 3e-2 * max(o.float().abs().max().item(), 1e-6)
        notes.append(_agree(what, g, o, tol, nan_allowed))
    return "; ".join(notes)


def _untie_top(bias, keep):
    """randn in bf16 repeats values, so a row's keep-th largest bias usually ties with others, and
    which of those a top-k keeps is up to the implementation (create_mask: the lowest indices;
    torch.topk: unspecified). Lowers the tied entries past the first `keep` (by index) to the next
    smaller bf16 value, in place, so that every implementation keeps the same keys."""
    rows = bias.view(-1, bias.shape[-1])                                         # (B * Hk, S)
    t = rows.topk(keep, dim=-1).values[:, -1:]                                   # keep-th largest
    tied = rows == t
    surplus = tied & (tied.cumsum(-1) > keep - (rows > t).sum(-1, keepdim=True))
    # Next smaller bf16 value through the bit pattern: one step toward 0 when positive, away from
    # it when negative; below +-0 comes the smallest negative subnormal (bits 0x8001).
    bits = t.view(torch.int16)
    lower = torch.where(t > 0, bits - 1,
                        torch.where(t < 0, bits + 1, torch.full_like(bits, -0x7FFF)))
    rows.copy_(torch.where(surplus, lower.view(torch.bfloat16), rows))


class _TopkInputs:
    """q, k, v and the bias (randn, bf16; ties at each row's keep-th value undone) of one (B, S, H,
    Hk, D) shape, and its dense causal times once measured: the cases of a shape share both."""

    def __init__(self, shape, keep, device="cuda"):
        B, S, H, Hk, D = shape
        self.shape, self.keep = shape, keep
        self.label = "(" + ",".join(map(str, shape)) + ")"
        self.q = torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16)
        self.k, self.v = (torch.randn(B, S, Hk, D, device=device, dtype=torch.bfloat16)
                          for _ in range(2))
        self.bias = torch.randn(B, Hk, 1, S, device=device, dtype=torch.bfloat16)
        _untie_top(self.bias, keep)
        self.dense = None

    def causal_mask(self):
        """The 4-D causal mask (1, 1, S, S) that transformers hands to create_mask."""
        S = self.shape[1]
        return torch.ones(S, S, device=self.q.device, dtype=torch.bool).tril()[None, None]


def _kept_flops(mask, H, D):
    """Forward flops over the kept (row, key) pairs, 4 D each per query head. A key mask (B, Hk, 1,
    S) keeps key j for rows j..S-1 (causal, Sq = Sk); a per-row mask from create_mask with the
    causal mask holds causal pairs only."""
    G = H // mask.shape[1]
    if mask.shape[2] == 1:
        S = mask.shape[-1]
        pairs = ((S - torch.arange(S, device=mask.device)) * mask[:, :, 0]).sum()
    else:
        pairs = mask.sum()
    return 4 * D * G * pairs.item()


# One implementation in a topk comparison: fn(q, k, v, bias) -> out; the reference gets its NaN
# allowances (see _agree); note goes to its rows.
Impl = collections.namedtuple("Impl", "id label fn is_reference note", defaults=(False, ""))


def _run_impls(table, name, x, impls, flops, reps):
    """Times each Impl: the forward, then forward + backward with q, k, v and the bias requiring
    grad. impls[0] is ours, checked against float64 by the caller; every other is checked against
    it (output, then gradients) before it is timed. Returns {(id, "fwd" | "fwd+bwd"): ms}."""
    t = {}
    ours_fn = impls[0].fn
    ours = ours_fn(x.q, x.k, x.v, x.bias)
    for i, impl in enumerate(impls):
        check = None
        if i:
            check = lambda impl=impl: _agree(  # noqa: E731
                "out", impl.fn(x.q, x.k, x.v, x.bias), ours, 2e-2,
                "empty rows" if impl.is_reference else None)
        t[impl.id, "fwd"] = _measure(table, name, impl.label,
                                     lambda fn=impl.fn: fn(x.q, x.k, x.v, x.bias), reps, flops,
                                     check, impl.note)
    leaves = [a.detach().clone().requires_grad_(True) for a in (x.q, x.k, x.v, x.bias)]
    dout = torch.randn_like(x.q)
    ours_grads = _grads(ours_fn, leaves, dout)
    for i, impl in enumerate(impls):
        check = None
        if i:
            check = lambda impl=impl: _agree_grads(  # noqa: E731
                _grads(impl.fn, leaves, dout), ours_grads,
                "anywhere" if impl.is_reference else None)
        t[impl.id, "fwd+bwd"] = _measure(table, name, impl.label + " fwd+bwd",
                                         fwd_bwd(lambda fn=impl.fn: fn(*leaves), leaves, dout),
                                         reps, 3.5 * flops, check, impl.note)
    return t


def _dense_baselines(table, reps, x):
    """Our dense causal (no mask, no bias), SDPA cuDNN and flash dense causal, on x's shape; once
    per shape."""
    from torch.nn.attention import SDPBackend
    if x.dense is not None:
        return x.dense
    B, S, H, Hk, D = x.shape
    name = f"dense causal {x.label} bf16 (no mask, no bias)"
    print(name, flush=True)
    G = H // Hk
    ar = torch.arange(S, device=x.q.device)
    out = flash_sparse_attn_func(x.q, x.k, x.v, is_causal=True)
    check_rows(name, out, x.q, x.k, x.v, lambda b, h, i: ar <= i)
    del out
    impls = [Impl("dense", "ours dense causal",
                  lambda q, k, v, b: flash_sparse_attn_func(q, k, v, is_causal=True))]
    for impl, label, backend in [("cudnn", "SDPA cuDNN dense causal", SDPBackend.CUDNN_ATTENTION),
                                 ("flash", "SDPA flash dense causal", SDPBackend.FLASH_ATTENTION)]:
        impls.append(Impl(impl, label, lambda q, k, v, b, backend=backend: sdpa(
            q, k, v, backend, is_causal=True, enable_gqa=G > 1)))
    x.dense = _run_impls(table, name, x, impls, 4 * S * S * D * B * H / 2, reps)
    return x.dense


def _selection_in_call(x, keep, per_row):
    """Ours with the top-k selection inside the call, as an Impl "topk": `topk=keep` (with
    `topk_causal=True` for the per-row form) where this build has them; else create_mask followed
    by the attention, both in the timed region, and the note says so (a TypeError for an unknown
    keyword tells which)."""
    options = {"topk": keep, **({"topk_causal": True} if per_row else {})}

    def with_topk(q, k, v, bias):
        # The thresholds live in the plan, which the plan cache keeps per bias tensor; the reps
        # reuse one bias, a training step has a new one: plan in every call, as the bars ask
        # ("threshold computation included"). (topk= builds a new key mask, so a new plan, anyway.)
        if per_row:
            clear_plan_cache()
        return flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True, **options)

    try:
        with_topk(x.q, x.k, x.v, x.bias)
        return Impl("topk", "ours, " + ", ".join(f"{k}={v}" for k, v in options.items()),
                    with_topk)
    except TypeError as e:
        missing = [k for k in options if f"'{k}'" in str(e)]
        if "unexpected keyword" not in str(e) or not missing:
            raise
    causal = x.causal_mask() if per_row else None

    def with_create_mask(q, k, v, bias):
        B, S = q.shape[:2]
        mask = create_mask(bias, causal, B, S, S, keep, BF16_MIN)
        return flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

    return Impl("topk", f"ours, create_mask{'(causal)' if per_row else ''} + attention",
                with_create_mask,
                note=f"no {missing[0]}= in this build: create_mask + attention, both timed;")


_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


def _ratio_rows(table, name, t, specs):
    """One row per (label, numerator id, denominator id, [(op, bar, issue)]): the ratio of two
    measurements and whether it meets each bar."""
    for label, num, den, bars in specs:
        a, b = t.get(num), t.get(den)
        if a is None or b is None:
            table.add(name, f"ratio {label}", note="n/a (a measurement is missing above)")
            continue
        r = a / b
        verdicts = [f"{issue} {op} {bar}: {'met' if _OPS[op](r, bar) else 'NOT met'}"
                    for op, bar, issue in bars]
        table.add(name, f"ratio {label}",
                  note=f"{r:.3g}" + (f"  [{'; '.join(verdicts)}]" if verdicts else ""), ratio=r)


def _topk_bars(x, per_row):
    """The ratios the issues set bars on, as _ratio_rows specs. "given": ours with the mask
    given; "in-call": ours with the selection inside the call; dense: no mask, no bias."""
    B, S, H, Hk, D = x.shape
    both = ("fwd", "fwd+bwd")
    if per_row:
        specs = [(f"{m}: given / our dense", ("ours", m), ("dense", m),
                  [("<=", 1.3, "#11")] if S == 16384 else []) for m in both]
        return specs + [
            ("fwd: in-call / our dense", ("topk", "fwd"), ("dense", "fwd"), []),
            ("fwd+bwd: in-call / our dense", ("topk", "fwd+bwd"), ("dense", "fwd+bwd"),
             [("<=", 1.15, "#11")]),
            ("fwd+bwd: in-call / cuDNN dense", ("topk", "fwd+bwd"), ("cudnn", "fwd+bwd"),
             [("<=", 0.5, "#12")]),
            ("fwd: reference / in-call", ("ref", "fwd"), ("topk", "fwd"), []),
            ("fwd+bwd: reference / in-call", ("ref", "fwd+bwd"), ("topk", "fwd+bwd"),
             [(">=", 3, "#11"), (">=", 6, "#12")]),
            ("fwd+bwd: reference / given", ("ref", "fwd+bwd"), ("ours", "fwd+bwd"), [])]
    # The key-mask bars against dense attention are set on the (1, S, 32, 8, 128) shapes only.
    dense_bars = (H, Hk, D) == (32, 8, 128)
    cudnn_bar = 0.3 if S <= 16384 else 0.2
    specs = []
    for ours, who in (("ours", "given"), ("topk", "in-call")):
        for m in both:
            specs += [
                (f"{m}: {who} / our dense", (ours, m), ("dense", m),
                 [("<=", 1.15, "#11")] if dense_bars else []),
                (f"{m}: {who} / cuDNN dense", (ours, m), ("cudnn", m),
                 [("<=", cudnn_bar, "#12")] if dense_bars else []),
                (f"{m}: reference / {who}", ("ref", m), (ours, m),
                 [(">=", 10, "#12")] if m == "fwd+bwd" else [])]
        specs.append((f"fwd+bwd: {who} / flex-gather", (ours, "fwd+bwd"), ("flex", "fwd+bwd"),
                      [("<=", 0.6, "#12")]))
    return specs


def _topk_case(table, reps, x, per_row):
    """One top-k form on x's shape, next to its dense baselines. The key mask (per_row False): the
    global top-`keep` keys per (batch, kv head), (B, Hk, 1, S), causality from the kernel: what
    flash_sparse_attention_forward builds for Doge (attention_mask=None). Per row: each row's
    top-`keep` causal keys, create_mask with the causal 4-D mask: (B, Hk, S, S)."""
    B, S, H, Hk, D = x.shape
    G, keep = H // Hk, x.keep
    t = dict(_dense_baselines(table, reps, x))
    name = f"topk {'per row' if per_row else 'key mask'} {x.label} keep {keep} causal bf16"
    print(name, flush=True)
    mask = create_mask(x.bias, x.causal_mask() if per_row else None, B, S, S, keep, BF16_MIN)
    flops = _kept_flops(mask, H, D)

    def given(q, k, v, bias):
        return flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

    ar = torch.arange(S, device=x.q.device)
    check_rows(name, given(x.q, x.k, x.v, x.bias), x.q, x.k, x.v,
               lambda b, h, i: mask[b, h // G, i if per_row else 0] & (ar <= i),
               lambda b, h, i: x.bias[b, h // G, 0])
    print(f"  (density {100 * flops / (2 * D * H * B * S * S):.2f}% of the causal triangle; "
          "'given': the mask made by create_mask before the call, not timed)")
    impls = [Impl("ours", f"ours, {'(B,Hk,S,S)' if per_row else 'key'} mask given", given),
             _selection_in_call(x, keep, per_row)]
    if not per_row:
        if flex_gather_compiled is None:
            table.add(name, "FlexAttention, gathered keys", note=f"unavailable: {FLEX_ERROR}")
        else:
            impls.append(Impl("flex", "FlexAttention, gathered keys", lambda q, k, v, b: (
                flex_gather_compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), b,
                                     keep).transpose(1, 2))))
    reference, why = reference_kernel()
    if reference is None:
        table.add(name, "reference Triton", note=f"reference: {why}")
    else:
        impls.append(Impl("ref", "reference Triton, same mask",
                          lambda q, k, v, b: reference(q, k, v, mask, b, True), is_reference=True))
    t.update(_run_impls(table, name, x, impls, flops, reps))
    _ratio_rows(table, name, t, _topk_bars(x, per_row))


def _topk_memory(table, reps, x):
    """Peak memory (torch.cuda.max_memory_allocated above what is allocated before the call) of
    one forward + backward, per-row top-k against dense causal; issue #11's bar: < 2x. Without
    topk_causal in this build, the mask create_mask builds counts, the causal 4-D mask it reads
    (an input, as q is) does not."""
    B, S, H, Hk, D = x.shape
    name = f"topk per row peak memory fwd+bwd {x.label} keep {x.keep} bf16"
    print(name, flush=True)
    leaves = [a.detach().clone().requires_grad_(True) for a in (x.q, x.k, x.v, x.bias)]
    dout = torch.randn_like(x.q)

    def peak_mb(fn):
        for a in leaves:
            a.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*leaves).backward(dout)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    dense = peak_mb(lambda q, k, v, b: flash_sparse_attn_func(q, k, v, is_causal=True))
    table.add(name, "ours dense causal", note=f"peak {dense:.0f} MiB", peak_mb=dense)
    selection = _selection_in_call(x, x.keep, per_row=True)
    per_row = peak_mb(selection.fn)
    table.add(name, selection.label, note=f"{selection.note} peak {per_row:.0f} MiB".strip(),
              peak_mb=per_row)
    _ratio_rows(table, name, {"row": per_row, "dense": dense},
                [("peak: per row / dense", "row", "dense", [("<", 2, "#11")])])


def topk(table, reps, cases=tuple(TOPK_CASES)):
    """Issues #11 and #12 (see the module docstring); every case's failure is a row."""
    x = None
    for case in cases:
        form, shape, keep = TOPK_CASES[case]
        start = time.perf_counter()
        try:
            if x is None or (x.shape, x.keep) != (shape, keep):
                x = None
                torch.cuda.empty_cache()
                x = _TopkInputs(shape, keep)
            if form == "memory":
                _topk_memory(table, reps, x)
            else:
                _topk_case(table, reps, x, per_row=form == "row")
        except torch.cuda.OutOfMemoryError:
            table.add(case, "(whole case)", note="out of memory")
        except Exception as e:  # noqa: BLE001 - e.g. ours differs from float64: nothing to time
            table.add(case, "(whole case)", note=f"error: {type(e).__name__}: {str(e)[:160]}")
        torch.cuda.empty_cache()
        print(f"  ({case}: {time.perf_counter() - start:.0f} s)", flush=True)


def varlen(table, reps, total=65536, docs=16, H=32, Hk=8, D=128, seed=0):
    """Issue #15: a packed batch of `docs` documents of random lengths totalling `total` tokens,
    causal, a per-key bias (Hk, total) with its gradient, forward + backward. Ours as one packed
    call (offsets on the device), ours on the documents one by one (flash_sparse_attn_func on each
    document's views, every one a full-occupancy call), and FlexAttention over the packed sequence
    with a document mask and the bias as a score_mod (its gradient through the captured tensor)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted((torch.randperm(total - 1, generator=g)[:docs - 1] + 1).tolist())
    bounds = [0] + cuts + [total]
    lens = [b - a for a, b in zip(bounds, bounds[1:])]
    name = f"varlen ({docs} docs, {total} tokens, {H},{Hk},{D}) causal bias bf16"
    print(f"{name}: lengths {lens}", flush=True)
    G = H // Hk
    q = torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(total, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = -F.softplus(torch.randn(Hk, total, device="cuda")).to(torch.bfloat16)
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    dout = torch.randn_like(q)
    flops = sum(2 * L * L * D * H for L in lens)  # causal: half of 4 L^2 D per head
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]

    def packed(q_, k_, v_, b_):
        return flash_sparse_attn_varlen_func(q_, k_, v_, cu, cu, max(lens), max(lens),
                                             attn_bias=b_, is_causal=True)

    def one_by_one(q_, k_, v_, b_):
        outs = [flash_sparse_attn_func(q_[s:e][None], k_[s:e][None], v_[s:e][None],
                                       attn_bias=b_[:, s:e][None, :, None], is_causal=True)[0]
                for s, e in zip(bounds, bounds[1:])]
        return torch.cat(outs)

    ours = packed(*leaves).detach()
    doc = torch.repeat_interleave(torch.arange(docs, device="cuda"),
                                  torch.tensor(lens, device="cuda"))
    check_rows(name, ours[None], q[None], k[None], v[None],
               lambda b, h, i: (doc == doc[i]) & (torch.arange(total, device="cuda") <= i),
               lambda b, h, i: bias[h // G], rows=(0, 1, bounds[1], bounds[5] + 3, -1))
    ours_grads = _grads(packed, leaves, dout)
    results = {}
    results["packed"] = _measure(table, name, "flash_sparse_attn varlen fwd+bwd",
                                 fwd_bwd(lambda: packed(*leaves), leaves, dout), reps,
                                 3.5 * flops)
    results["docs"] = _measure(
        table, name, "flash_sparse_attn per document fwd+bwd",
        fwd_bwd(lambda: one_by_one(*leaves), leaves, dout), reps, 3.5 * flops,
        check=lambda: _agree_grads(_grads(one_by_one, leaves, dout), ours_grads))
    results["packed_fwd"] = _measure(table, name, "flash_sparse_attn varlen fwd",
                                     lambda: packed(q, k, v, bias), reps, flops)
    if flex_compiled is None:
        table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
    else:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        bm = create_block_mask(mask_mod, None, None, total, total, device="cuda")
        bias_leaf = leaves[3]

        def flex(q_, k_, v_, b_):
            def score_mod(score, b, h, qi, ki):
                return score + b_[h // G, ki].float()
            return flex_compiled(q_.transpose(0, 1)[None], k_.transpose(0, 1)[None],
                                 v_.transpose(0, 1)[None], score_mod=score_mod, block_mask=bm,
                                 enable_gqa=True)[0].transpose(0, 1)

        results["flex"] = _measure(
            table, name, "FlexAttention (document mask + bias) fwd+bwd",
            fwd_bwd(lambda: flex(*leaves), leaves, dout), reps, 3.5 * flops,
            check=lambda: _agree_grads(_grads(flex, leaves, dout), ours_grads))
        del bias_leaf
    packed_ms, docs_ms, flex_ms = (results.get(x) for x in ("packed", "docs", "flex"))
    if packed_ms and docs_ms:
        table.add(name, "ratio fwd+bwd: varlen / per document", note=f"{packed_ms / docs_ms:.3f}"
                  f"  [#15 <= 1.15: {'met' if packed_ms / docs_ms <= 1.15 else 'NOT met'}]",
                  ratio=packed_ms / docs_ms)
    if packed_ms and flex_ms:
        table.add(name, "ratio fwd+bwd: FlexAttention / varlen", note=f"{flex_ms / packed_ms:.3f}"
                  f"  [#15 >= 1.5: {'met' if flex_ms / packed_ms >= 1.5 else 'NOT met'}]",
                  ratio=flex_ms / packed_ms)


_causal = {}


def causal_additive(S):
    """(S, S) bf16: 0 on and below the diagonal, -inf above (the causal mask as a float mask)."""
    if S not in _causal:
        _causal[S] = torch.full((S, S), -math.inf, device="cuda",
                                dtype=torch.bfloat16).triu(1)
    return _causal[S]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="dense,trainable,decode")
    ap.add_argument("--topk-cases", default=",".join(TOPK_CASES),
                    help="the topk group's cases, of: " + ", ".join(TOPK_CASES))
    args = ap.parse_args()
    cases = args.topk_cases.split(",")
    unknown = [c for c in cases if c not in TOPK_CASES]
    if unknown:
        ap.error(f"--topk-cases: unknown {', '.join(unknown)}; known: {', '.join(TOPK_CASES)}")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, "
          f"flash_sparse_attn {flash_sparse_attn.__version__}, {time.strftime('%Y-%m-%d')}")
    table = Table()
    runs = {"dense": dense_causal, "trainable": trainable_mask, "decode": decode,
            "bias": broadcast_bias, "topk": lambda table, reps: topk(table, reps, cases),
            "varlen": varlen, "kvcache": kvcache_lengths,
            "dense256": lambda table, reps: dense_causal(table, reps, B=1, S=16384, H=16, D=256)}
    for key in args.only.split(","):
        runs[key](table, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "rows": table.rows}, f, indent=1)


if __name__ == "__main__":
    main()
