#!/usr/bin/env python3
"""The comparison sweep: flash_sparse_attn next to its peers, in one process on one card.

Peers: PyTorch SDPA (flash and cuDNN backends on dense workloads; the memory-efficient and cuDNN
backends with the equivalent materialized float mask where the mask matters: that is the "dense
attention with a float mask" users have today) and FlexAttention (compiled; BlockMask built from
block lists with BlockMask.from_kv_blocks, never by evaluating a mask over Sq x Sk; a bias
score_mod whose captured bias receives its gradient).

Workload groups (--only; the first four are the default):
  dense      causal and non-causal, D in {64, 128, 256}, S in {4K, 16K} (B = 32K tokens / S, H = 16)
  trainable  (1, S, 32, 8, 128), bias (B, Hk, 1, S), causal; per (batch, kv head, 128-query block)
             the diagonal block plus the top earlier 128-key blocks by mean bias, as many as give
             the target density (5-50% of S x S); S in {4K, 16K, 64K}
  reference  the reference project's published configuration: (1, S, 2, 1, 64), causal, a per-key
             bias, each query keeps its top-1024 causal keys by that bias (its "window 1024");
             S in 256 .. 32K
  decode     Sq = 1, Sk in 4K .. 512K, (1, 1, Sk, 32, 8, 128), a key mask keeping 1/8 of the
             128-key blocks (forward only: inference)
  dense256   issue #14's bar shape: dense causal (1, 16384, 16, 16, 256), measured as the dense
             group measures
  selection_bars
             issue #14's block-selection bars: the trainable group's workload at the issue's
             densities, 6.4%, 12% and 22% at S = 16K and 6.2% at S = 32K (ours and Flex)
  softcap    dense attention with softcap 30 and a per-key bias (B, Hk, 1, S), causal and not,
             (2, 16384, 16, 16, 128): ours and Flex (a score_mod capping, then adding the bias;
             SDPA has no softcap)
The workload groups below measure a workload whole (their implementations share inputs, checks
and ratios; --impls does not apply to them, --filter matches their workload keys):
  bias       forward + backward with a full (S, S) bias requiring grad, broadcast over batch
             and/or heads, (2, 4096, 16, 16, 128) causal: its gradient sums the dS of several
             (b, h). Ours by default (fp32 atomics) and with deterministic=True (one ordered dQ
             launch per (b, h) sharing a bias slice), whose bias gradients must agree; SDPA
             memory-efficient (float mask) and FlexAttention, their bias gradients checked
             against ours.
  topk       issues #11 and #12: the reference's workflow, a per-key bias (B, Hk, 1, S) whose
             top-`keep` keys are kept, causal, forward and forward + backward with the bias
             gradient (--topk-cases picks the cases). Two forms: the key mask (the global
             top-`keep` keys per (batch, kv head), what the transformers integration builds for
             Doge) and the per-row form (each row's top-`keep` causal keys: create_mask with a
             causal 4-D mask, a (B, Hk, S, S) bool tensor). Rows: ours with the mask precomputed,
             ours with the selection inside the call (`topk=` / `topk_causal=True` where this
             build has them, else create_mask inside the timed region, as the row says),
             FlexAttention over the gathered keys (flex_gather: the floor a user writes in
             torch) and the reference project's Triton kernel on the same mask; then the ratios
             the issues set bars on. Each shape's dense causal baselines (ours, SDPA cuDNN and
             flash) are a workload of their own, topk/dense/<shape>, listed before the first case
             of that shape: a case's ratios read them from --json. The memory case: the peak
             memory of the per-row forward + backward against dense causal (CUDA only).
  varlen     issue #15's packed training batch: 16 documents of random lengths in 64K tokens,
             causal, a per-key bias with its gradient; one packed call against the documents one
             by one and against FlexAttention with a document mask.
  kvcache    a decode step over caches with per-sequence lengths (cache_seqlens in the kernels,
             one plan for every step; the same step captured in a CUDA graph and replayed, CUDA
             only) against the lengths written into the mask and SDPA over every cache key, 8
             calls back to back.
  decode_bars  issue #15's decode bars: one query per head over 32K and 512K keys, a key mask
             keeping 1/8 of the 128-key blocks, batches 1, 8 and 64; ours one call between the
             events and 8 back to back, ours over a paged cache (pages of 64; must equal the
             contiguous call bitwise) one call and 8 back to back, one CUDA graph replay of the
             kvcache entry point contiguous and paged (CUDA only), the kernels' time alone of the
             contiguous and the paged call (torch profiler, CUDA only), SDPA flash over all
             keys, FlexAttention at batch 1, and the device's copy bandwidth (2 GiB, read +
             write), measured once per run.
The topk group's reference kernel is never committed: scripts/fetch_reference.sh puts it into
.peers/ (carry .peers to the GPU machine, which has no network); without it, or off CUDA, its rows
say "unavailable".

For each (workload, implementation) entry of the first five groups: the output is checked
against ours (ours against float64 on sampled rows) before anything is timed; then forward,
backward (alone, through a retained graph), forward+backward, and peak memory beyond what existed
before the call. The workload groups check what their description says, ours against float64
first, before timing. Times are CUDA-event medians after warmup, with L2 flushed before every rep,
outside the timed region: a 256 MiB buffer zeroed, then read (--flush clean, the default). Zeroing
alone (--flush zero, what runs before 2026-12-03 did) leaves L2 full of dirty lines whose
write-back then lands in the timed call: 6 us of a 77 us decode forward on an H200 (docs/perf.md,
twentieth session); the read writes them back before the timer starts and leaves clean lines.
A peer that errors, runs out of memory, or does not support a case is a row saying so, never
dropped. Flex compile time (the first call) is recorded apart from the medians.

Results go to --json after every entry (an interrupted run keeps what it finished); --resume skips
entries already in that file. A workload of the workload groups is written when it is done, and
--resume skips it when the file has any row of it (one cut off halfway has none and runs again,
whole). Its format, "fsa-sweep/1" (read by bench/report.py):
  {"format": "fsa-sweep/1",
   "meta": {device, torch, cuda, triton, flash_sparse_attn, git, python, date, command, dtype,
            reps, warmup, flush_mb, flush, quick, smoke, "runs": [the same, one per invocation]},
   "rows": [{"key": "<workload>|<impl>", "workload", "group", "spec": {shape, causal, target
             density, ...; workload groups: "title", the workload in words}, "impl", "label",
             "density" (kept fraction of Sq x Sk), "flops" (forward, kept entries), "bytes_moved"
             (decode: kept K+V; the SDPA all-keys rows of kvcache and decode_bars: all K+V; the
             device copy row: read + written), "fwd_ms", "bwd_ms", "fwdbwd_ms",
             "peak_fwd_mb", "peak_fwdbwd_mb", "aux_mb" (masks / lists built for that impl),
             "first_call_s", "first_train_s" (first calls: Flex compiles there), "reps_*",
             "max_diff_vs_fp64" (ours) or "max_diff_vs_ours", "grad_rel_diff_vs_ours",
             "fail": {measure: "oom" | "unsupported" | "unavailable" | "error" | "wrong" | "n/a"},
             "notes": [messages],
             "density_independent" (masked SDPA rows of the trainable group),
             workload groups only:
             "extra": {copy_share (GB/s of kept K+V over the device copy's), gbps_copy,
                       paged_ratio (paged / contiguous through the kvcache entry point:
                       one call, back to back, graph replay), paged_kernel_ratio
                       (paged / contiguous, kernels only), lengths_speedup (lengths as a
                       mask / cache_seqlens), graph_speedup (cache_seqlens eager / CUDA graph replay), ours_ratio
                       (ours / SDPA over all keys)},
             "ratio" and "bars": [{"issue", "op", "bar", "met"}] (the ratio rows, impl
             "ratio:..."); fail "check": a call timed although its check failed (a paged call
             not bitwise equal to the contiguous one, a graph replay not bitwise equal to the
             eager call, lengths as a mask that differ from cache_seqlens, a peer's wrong bias
             gradient); fail "workload": a workload stopped
             before its end, in a row of its own (impl "workload", the reason in its notes)}]}
A measure missing from a row is in its "fail" map, or was not taken (decode: forward only).

    python3 bench/sweep.py --json sweep.json [--only dense,trainable,reference,decode] [--quick]
                           [--resume] [--reps 10] [--impls ours,flex,...] [--filter REGEX]
    python3 bench/sweep.py --json out.json --only topk --topk-cases key16k,row16k
    python3 bench/sweep.py --smoke --json /tmp/s.json     # tiny shapes, any device (CPU works)

This script must not import matplotlib (the GPU machine may lack it): plots are bench/report.py's.
"""

import argparse
import collections
import datetime
import functools
import gc
import importlib.util
import json
import math
import operator
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import zlib

import torch
import torch.nn.functional as F

import flash_sparse_attn
from flash_sparse_attn import flash_sparse_attn_func, flash_sparse_attn_varlen_func
from flash_sparse_attn.flash_sparse_attn_interface import clear_plan_cache
from flash_sparse_attn.utils.mask import create_mask

FORMAT = "fsa-sweep/1"
GROUPS = ("dense", "trainable", "reference", "decode")      # the default --only
# Groups measured a workload at a time (see the module docstring), each by its *_workload function.
WORKLOAD_GROUPS = ("bias", "topk", "varlen", "kvcache", "decode_bars")
ALL_GROUPS = GROUPS + ("dense256", "selection_bars", "softcap") + WORKLOAD_GROUPS
DENSE_GROUPS = ("dense", "dense256", "softcap")  # every key of the mask kept (causality aside)
SOFTCAP = 30.0  # the softcap group's cap
BLOCK = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Implementation ids -> labels shown in tables and plots.
IMPLS = {
    "ours": "flash_sparse_attn",
    "sdpa_flash": "SDPA flash",
    "sdpa_cudnn": "SDPA cuDNN",
    "sdpa_flash_dense": "SDPA flash, all keys (not equivalent)",
    "sdpa_eff_mask": "SDPA mem-efficient + mask",
    "sdpa_cudnn_mask": "SDPA cuDNN + mask",
    "sdpa_math_mask": "SDPA math + mask",
    "flex": "FlexAttention",
}

# ------------------------------------------------------------------------------------------------
# Workload enumeration (no tensors: cheap, so the progress bar knows the total up front)


def dense_specs(quick, smoke):
    if smoke:
        return [dict(group="dense", causal=c, B=1, S=256, H=2, Hk=2, D=64) for c in (True, False)]
    dims = (128,) if quick else (64, 128, 256)
    out = []
    for causal in (True, False):
        for D in dims:
            for S in (4096, 16384):
                out.append(dict(group="dense", causal=causal, B=32768 // S, S=S, H=16, Hk=16, D=D))
    return out


def dense256_specs(quick, smoke):
    if smoke:
        return [dict(group="dense256", causal=True, B=1, S=256, H=2, Hk=2, D=256)]
    return [dict(group="dense256", causal=True, B=1, S=16384, H=16, Hk=16, D=256)]


def softcap_specs(quick, smoke):
    shape = dict(B=1, S=256, H=2, Hk=2, D=64) if smoke else dict(B=2, S=16384, H=16, Hk=16, D=128)
    return [dict(group="softcap", causal=c, softcap=SOFTCAP, **shape) for c in (True, False)]


def trainable_shape(smoke):
    """(B, H, Hk, D) of the trainable workloads: the trainable and selection_bars groups'."""
    return dict(B=1, H=4, Hk=2, D=64) if smoke else dict(B=1, H=32, Hk=8, D=128)


def trainable_specs(quick, smoke):
    if smoke:
        seqs, dens = (512,), (0.2, 0.5)
    else:
        seqs = (4096, 16384) if quick else (4096, 16384, 65536)
        dens = (0.05, 0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.3, 0.5)
    # The masked-SDPA peers cost the same at every density (they compute every entry): they are
    # run once per S, on the workload of this density, and marked density_independent.
    mask_density = 0.2 if smoke else 0.1
    return [dict(group="trainable", S=S, target=d, causal=True, with_mask_peers=(d == mask_density),
                 **trainable_shape(smoke)) for S in seqs for d in dens]


def selection_bars_specs(quick, smoke):
    """Issue #14's block-selection workloads: trainable specs at the issue's densities."""
    cases = (((512, 0.22),) if smoke else
             ((16384, 0.064), (16384, 0.12), (16384, 0.22), (32768, 0.062)))
    return [dict(group="trainable", S=S, target=d, causal=True, with_mask_peers=False,
                 **trainable_shape(smoke)) for S, d in cases]


def reference_specs(quick, smoke):
    if smoke:
        return [dict(group="reference", S=S, window=64, causal=True, B=1, H=2, Hk=1, D=64)
                for S in (256, 512)]
    seqs = (1024, 4096, 16384, 32768) if quick else tuple(256 << i for i in range(8))
    return [dict(group="reference", S=S, window=1024, causal=True, B=1, H=2, Hk=1, D=64)
            for S in seqs]


def decode_specs(quick, smoke):
    if smoke:
        return [dict(group="decode", Sk=Sk, keep_every=2, B=1, H=4, Hk=2, D=64, causal=True)
                for Sk in (1024, 2048)]
    sks = (4096, 65536, 524288) if quick else (4096, 16384, 65536, 131072, 262144, 524288)
    return [dict(group="decode", Sk=Sk, keep_every=8, B=1, H=32, Hk=8, D=128, causal=True)
            for Sk in sks]


def impls_for(spec, device):
    g = spec["group"]
    cpu_math = ["sdpa_math_mask"] if device == "cpu" else []
    if g == "softcap":  # (SDPA has no softcap)
        return ["ours", "flex"]
    if g in DENSE_GROUPS:
        return ["ours", "sdpa_flash", "sdpa_cudnn", "flex"]
    if g == "trainable":
        extra = ["sdpa_eff_mask", "sdpa_cudnn_mask"] + cpu_math if spec["with_mask_peers"] else []
        return ["ours", "flex"] + extra
    if g == "reference":
        return ["ours", "sdpa_eff_mask", "sdpa_cudnn_mask"] + cpu_math + ["flex"]
    return ["ours", "sdpa_flash_dense", "sdpa_eff_mask"] + cpu_math + ["flex"]


def workload_key(spec):
    g = spec["group"]
    if g == "dense":
        return f"dense/{'causal' if spec['causal'] else 'full'}/D{spec['D']}/S{spec['S']}"
    if g == "dense256":
        return f"dense256/causal/B{spec['B']}/S{spec['S']}"
    if g == "softcap":
        return (f"softcap/{'causal' if spec['causal'] else 'full'}/D{spec['D']}/S{spec['S']}"
                f"/c{spec['softcap']:g}")
    if g == "trainable":
        return f"trainable/S{spec['S']}/d{round(spec['target'] * 100, 1):g}"
    if g == "reference":
        return f"reference/S{spec['S']}/w{spec['window']}"
    if g == "decode":
        return f"decode/Sk{spec['Sk']}/keep1of{spec['keep_every']}"
    return spec["key"]                                              # workload groups


def enumerate_entries(groups, quick, smoke, device, impl_filter, key_filter, topk_cases=None):
    """[(spec, workload key, implementation ids)] in run order. A workload of a workload group has
    None for its implementations (it runs whole) and is kept when key_filter matches its key."""
    makers = {"dense": dense_specs, "dense256": dense256_specs, "trainable": trainable_specs,
              "selection_bars": selection_bars_specs, "softcap": softcap_specs,
              "reference": reference_specs, "decode": decode_specs, "bias": bias_specs,
              "topk": functools.partial(topk_specs, cases=topk_cases or tuple(TOPK_CASES)),
              "varlen": varlen_specs, "kvcache": kvcache_specs, "decode_bars": decode_bars_specs}
    out = []
    for g in groups:
        for spec in makers[g](quick, smoke):
            wkey = workload_key(spec)
            if g in WORKLOAD_GROUPS:
                if key_filter is None or key_filter.search(wkey):
                    out.append((spec, wkey, None))
                continue
            impls = [i for i in impls_for(spec, device) if impl_filter is None or i in impl_filter]
            impls = [i for i in impls if key_filter is None or key_filter.search(f"{wkey}|{i}")]
            if impls:
                out.append((spec, wkey, impls))
    return out


# ------------------------------------------------------------------------------------------------
# Problems: tensors of one workload, shared by all its implementations


def causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


class Problem:
    """Inputs of one workload plus what each peer needs to compute the same thing.

    q (B, Sq, H, D), k / v (B, Sk, Hk, D), optional bias (B, Hk, 1, Sk). keep_row(b, h, i) is the
    (Sk,) bool row of kept keys (mask AND causality), used for the float64 check of ours and for
    the peers' materialized masks. blocks() gives (full, partial) 128x128 block maps of shape
    (B, Hx, nq, nk) for FlexAttention's lists."""

    def __init__(self, spec, device, dtype):
        self.spec = spec
        self.device = device
        self.dtype = dtype
        g = spec["group"]
        B, H, Hk, D = spec["B"], spec["H"], spec["Hk"], spec["D"]
        self.G = H // Hk
        self.Sq = 1 if g == "decode" else spec["S"]
        self.Sk = spec["Sk"] if g == "decode" else spec["S"]
        self.causal = spec["causal"]
        self.softcap = spec.get("softcap", 0.0)  # 0: none
        # Drawn on the device (a 512K-key K on the host would take seconds per tensor).
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(workload_key(spec).encode()))

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device).to(dtype)

        self.q = randn(B, self.Sq, H, D)
        self.k = randn(B, self.Sk, Hk, D)
        self.v = randn(B, self.Sk, Hk, D)
        self.dout = randn(B, self.Sq, H, D)
        self.bias = None
        self.mask = None          # our attn_mask (bool), if any
        self.sel = None           # our block_mask (B, Hk, nq, nk), if any
        # Dense and trainable share one mask_mod whether causal or not (a non-causal BlockMask
        # has no partial blocks, so it is never called): one compiled Flex graph per shape.
        self.mask_mod = causal_mod
        self.backward = g != "decode"
        self.density = None
        self.bytes_moved = None
        nq, nk = -(-self.Sq // BLOCK), -(-self.Sk // BLOCK)
        if g in DENSE_GROUPS:
            kept = self.Sq * (self.Sq + 1) / 2 if self.causal else self.Sq * self.Sk
            if g == "softcap":
                self.bias = (-F.softplus(torch.randn(B, Hk, 1, self.Sk, generator=gen,
                                                     device=device))).to(dtype)
        elif g == "trainable":
            self.bias = (-F.softplus(torch.randn(B, Hk, 1, self.Sk, generator=gen,
                                                 device=device))).to(dtype)
            self.sel = self._select_blocks(spec["target"], nq)
            diag = self.sel.diagonal(dim1=-2, dim2=-1).sum().item()
            kept = (self.sel.sum().item() * BLOCK * BLOCK - diag * BLOCK * (BLOCK - 1) / 2) / (B * Hk)
        elif g == "reference":
            self.bias = (-F.softplus(torch.randn(B, Hk, 1, self.Sk, generator=gen,
                                                 device=device))).to(dtype)
            self.mask = self._topk_causal_mask(spec["window"])
            kept = self.mask.sum().item() / (B * Hk)
        else:
            keep_blocks = (torch.arange(nk, device=device) % spec["keep_every"]) == 0
            self.key_keep = keep_blocks.repeat_interleave(BLOCK)[: self.Sk]
            self.mask = self.key_keep.view(1, 1, 1, self.Sk)
            n_keys = self.key_keep.sum().item()
            kept = n_keys * self.Sq
            self.bytes_moved = 2 * n_keys * Hk * D * B * self.q.element_size()
        self.density = kept / (self.Sq * self.Sk)
        self.flops = 4.0 * B * H * D * kept           # forward; backward counts 2.5x, fwd+bwd 3.5x
        self._ours_out = self._ours_grads = None
        self._ours_grads_error = None

    # -- masks ---------------------------------------------------------------------------------
    def _select_blocks(self, target, nb):
        """Diagonal block + the `top` earlier blocks with the largest mean bias, per (b, kv head,
        query block); `top` chosen so that the kept fraction of S x S is closest to `target`."""
        B, Hk = self.bias.shape[:2]
        S = self.Sk

        def density(top):
            earlier = sum(min(r, top) for r in range(nb))
            return (earlier * BLOCK * BLOCK + nb * BLOCK * (BLOCK + 1) / 2) / (S * S)

        top = min(range(nb + 1), key=lambda t: abs(density(t) - target))
        mean = self.bias.float().view(B, Hk, nb, BLOCK).mean(-1)              # (B, Hk, nb)
        earlier = torch.ones(nb, nb, device=self.device, dtype=torch.bool).tril(-1)
        scores = mean[:, :, None, :].expand(B, Hk, nb, nb).masked_fill(~earlier, -math.inf)
        sel = torch.zeros(B, Hk, nb, nb, device=self.device, dtype=torch.bool)
        if top > 0:
            idx = scores.topk(top, dim=-1).indices
            sel.scatter_(-1, idx, torch.gather(scores, -1, idx) > -math.inf)
        sel |= torch.eye(nb, device=self.device, dtype=torch.bool)
        return sel

    def _topk_causal_mask(self, window):
        """(B, Hk, S, S) bool: row i keeps its `window` causal keys with the largest bias (ties at
        the threshold kept), as the reference's benchmark builds its dynamic mask. Built in row
        chunks with torch.topk; not timed (the reference does not time it either)."""
        B, Hk = self.bias.shape[:2]
        S = self.Sk
        b = self.bias.float()[:, :, 0, :]                                     # (B, Hk, S)
        mask = torch.zeros(B, Hk, S, S, device=self.device, dtype=torch.bool)
        j = torch.arange(S, device=self.device)
        chunk = max(1, (1 << 26) // max(1, B * Hk * S))
        for i0 in range(0, S, chunk):
            i = torch.arange(i0, min(S, i0 + chunk), device=self.device)
            causal = j[None, :] <= i[:, None]                                  # (c, S)
            s = b[:, :, None, :].masked_fill(~causal, -math.inf)               # (B, Hk, c, S)
            kth = s.topk(min(window, S), dim=-1).values[..., -1:]              # (B, Hk, c, 1)
            mask[:, :, i0:i0 + len(i)] = causal & (s >= kth)
        return mask

    def keep_row(self, b, h, i):
        """(Sk,) bool: keys that query row i of head h keeps."""
        j = torch.arange(self.Sk, device=self.device)
        keep = torch.ones(self.Sk, dtype=torch.bool, device=self.device)
        if self.causal:
            keep &= j <= i + self.Sk - self.Sq
        if self.sel is not None:
            keep &= self.sel[b, h // self.G, i // BLOCK].repeat_interleave(BLOCK)[: self.Sk]
        if self.mask is not None:
            m = self.mask[min(b, self.mask.shape[0] - 1)]
            m = m[min(h // self.G, m.shape[0] - 1)]
            keep &= m[min(i, m.shape[0] - 1)]
        return keep

    def keep_dense(self):
        """(B, Hk or 1, Sq, Sk) bool keep matrix (materialized: for the masked SDPA peers)."""
        B, Hk = self.q.shape[0], self.k.shape[2]
        ii = torch.arange(self.Sq, device=self.device)[:, None]
        jj = torch.arange(self.Sk, device=self.device)[None, :]
        keep = torch.ones(self.Sq, self.Sk, dtype=torch.bool, device=self.device)
        if self.causal:
            keep = jj <= ii + self.Sk - self.Sq
        keep = keep[None, None]
        if self.sel is not None:
            sel = self.sel.repeat_interleave(BLOCK, 2)[:, :, : self.Sq]
            keep = keep & sel.repeat_interleave(BLOCK, 3)[..., : self.Sk]
        if self.mask is not None:
            keep = keep & self.mask
        return keep

    def blocks(self):
        """(full, partial) block maps (B, Hx, nq, nk) bool for FlexAttention's lists."""
        g = self.spec["group"]
        nq, nk = -(-self.Sq // BLOCK), -(-self.Sk // BLOCK)
        dev = self.device
        if g in DENSE_GROUPS:
            if not self.causal:
                return (torch.ones(1, 1, nq, nk, dtype=torch.bool, device=dev),
                        torch.zeros(1, 1, nq, nk, dtype=torch.bool, device=dev))
            eye = torch.eye(nq, nk, dtype=torch.bool, device=dev)
            return (torch.ones(nq, nk, dtype=torch.bool, device=dev).tril(-1)[None, None],
                    eye[None, None])
        if g == "trainable":
            eye = torch.eye(nq, nk, dtype=torch.bool, device=dev)[None, None]
            return self.sel & ~eye, self.sel & eye
        if g == "decode":
            kb = (torch.arange(nk, device=dev) % self.spec["keep_every"]) == 0
            return kb.view(1, 1, 1, nk), torch.zeros(1, 1, 1, nk, dtype=torch.bool, device=dev)
        # reference: count kept entries per block of the element mask, a few block rows at a time
        B, Hm = self.mask.shape[:2]
        full = torch.zeros(B, Hm, nq, nk, dtype=torch.bool, device=dev)
        part = torch.zeros_like(full)
        for r0 in range(0, nq, 8):
            r1 = min(nq, r0 + 8)
            m = self.mask[:, :, r0 * BLOCK:r1 * BLOCK].view(B, Hm, r1 - r0, BLOCK, nk, BLOCK)
            cnt = m.sum(dim=(3, 5), dtype=torch.int32)
            full[:, :, r0:r1] = cnt == BLOCK * BLOCK
            part[:, :, r0:r1] = (cnt > 0) & (cnt < BLOCK * BLOCK)
        return full, part

    # -- ours, the reference of the peers --------------------------------------------------------
    def ours(self, q, k, v, bias):
        kw = {}
        if self.sel is not None:
            kw = dict(block_mask=self.sel, block_size=BLOCK)
        return flash_sparse_attn_func(q, k, v, attn_mask=self.mask, attn_bias=bias,
                                      is_causal=self.causal, softcap=self.softcap or None, **kw)

    def leaves(self):
        ts = [self.q, self.k, self.v] + ([self.bias] if self.bias is not None else [])
        return [t.detach().clone().requires_grad_(True) for t in ts]

    def ours_out(self):
        if self._ours_out is None:
            with torch.no_grad():
                self._ours_out = self.ours(self.q, self.k, self.v, self.bias)
        return self._ours_out

    def ours_grads(self):
        """Our gradients (q, k, v[, bias]) or None when our backward fails here (the reason is in
        _ours_grads_error)."""
        if self._ours_grads is None and self._ours_grads_error is None:
            try:
                leaves = self.leaves()
                self.ours(*leaves[:3], leaves[3] if len(leaves) > 3 else None).backward(self.dout)
                self._ours_grads = [t.grad for t in leaves]
            except Exception as e:  # noqa: BLE001
                self._ours_grads_error = f"{type(e).__name__}: {e}"
        return self._ours_grads

    def check_ours(self, out):
        """Max |ours - float64| over sampled query rows of every (batch, head)."""
        bias_row = None
        if self.bias is not None:
            bias_row = lambda b, h, i: self.bias[b, h // self.G, 0]  # noqa: E731
        return fp64_row_error(out, self.q, self.k, self.v, self.keep_row, bias_row,
                              softcap=self.softcap)


def fp64_row_error(out, q, k, v, keep_row, bias_row=None, rows=(0, 1, 127, 128, -1),
                   softcap=0.0):
    """Max |out - float64 attention| over the sampled query rows `rows` (modulo Sq) of every
    (batch, head). keep_row(b, h, i) is the (Sk,) bool row of keys query i of head h keeps;
    bias_row(b, h, i), if given, the (Sk,) bias added to its scores (after the cap `softcap`,
    if not 0: SPEC's c tanh(scale x / c) + bias). q (B, Sq, H, D), k / v (B, Sk, Hk, D); a row
    that keeps no key must be 0."""
    B, Sq, H, D = q.shape
    G = H // k.shape[2]
    worst = 0.0
    scale = 1.0 / math.sqrt(D)
    for b in range(B):
        for i in sorted({r % Sq for r in rows}):
            for h in range(H):
                keep = keep_row(b, h, i)
                kk = k[b, :, h // G].double()[keep]
                vv = v[b, :, h // G].double()[keep]
                s = kk @ q[b, i, h].double() * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                if bias_row is not None:
                    s = s + bias_row(b, h, i).double()[keep]
                ref = (torch.softmax(s, 0) @ vv if kk.shape[0]
                       else torch.zeros(D, dtype=torch.float64, device=q.device))
                worst = max(worst, (out[b, i, h].double() - ref).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------------------
# Implementations: each gives fwd() (no autograd) and train(leaves) -> output with a graph


class Unsupported(Exception):
    """This implementation does not support this case (reported as 'unsupported')."""


class Unavailable(Exception):
    """This implementation or measure is not available here: not installed, or needs CUDA
    (reported as 'unavailable')."""


def _sdpa(q, k, v, backend, **kw):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return _sdpa_call(q, k, v, **kw)


def _sdpa_call(q, k, v, **kw):
    """SDPA on (B, S, H, D) tensors under whatever backend selection the caller has entered."""
    if q.shape[2] != k.shape[2]:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)


_FLEX = {}


def flex_fn():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo
        # One compiled graph per distinct shape: the sweep has a few dozen; never fall back to
        # eager silently because a cache filled up.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4096)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _lists(m):
    """(B, H, nq, nk) bool -> (num (B, H, nq) int32, indices (B, H, nq, nk) int32, kept first)."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


class Impl:
    def __init__(self, fwd, train=None, aux_bytes=0, tol=2e-2, checked=True):
        self.fwd, self.train, self.aux_bytes, self.tol = fwd, train, aux_bytes, tol
        self.checked = checked
        self.release = None


def make_impl(name, p):
    B, Sq, H, D = p.q.shape
    tol = 3e-2 if p.bias is not None else 2e-2
    if name == "ours":
        return Impl(lambda: p.ours(p.q, p.k, p.v, p.bias),
                    lambda L: p.ours(*L[:3], L[3] if len(L) > 3 else None), tol=tol)
    from torch.nn.attention import SDPBackend
    if name in ("sdpa_flash", "sdpa_cudnn", "sdpa_flash_dense"):
        backend = (SDPBackend.CUDNN_ATTENTION if name == "sdpa_cudnn"
                   else SDPBackend.FLASH_ATTENTION)
        kw = dict(is_causal=p.causal and p.Sq == p.Sk)
        return Impl(lambda: _sdpa(p.q, p.k, p.v, backend, **kw),
                    lambda L: _sdpa(*L[:3], backend, **kw), tol=tol,
                    checked=name != "sdpa_flash_dense")
    if name in ("sdpa_eff_mask", "sdpa_cudnn_mask", "sdpa_math_mask"):
        backend = {"sdpa_eff_mask": SDPBackend.EFFICIENT_ATTENTION,
                   "sdpa_cudnn_mask": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_math_mask": SDPBackend.MATH}[name]
        keep = p.keep_dense()                                    # (B, Hk|1, Sq, Sk) bool
        Hm = keep.shape[1]

        def float_mask(bias):
            """The float mask users build today: bias where kept, -inf elsewhere, one (Sq, Sk)
            plane per query head (per-kv-head masks cannot broadcast over GQA groups)."""
            if bias is None:
                return keep
            m = torch.where(keep, bias, torch.tensor(-math.inf, dtype=bias.dtype,
                                                      device=bias.device))
            if Hm not in (1, H):
                m = m[:, :, None].expand(B, Hm, H // Hm, Sq, p.Sk).reshape(B, H, Sq, p.Sk)
            return m

        def heads(t):
            # K/V repeated to H heads, as users of masked dense attention do (repeat_kv): the
            # memory-efficient backend takes no enable_gqa together with a mask.
            return t if p.G == 1 else t.repeat_interleave(p.G, dim=2)

        state = {"fixed": float_mask(p.bias)}
        fixed = state["fixed"]
        aux = keep.numel() * keep.element_size() + (
            fixed.numel() * fixed.element_size() if fixed is not keep else 0)
        del fixed
        impl = Impl(lambda: _sdpa(p.q, heads(p.k), heads(p.v), backend,
                                  attn_mask=state["fixed"]),
                    lambda L: _sdpa(L[0], heads(L[1]), heads(L[2]), backend,
                                    attn_mask=float_mask(L[3] if len(L) > 3 else None)),
                    aux_bytes=aux, tol=tol)
        # The forward's prebuilt mask is dropped before the training passes, which build their
        # own from the bias leaf (so that the bias gets its gradient).
        impl.release = lambda: state.pop("fixed", None)
        return impl
    if name == "flex":
        from torch.nn.attention.flex_attention import BlockMask
        fn = flex_fn()
        full, part = p.blocks()
        Hx = full.shape[1]
        if Hx != H:          # heads of the lists: per query head (the BlockMask has no GQA map)
            full = full.repeat_interleave(H // Hx, 1) if Hx > 1 else full.expand(-1, H, -1, -1)
            part = part.repeat_interleave(H // Hx, 1) if Hx > 1 else part.expand(-1, H, -1, -1)
        if full.shape[0] != B:
            full, part = full.expand(B, -1, -1, -1), part.expand(B, -1, -1, -1)
        kv_num, kv_idx = _lists(part)
        full_num, full_idx = _lists(full)
        mask_mod = p.mask_mod
        if p.spec["group"] == "reference":
            m, G = p.mask, p.G

            def mask_mod(b, h, q_idx, kv_idx):
                return m[b, h // G, q_idx, kv_idx]
        elif p.spec["group"] == "decode":
            mask_mod = None
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                      mask_mod=mask_mod, seq_lengths=(Sq, p.Sk))
        aux = sum(t.numel() * t.element_size() for t in (kv_num, kv_idx, full_num, full_idx))
        G, cap = p.G, p.softcap

        def run(q, k, v, bias):
            score_mod = None
            bk = bias[:, :, 0, :] if bias is not None else None
            if bk is not None or cap:
                def score_mod(score, b, h, q_idx, kv_idx):
                    if cap:  # (score is scaled already; SPEC caps it before the bias)
                        score = cap * torch.tanh(score / cap)
                    return score if bk is None else score + bk[b, h // G, kv_idx].float()
            return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                      block_mask=bm, enable_gqa=G > 1).transpose(1, 2)

        return Impl(lambda: run(p.q, p.k, p.v, p.bias),
                    lambda L: run(*L[:3], L[3] if len(L) > 3 else None), aux_bytes=aux, tol=tol)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# Measurement


class Timer:
    def __init__(self, device, flush_mb, flush_mode="clean"):
        self.cuda = device.startswith("cuda")
        self.flush_buf = (torch.empty(flush_mb << 20, dtype=torch.uint8, device=device)
                          if self.cuda and flush_mb > 0 else None)
        self.flush_mode = flush_mode
        if self.flush_buf is not None:
            self._flush_sink = torch.empty((), dtype=torch.int64, device=device)
        if self.cuda:
            self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def flush(self):
        """Evicts what L2 holds (queued on the current stream; nothing with flush_mb 0): the
        buffer zeroed, then (mode "clean") read, so that the zeroing's dirty lines are written back
        before the timed call rather than during it, and L2 holds clean lines of the buffer only."""
        if self.flush_buf is None:
            return
        self.flush_buf.zero_()
        if self.flush_mode == "clean":
            torch.sum(self.flush_buf.view(torch.int64), dim=0, out=self._flush_sink)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn, setup=None):
        """Wall time of one call in ms (synchronized)."""
        if setup:
            setup()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, reps, warmup, setup=None, budget_ms=4000.0, calls=1):
        """CUDA-event median of `reps` calls after `warmup`; L2 flushed before each rep, outside
        the timed region. Slow calls get fewer reps (at least 3) to keep a rep budget per
        measurement; returns (median ms, reps used). calls > 1 times that many calls back to back
        per rep and gives the time per call: what a loop whose host runs ahead of the device sees
        (one call between the events includes its host time before the first launch)."""
        first = self.once(fn, setup)
        n_warm = max(0, warmup - 1) if first < budget_ms / 10 else 0
        for _ in range(n_warm):
            if setup:
                setup()
            fn()
        reps = max(min(3, reps), min(reps, int(budget_ms / max(first, 1e-3))))
        times = []
        for _ in range(reps):
            if setup:
                setup()
            self.flush()
            if self.cuda:
                self.ev[0].record()
                for _ in range(calls):
                    fn()
                self.ev[1].record()
                self.ev[1].synchronize()
                times.append(self.ev[0].elapsed_time(self.ev[1]) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / calls)
        return statistics.median(times), reps

    def peak_mb(self, fn, setup=None):
        """Peak memory allocated during fn() beyond what was allocated before (MiB); None off
        CUDA. Whatever fn() returns is alive at the peak (outputs, gradients count)."""
        if not self.cuda:
            if setup:
                setup()
            fn()
            return None
        if setup:
            setup()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del r
        return peak / 2**20


def classify(e):
    """(label, message) for an exception: oom / unavailable / unsupported / error."""
    msg = f"{type(e).__name__}: {e}".strip()
    msg = re.sub(r"\s+", " ", msg)[:300]
    low = msg.lower()
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in low:
        return "oom", msg
    if isinstance(e, Unavailable):
        return "unavailable", msg
    if (isinstance(e, (Unsupported, NotImplementedError)) or "not supported" in low
            or "unsupported" in low or "head_dim <= 128" in low or "no available kernel" in low
            or "no viable backend" in low):
        return "unsupported", msg
    return "error", msg


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def grad_mismatch(grads, ref):
    """max over tensors of max|g - ref| / max|ref| (NaN-aware), and a short description."""
    worst, parts = 0.0, []
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref):
        if g is None:
            return math.inf, f"{name} missing"
        denom = max(r.float().abs().max().item(), 1e-6)
        e = (g.float() - r.float()).abs().max().item() / denom
        e = e if math.isfinite(e) else math.inf
        worst = max(worst, e)
        parts.append(f"{name} {e:.1e}")
    return worst, "rel. grad diff vs ours: " + ", ".join(parts)


def run_entry(p, impl_name, timer, args):
    """All measurements of one (workload, implementation); never raises."""
    row = {"impl": impl_name, "label": IMPLS[impl_name], "fail": {}, "notes": []}
    fail = row["fail"]
    measures = ["fwd", "peak_fwd"] + (["bwd", "fwdbwd", "peak_fwdbwd"] if p.backward else [])

    def fail_all(label, msg, which=None):
        for m in which or measures:
            fail.setdefault(m, label)
        row["notes"].append(msg)

    try:
        impl = make_impl(impl_name, p)
        row["aux_mb"] = impl.aux_bytes / 2**20
        # 1. correctness before timing
        t0 = time.perf_counter()
        out = impl.fwd()
        timer.sync()
        row["first_call_s"] = time.perf_counter() - t0
        if impl_name == "ours":
            err = p.check_ours(out)
            row["max_diff_vs_fp64"] = err
            if not err <= 2e-2:
                fail_all("wrong", f"ours differs from float64 by {err:.3g} on sampled rows")
                return row
        elif impl.checked:
            err = (out.float() - p.ours_out().float()).abs().max().item()
            row["max_diff_vs_ours"] = err
            if not (math.isfinite(err) and err <= impl.tol):
                fail_all("wrong", f"max|peer - ours| = {err:.3g} > {impl.tol}")
                return row
        else:
            row["notes"].append("not checked: computes different math (all keys)")
        del out
        # 2. forward
        row["fwd_ms"], row["reps_fwd"] = timer.median(impl.fwd, args.reps, args.warmup)
        row["peak_fwd_mb"] = timer.peak_mb(impl.fwd)
        if impl.release is not None:
            impl.release()
    except Exception as e:  # noqa: BLE001
        label, msg = classify(e)
        fail_all(label, msg)
        after_failure(impl_name)
        return row
    if not p.backward:
        return row
    # 3. backward: first call (compiles for Flex), gradients checked against ours
    leaves = None
    try:
        leaves = p.leaves()

        def clear():
            for t in leaves:
                t.grad = None

        def fwdbwd():
            impl.train(leaves).backward(p.dout)
            return [t.grad for t in leaves]

        clear()
        t0 = time.perf_counter()
        grads = fwdbwd()
        timer.sync()
        row["first_train_s"] = time.perf_counter() - t0
        if impl_name != "ours" and impl.checked:
            ref = p.ours_grads()
            if ref is None:
                row["notes"].append("gradients not checked (ours: "
                                    f"{classify_text(p._ours_grads_error)})")
            else:
                rel, desc = grad_mismatch(grads, ref)
                row["grad_rel_diff_vs_ours"] = rel
                if not rel <= 0.05:
                    fail_all("wrong", desc, ["bwd", "fwdbwd", "peak_fwdbwd"])
                    return row
        del grads
        row["fwdbwd_ms"], row["reps_fwdbwd"] = timer.median(fwdbwd, args.reps, args.warmup,
                                                            setup=clear)
        row["peak_fwdbwd_mb"] = timer.peak_mb(fwdbwd, setup=clear)
    except Exception as e:  # noqa: BLE001
        label, msg = classify(e)
        fail_all(label, msg, ["bwd", "fwdbwd", "peak_fwdbwd"])
        leaves = None
        after_failure(impl_name)
        return row
    if impl_name == "ours" and p._ours_grads is not None:
        # Our reference gradients must be reproducible after our timed loops.
        clear()
        impl.train(leaves).backward(p.dout)
        again = [t.grad for t in leaves]
        rel, desc = grad_mismatch(again, p._ours_grads)
        row["ours_grad_drift"] = rel
        if not rel <= 1e-2:
            row["notes"].append("ours: gradients changed between calls: " + desc)
    # 4. backward alone, through a retained graph; derived from fwd+bwd - fwd(train) if the
    # implementation cannot run its backward twice.
    try:
        clear()
        out = impl.train(leaves)
        row["bwd_ms"], row["reps_bwd"] = timer.median(
            lambda: out.backward(p.dout, retain_graph=True), args.reps, args.warmup, setup=clear)
        del out
    except Exception as e:  # noqa: BLE001
        out = None
        try:
            fwd_train, _ = timer.median(lambda: impl.train(leaves), args.reps, args.warmup)
            row["bwd_ms"] = row["fwdbwd_ms"] - fwd_train
            row["notes"].append("bwd = fwd+bwd - fwd (graph not retainable: "
                                f"{classify(e)[1][:80]})")
        except Exception as e2:  # noqa: BLE001
            label, msg = classify(e2)
            fail_all(label, msg, ["bwd"])
    leaves = None
    free_memory()
    return row


def after_failure(impl_name):
    """Frees memory; after a Flex failure also drops dynamo's state: a frame whose compilation
    raised is otherwise run eagerly from then on (eager Flex evaluates mask_mod on every entry,
    which is slow and, with lists of full blocks, not what the BlockMask says)."""
    if impl_name.startswith("flex"):
        import torch._dynamo
        torch._dynamo.reset()
    free_memory()


def classify_text(msg):
    if msg and ("head_dim <= 128" in msg or "not supported" in msg.lower()):
        return "unsupported"
    return (msg or "")[:80]


# ------------------------------------------------------------------------------------------------
# Workload groups (bias, topk, varlen, kvcache, decode_bars): a workload measured whole, its
# implementations sharing inputs, checks and ratios. Each group has a *_specs function (its
# workloads, no tensors) and a *_workload function (measures one, given a WorkloadRun).

# Flops of a measure relative to the forward's (backward 2.5x, forward + backward 3.5x).
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
MEASURE_SUFFIX = {"fwd": "", "fwdbwd": " fwd+bwd", "peak_fwdbwd": " peak fwd+bwd"}
_BAR_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


class Wrong(Exception):
    """A check failed: reported as a WRONG row, and what it guards is not timed."""


class WorkloadRun:
    """One workload of a workload group being measured: its rows, one per implementation in the
    fsa-sweep/1 row form (an implementation's forward and forward + backward in one row, as the
    entry groups have them), printed as measures arrive; the run's Timer and settings; and the
    results already in --json (a topk case reads its shape's dense baselines there)."""

    def __init__(self, spec, key, timer, args, dtype, results):
        self.spec, self.key = spec, key
        self.timer, self.reps, self.warmup = timer, args.reps, args.warmup
        self.device, self.dtype = args.device, dtype
        self.results = results
        self.rows = {}
        self.gen = torch.Generator(device=args.device).manual_seed(zlib.crc32(key.encode()))

    def randn(self, *shape):
        """Standard normal in the run's dtype, from the workload's own seeded generator."""
        return torch.randn(*shape, generator=self.gen, device=self.device).to(self.dtype)

    def row(self, impl, label=None):
        """The row of implementation `impl`, made (labelled `label`) on first use."""
        if impl not in self.rows:
            self.rows[impl] = dict(key=f"{self.key}|{impl}", workload=self.key,
                                   group=self.spec["group"], spec=self.spec, impl=impl,
                                   label=label or impl, fail={}, notes=[], extra={})
        return self.rows[impl]

    def note(self, impl, text):
        notes = self.row(impl)["notes"]
        if text and text not in notes:
            notes.append(text)

    def extra(self, impl, **values):
        """Derived numbers of a row (copy_share, paged_ratio, ...: see the module docstring)."""
        self.row(impl)["extra"].update(values)
        print(f"    ({self.rows[impl]['label']}: "
              + ", ".join(f"{k} {v:.3g}" for k, v in values.items()) + ")", flush=True)

    def wrong(self, impl, text):
        """Marks a call that was timed although its check failed (fail "check")."""
        self.row(impl)["fail"]["check"] = "wrong"
        self.note(impl, text)
        print(f"    ({self.rows[impl]['label']}: {text})", flush=True)

    def failed(self, impl, measures, kind, message, label=None):
        """Records the failure `kind` (see classify) of `measures` of a row, with its message."""
        row = self.row(impl, label)
        for m in measures:
            row["fail"].setdefault(m, kind)
        self.note(impl, message)
        for m in measures:
            print(f"  {row['label'] + MEASURE_SUFFIX.get(m, ''):48s} {kind:>11s}  {message}",
                  flush=True)

    def median(self, fn, calls=1):
        """(median ms per call, reps): the run's Timer, L2 flushed before every rep."""
        return self.timer.median(fn, self.reps, self.warmup, calls=calls)

    def back_to_back(self, fn):
        """median() of 8 calls back to back per rep: a decode loop whose host runs ahead."""
        return self.median(fn, calls=8)

    def host_only(self, fn):
        """(median ms of host time per call, reps): see host_ms."""
        return host_ms(fn, self.reps, self.timer), self.reps

    def kernels_only(self, fn):
        """(mean ms of fn's CUDA kernels per call, reps): see kernel_ms."""
        return kernel_ms(fn, self.reps, self.timer), self.reps

    def measure(self, impl, label, measure, fn, check=None, note="", timing=None, flops=None,
                bytes_moved=None):
        """Runs check(), then times fn with timing(fn) -> (ms, reps) (default: median(), one
        call between the events) as `measure` ("fwd" or "fwdbwd") of the row `impl`. check
        raises Wrong (nothing timed), or returns a note; a note starting with "WRONG" marks the
        row's check failed and the call is timed all the same. A failure of either is the
        measure's failure, never raised. flops: the forward's (the row's rate); bytes_moved: what
        one call must move (GB/s). Returns the ms, or None."""
        row = self.row(impl, label)
        if flops is not None:
            row["flops"] = flops
        if bytes_moved is not None:
            row["bytes_moved"] = bytes_moved
        try:
            checked = check() if check is not None else ""
            ms, reps = (timing or self.median)(fn)
        except Wrong as e:
            self.failed(impl, [measure], "wrong", f"WRONG: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - the row says what failed
            self.failed(impl, [measure], *classify(e))
            after_failure(impl)
            return None
        row[f"{measure}_ms"], row[f"reps_{measure}"] = ms, reps
        self.note(impl, note)
        if checked.startswith("WRONG"):
            self.wrong(impl, checked)
        else:
            self.note(impl, checked)
        rate = ""
        if row.get("flops"):
            rate = f"{row['flops'] * FLOPS_FACTOR[measure] / ms * 1e-9:8.3g} TFLOP/s"
        elif row.get("bytes_moved"):
            rate = f"{row['bytes_moved'] / ms * 1e-6:8.3g} GB/s"
        print(f"  {row['label'] + MEASURE_SUFFIX[measure]:48s} {ms:9.3f} ms {rate:16s} "
              f"{'; '.join(x for x in (note, checked) if x)}", flush=True)
        return ms

    def peak(self, impl, label, fn, note=""):
        """fn() -> MiB as the row's peak_fwdbwd_mb; a failure is the measure's. Returns MiB or
        None."""
        try:
            mb = fn()
        except Exception as e:  # noqa: BLE001
            self.failed(impl, ["peak_fwdbwd"], *classify(e), label=label)
            return None
        self.row(impl, label)["peak_fwdbwd_mb"] = mb
        self.note(impl, note)
        print(f"  {label + MEASURE_SUFFIX['peak_fwdbwd']:48s} {mb:9.0f} MiB  {note}", flush=True)
        return mb

    def check_ours(self, impl, label, out, q, k, v, keep_row, bias_row=None,
                   rows=(0, 1, 127, 128, -1)):
        """fp64_row_error of our output, kept in the row `impl`; raises Wrong above 2e-2, so that
        no peer is compared with a wrong result of ours."""
        err = fp64_row_error(out, q, k, v, keep_row, bias_row, rows)
        self.row(impl, label)["max_diff_vs_fp64"] = err
        print(f"  (flash_sparse_attn vs float64 on sampled rows: max|diff| {err:.2e})", flush=True)
        if not err <= 2e-2:
            raise Wrong(f"flash_sparse_attn differs from float64 by {err:.3g} on sampled rows")

    def recorded_ms(self, workload, impl, measure):
        """A measure of another workload, from the results file (None when not there)."""
        return self.results.ms(f"{workload}|{impl}", measure)

    def ratios(self, t, specs):
        """One row per (label, numerator, denominator, [(op, bar, issue)]): the ratio of the
        measurements t[numerator] / t[denominator] and whether it meets each bar."""
        for label, num, den, bars in specs:
            impl = "ratio:" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            a, b = t.get(num), t.get(den)
            if a is None or b is None:
                self.failed(impl, ["ratio"], "n/a", "n/a (a measurement is missing above)",
                            label=f"ratio {label}")
                continue
            r = a / b
            met = [dict(issue=issue, op=op, bar=bar, met=_BAR_OPS[op](r, bar))
                   for op, bar, issue in bars]
            verdicts = [f"{m['issue']} {m['op']} {m['bar']}: {'met' if m['met'] else 'NOT met'}"
                        for m in met]
            note = f"{r:.3g}" + (f"  [{'; '.join(verdicts)}]" if verdicts else "")
            row = self.row(impl, f"ratio {label}")
            row.update(ratio=r, bars=met)
            self.note(impl, note)
            print(f"  {row['label']:48s} {note}", flush=True)


def run_workload(w):
    """Measures the workload of w with its group's *_workload function. What stops it before its
    end (ours differs from float64, inputs out of memory, ...) becomes a "(whole workload)" row.
    Returns the workload's rows."""
    start = time.perf_counter()
    try:
        WORKLOAD_RUNNERS[w.spec["group"]](w)
    except Wrong as e:
        w.failed("workload", ["workload"], "wrong", f"WRONG: {e}", label="(whole workload)")
    except Exception as e:  # noqa: BLE001
        w.failed("workload", ["workload"], *classify(e), label="(whole workload)")
    print(f"  ({w.key}: {time.perf_counter() - start:.0f} s)", flush=True)
    return list(w.rows.values())


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def matches(fn, ours, tol):
    """A check for WorkloadRun.measure: max|fn() - ours| <= tol (finite), else Wrong."""
    def check():
        err = max_err(fn(), ours)
        if not math.isfinite(err) or err > tol:
            raise Wrong(f"max|peer - ours| = {err:.3g} > {tol}")
        return f"max|diff| {err:.2e}"
    return check


def fwd_bwd(fn, leaves, dout):
    """A closure running forward + backward of fn() with the given leaves requiring grad."""
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(dout)
    return run


def grads_of(fn, leaves, dout):
    """One forward + backward of fn(*leaves); the leaves' gradients (None where none flows)."""
    for t in leaves:
        t.grad = None
    fn(*leaves).backward(dout)
    return [None if t.grad is None else t.grad.clone() for t in leaves]


def agree(what, got, ours, tol, nan_allowed=None):
    """max|got - ours| <= tol over the finite entries of `got`, else Wrong. Non-finite entries are
    wrong, except with nan_allowed="empty rows": where ours is exactly 0 (our empty rows: the
    reference's Triton kernel has no guard for a row that keeps no key and returns NaN there), and
    with nan_allowed="anywhere" (its gradients: such a row's NaN spreads to the dK, dV and dbias of
    every key its tiles touch). Returns a note with the difference and any NaN count."""
    bad = ~torch.isfinite(got)
    note = ""
    if bad.any():
        if nan_allowed is None or (nan_allowed == "empty rows" and (ours[bad] != 0).any()):
            raise Wrong(f"{what}: {int(bad.sum())} non-finite entries")
        note = f"{what}: {int(bad.sum())} NaN ({nan_allowed});"
    err = (got.float() - ours.float()).masked_fill(bad, 0).abs().max().item()
    if not err <= tol:
        raise Wrong(f"{what}: max|peer - ours| = {err:.3g} > {tol:.3g}")
    return f"{note} {what} max|diff| {err:.2e}".strip()


def agree_grads(grads, ours, nan_allowed=None):
    """Each gradient within 3% of the largest |gradient| of ours (bf16 sums over thousands of
    rows); a gradient ours has and the peer lacks is wrong."""
    notes = []
    for what, g, o in zip(("dq", "dk", "dv", "dbias"), grads, ours):
        if o is None:
            continue
        if g is None:
            raise Wrong(f"{what}: no gradient")
        tol = 3e-2 * max(o.float().abs().max().item(), 1e-6)
        notes.append(agree(what, g, o, tol, nan_allowed))
    return "; ".join(notes)


def host_ms(fn, reps, timer, calls=20):
    """Median host time per call of fn, in ms: perf_counter over `calls` calls per rep (nothing
    waits for the device until the rep ends), `reps` reps. What a call costs the host: a one-call
    event time includes it where it outlasts the L2 flush queued before the call, and a loop of
    eager calls runs no faster."""
    for _ in range(3):
        fn()
    timer.sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / calls)
        timer.sync()
    return statistics.median(times)


def kernel_ms(fn, reps, timer):
    """Mean GPU time per call of fn's CUDA kernels, in ms (torch profiler over `reps` calls, the
    L2 flushed before each and the flush's own kernels excluded): what a call costs the device,
    without the host time that a one-call event time includes. The time is the union of the
    kernels' intervals, so kernels that overlap (a split call's combine, launched early by
    programmatic dependent launch and waiting on the forward) count once. CUDA only."""
    if not timer.cuda:
        raise Unavailable("kernels-only time needs CUDA (torch profiler, CUDA activity)")
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof):
        return [e for e in prof.events() if e.device_type.name == "CUDA"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the flush's kernels, by name
        timer.flush()
        torch.cuda.synchronize()
    flush_names = {e.name for e in kernels(prof)}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            timer.flush()
            fn()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in kernels(prof)
             if e.name not in flush_names]
    total_us, reach = 0.0, float("-inf")
    for start, end in sorted(spans):  # the length of the intervals' union
        if end > reach:
            total_us += end - max(start, reach)
            reach = end
    return total_us / reps * 1e-3


_CAUSAL_ADDITIVE = {}


def causal_additive(S, device, dtype):
    """(S, S): 0 on and below the diagonal, -inf above (the causal mask as a float mask)."""
    key = (S, str(device), dtype)
    if key not in _CAUSAL_ADDITIVE:
        _CAUSAL_ADDITIVE[key] = torch.full((S, S), -math.inf, device=device, dtype=dtype).triu(1)
    return _CAUSAL_ADDITIVE[key]


def shape_text(shape):
    return "(" + ",".join(map(str, shape)) + ")"


# ---- decode_bars: issue #15's decode bars ------------------------------------------------------

DECODE_BAR_CASES = [(1, 524288), (8, 524288), (1, 32768), (8, 32768), (64, 32768)]  # (B, Sk)


def decode_bars_specs(quick, smoke):
    cases = [(1, 2048), (2, 1024)] if smoke else DECODE_BAR_CASES
    H, Hk, D = (4, 2, 64) if smoke else (32, 8, 128)
    copy_mb, keep_every = (16 if smoke else 2048), 8
    return [dict(group="decode_bars", key=f"decode_bars/B{B}/Sk{Sk}",
                 title=f"decode fwd ({B},1,{Sk},{H},{Hk},{D}) 1/{keep_every} blocks",
                 B=B, Sk=Sk, H=H, Hk=Hk, D=D, keep_every=keep_every, block=128, page=64,
                 copy_mb=copy_mb)
            for B, Sk in cases]


_COPY = {}


def device_copy(w, size_mb):
    """(ms, reps) of copying `size_mb` MiB on the run's device (torch copy_, L2 flushed before
    every rep), measured once per run and device: the decode bars' unit, bytes read + written per
    second."""
    key = (w.device, size_mb)
    if key not in _COPY:
        x = torch.empty(size_mb << 20, dtype=torch.uint8, device=w.device)
        y = torch.empty_like(x)
        _COPY[key] = w.median(lambda: y.copy_(x))
        del x, y
    return _COPY[key]


def decode_bars_workload(w):
    """Issue #15's decode bars: one query per head over a long K / V, a key mask keeping 1/8 of
    the 128-key blocks (64 x 512K keys do not fit the card). Rows: the device copy (measured once
    per run, repeated in each workload), ours one call between the events and 8 back to back
    (host hidden), flash_sparse_attn_with_kvcache over the contiguous cache and over a paged one
    (pages of `page` keys in shuffled order, same kept bytes; each must equal the first call
    bitwise) one call and 8 back to back (the paged ratio: against the contiguous cache through
    the same entry point, whose host path differs by the table only), one CUDA graph
    replay of flash_sparse_attn_with_kvcache contiguous and paged (the host's share gone, as in a
    serving loop; each must equal the contiguous call bitwise), the kernels' time alone of the
    contiguous and the paged call, SDPA flash over all keys, the host time per eager call of ours
    and of SDPA (host_ms), and FlexAttention at batch 1. GB/s
    over the kept K + V bytes, and their share of the copy's (copy_share; a decode only reads, so
    it can pass 1)."""
    from torch.nn.attention import SDPBackend
    from flash_sparse_attn import flash_sparse_attn_with_kvcache
    s = w.spec
    B, Sk, H, Hk, D = s["B"], s["Sk"], s["H"], s["Hk"], s["D"]
    keep_every, block, page = s["keep_every"], s["block"], s["page"]
    copy_bytes = 2 * (s["copy_mb"] << 20)                        # read + written
    # (no fn: device_copy times its own copy, once per run)
    copy_ms = w.measure("device_copy", f"device copy {s['copy_mb']} MiB (torch copy_)", "fwd",
                        None, timing=lambda _: device_copy(w, s["copy_mb"]),
                        note="measured once per run; read + written bytes",
                        bytes_moved=copy_bytes)
    copy = None if copy_ms is None else copy_bytes / copy_ms * 1e-6
    q = w.randn(B, 1, H, D)
    k, v = w.randn(B, Sk, Hk, D), w.randn(B, Sk, Hk, D)
    keep_blocks = (torch.arange(Sk // block, device=w.device) % keep_every) == 0
    mask = keep_blocks.repeat_interleave(block)[None, None, None, :]  # (1, 1, 1, Sk) key-only
    kept_bytes = 2 * B * (Sk // keep_every) * Hk * D * q.element_size()

    def copy_share(impl, ms):
        if ms is not None and copy is not None:
            w.extra(impl, copy_share=kept_bytes / ms * 1e-6 / copy, gbps_copy=copy)

    run = lambda: flash_sparse_attn_func(q, k, v, attn_mask=mask, is_causal=True)  # noqa: E731
    with torch.no_grad():
        ours = run()
        w.check_ours("one_call", "flash_sparse_attn, one call", ours, q, k, v,
                     lambda b, h, i: mask[0, 0, 0], rows=(0,))
        ms1 = w.measure("one_call", None, "fwd", run, note="kept K+V bytes",
                        bytes_moved=kept_bytes)
        copy_share("one_call", ms1)
        msn = w.measure("back_to_back", "flash_sparse_attn, 8 calls back to back", "fwd", run,
                        timing=w.back_to_back, note="per call; kept K+V bytes",
                        bytes_moved=kept_bytes)
        copy_share("back_to_back", msn)
        # The same keys as pages of a cache, in shuffled order.
        kp, vp = (torch.empty(B * Sk // page, page, Hk, D, device=w.device, dtype=w.dtype)
                  for _ in range(2))
        pages = torch.randperm(B * Sk // page, device=w.device, generator=w.gen)
        page_table = pages.to(torch.int32).view(B, -1)
        kp[pages] = k.reshape(-1, page, Hk, D)
        vp[pages] = v.reshape(-1, page, Hk, D)
        paged = lambda: flash_sparse_attn_with_kvcache(  # noqa: E731
            q, kp, vp, page_table=page_table, attn_mask=mask, is_causal=True)

        def same_as_ours(fn):
            if torch.equal(fn(), ours):
                return "bitwise equal to flash_sparse_attn_func"
            return "WRONG: differs from flash_sparse_attn_func"

        # The paged call against the contiguous one through the same entry point (their host
        # paths differ by the table only; flash_sparse_attn_func's host path is another).
        contiguous = lambda: flash_sparse_attn_with_kvcache(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=True)
        msk = w.measure("kvcache_one_call", "flash_sparse_attn_with_kvcache, contiguous", "fwd",
                        contiguous, check=lambda: same_as_ours(contiguous),
                        note="kept K+V bytes", bytes_moved=kept_bytes)
        msp = w.measure("paged", f"flash_sparse_attn_with_kvcache, paged (page {page})", "fwd",
                        paged, check=lambda: same_as_ours(paged), note="kept K+V bytes",
                        bytes_moved=kept_bytes)
        if msp is not None and msk is not None:
            w.extra("paged", paged_ratio=msp / msk)
        # A decode loop (host running ahead), paged against contiguous.
        mskn = w.measure("kvcache_back_to_back", "flash_sparse_attn_with_kvcache, contiguous, "
                         "8 calls back to back", "fwd", contiguous, timing=w.back_to_back,
                         note="per call; kept K+V bytes", bytes_moved=kept_bytes)
        mspn = w.measure("paged_back_to_back", f"flash_sparse_attn_with_kvcache, paged (page "
                         f"{page}), 8 calls back to back", "fwd", paged, timing=w.back_to_back,
                         note="per call; kept K+V bytes", bytes_moved=kept_bytes)
        if mspn is not None and mskn is not None:
            w.extra("paged_back_to_back", paged_ratio=mspn / mskn)
        # One step replayed from a CUDA graph (the host's share gone, as in a serving loop), the
        # same entry point contiguous and paged: one replay between the events.
        ms_graph = {}
        for impl, what, fn in (("graph_contiguous", "contiguous", contiguous),
                               ("graph_paged", f"paged (page {page})", paged)):
            label = f"flash_sparse_attn_with_kvcache, {what}, CUDA graph replay"
            try:
                graph, captured = cuda_graph(fn, w.timer.cuda)
            except Exception as e:  # noqa: BLE001
                w.failed(impl, ["fwd"], *classify(e), label=label)
                continue

            def replay_bitwise(graph=graph, captured=captured):
                graph.replay()
                if torch.equal(captured, ours):
                    return "bitwise equal to the eager contiguous call"
                return "WRONG: differs from the eager contiguous call"

            ms_graph[impl] = w.measure(impl, label, "fwd", graph.replay, check=replay_bitwise,
                                       note="one replay; kept K+V bytes", bytes_moved=kept_bytes)
            copy_share(impl, ms_graph[impl])
            del graph
        if ms_graph.get("graph_contiguous") and ms_graph.get("graph_paged"):
            w.extra("graph_paged",
                    paged_ratio=ms_graph["graph_paged"] / ms_graph["graph_contiguous"])
        # The device's share alone (host time excluded), contiguous and paged.
        kc = w.measure("kernels", "flash_sparse_attn, kernels only (profiler)", "fwd", run,
                       timing=w.kernels_only, note="kept K+V bytes", bytes_moved=kept_bytes)
        copy_share("kernels", kc)
        kp_ms = w.measure("paged_kernels", f"flash_sparse_attn, paged (page {page}), kernels only",
                          "fwd", paged, timing=w.kernels_only, bytes_moved=kept_bytes)
        if kc is not None and kp_ms is not None:
            w.extra("paged_kernels", paged_kernel_ratio=kp_ms / kc)
        del kp, vp
        all_bytes = 2 * B * Sk * Hk * D * q.element_size()
        ms_sdpa = w.measure("sdpa_flash_dense", "SDPA flash, all keys (dense)", "fwd",
                            lambda: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
                            note="all K+V bytes", bytes_moved=all_bytes)
        if ms1 is not None and ms_sdpa is not None:
            w.extra("sdpa_flash_dense", ours_ratio=ms1 / ms_sdpa)
        # The host's share of an eager call, ours and SDPA's (host_ms).
        hs = w.measure("host", "flash_sparse_attn, host time per call", "fwd", run,
                       timing=w.host_only, note="perf_counter over 20 calls")
        # The backend is selected once, outside the timed calls: entering sdpa_kernel costs more
        # host time than the call itself, and a loop would enter it once.
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            hs_sdpa = w.measure("sdpa_host", "SDPA flash, host time per call", "fwd",
                                lambda: _sdpa_call(q, k, v), timing=w.host_only,
                                note="perf_counter over 20 calls; backend selected outside")
        if hs is not None and hs_sdpa is not None:
            w.extra("host", host_ratio=hs / hs_sdpa)
        if B != 1:
            return
        label = "FlexAttention (BlockMask)"
        try:
            from torch.nn.attention.flex_attention import BlockMask
            nb = Sk // block
            kv_num = keep_blocks.sum().to(torch.int32).view(1, 1, 1).expand(B, H, 1).contiguous()
            kv_idx = torch.nonzero(keep_blocks).flatten().to(torch.int32)
            kv_idx = torch.cat([kv_idx, torch.zeros(nb - kv_idx.numel(), dtype=torch.int32,
                                                    device=w.device)]).view(1, 1, 1, nb)
            kv_idx = kv_idx.expand(B, H, 1, nb).contiguous()
            bm = BlockMask.from_kv_blocks(torch.zeros_like(kv_num), torch.zeros_like(kv_idx),
                                          kv_num, kv_idx, BLOCK_SIZE=block, seq_lengths=(1, Sk))
        except Exception as e:  # noqa: BLE001
            w.failed("flex", ["fwd"], *classify(e), label=label)
            return
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        def flex():
            return flex_fn()(qh, kh, vh, block_mask=bm, enable_gqa=True).transpose(1, 2)

        w.measure("flex", label, "fwd", flex, check=matches(flex, ours, 2e-2),
                  bytes_moved=kept_bytes)


# ---- kvcache: a decode step over caches with per-sequence lengths ------------------------------

# (B, cache keys, lengths drawn from [lo, hi) keys): a cache filled near its size, and one
# allocated for a longer context than the sequences hold so far (most of its blocks past them).
KVCACHE_CASES = [(8, 32768, 16384, 32768), (1, 524288, 393216, 524288), (8, 131072, 4096, 12288),
                 (64, 32768, 8192, 32768)]


def kvcache_specs(quick, smoke):
    cases = [(2, 2048, 512, 1536), (1, 4096, 3072, 4096)] if smoke else KVCACHE_CASES
    H, Hk, D = (4, 2, 64) if smoke else (32, 8, 128)
    keep_every = 8
    return [dict(group="kvcache", key=f"kvcache/B{B}/Sk{Sk}/len{lo}-{hi}",
                 title=f"decode step, cache ({B},{Sk},{Hk},{D}) lengths [{lo},{hi}) "
                       f"1/{keep_every} blocks",
                 B=B, Sk=Sk, lo=lo, hi=hi, H=H, Hk=Hk, D=D, keep_every=keep_every, block=128)
            for B, Sk, lo, hi in cases]


def cuda_graph(fn, cuda):
    """fn captured in a CUDA graph: (graph, the output tensor its replays write). A warm-up call
    on the capture's own stream comes first: it makes the plan, as a serving loop's first step
    would, so that the captured call finds it (plans are cached per stream: warmed up on another
    stream, the capture would plan again and every replay would rerun the planning kernels) and
    reads nothing on the host. CUDA only."""
    if not cuda:
        raise Unavailable("a CUDA graph needs CUDA")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


def kvcache_workload(w):
    """A decode step over a cache with per-sequence lengths (flash_sparse_attn_with_kvcache's
    cache_seqlens), a key mask keeping 1/8 of the 128-key blocks, causal, the L2 cache flushed
    before every rep, per call over 8 calls back to back (a decode loop's host running ahead; the
    lengths a new tensor every call). Ours with the lengths in the kernels (one plan for every
    step; blocks past a length skipped); the same step captured once in a CUDA graph and
    replayed (what a serving loop does to drop the host's share; must equal the eager call
    bitwise); against the lengths written into the mask (what the call did before: a new mask,
    so a new plan, every step; it must agree with cache_seqlens), and SDPA flash over every key
    of the cache. GB/s over the kept K + V bytes within the lengths."""
    from torch.nn.attention import SDPBackend
    from flash_sparse_attn import flash_sparse_attn_with_kvcache
    s = w.spec
    B, Sk, lo, hi, H, Hk, D = (s[x] for x in ("B", "Sk", "lo", "hi", "H", "Hk", "D"))
    keep_every, block = s["keep_every"], s["block"]
    g = torch.Generator(device=w.device).manual_seed(B + Sk)
    q = w.randn(B, 1, H, D)
    k, v = w.randn(B, Sk, Hk, D), w.randn(B, Sk, Hk, D)
    keep_blocks = (torch.arange(Sk // block, device=w.device) % keep_every) == 0
    mask = keep_blocks.repeat_interleave(block)[None, None, None, :]
    lens = torch.randint(lo, hi, (B,), device=w.device, generator=g, dtype=torch.int32)
    keys = torch.arange(Sk, device=w.device)
    kept = int((mask[0, 0, 0][None, :] & (keys[None, :] < lens[:, None])).sum())
    kept_bytes = 2 * kept * Hk * D * q.element_size()

    def ours():
        return flash_sparse_attn_with_kvcache(q, k, v, lens.clone(), attn_mask=mask,
                                              is_causal=True)

    static_lens = lens.clone()                       # the lengths a captured step reads

    def captured_step():
        return flash_sparse_attn_with_kvcache(q, k, v, static_lens, attn_mask=mask,
                                              is_causal=True)

    def as_mask():
        held = keys[None, None, None, :] < lens.clone().view(B, 1, 1, 1)
        return flash_sparse_attn_with_kvcache(q, k, v, attn_mask=held & mask, is_causal=True)

    def agrees():
        err = max_err(ours(), as_mask())
        if math.isfinite(err) and err <= 2e-2:
            return f"max|diff| vs cache_seqlens {err:.2e}"
        return f"WRONG: max|diff| vs cache_seqlens {err:.3g}"

    with torch.no_grad():
        ms = w.measure("cache_seqlens", "flash_sparse_attn, cache_seqlens", "fwd", ours,
                       timing=w.back_to_back, note="per call, 8 back to back; kept K+V bytes",
                       bytes_moved=kept_bytes)
        label = "flash_sparse_attn, cache_seqlens, CUDA graph replay"
        try:
            graph, captured = cuda_graph(captured_step, w.timer.cuda)
        except Exception as e:  # noqa: BLE001
            w.failed("cuda_graph", ["fwd"], *classify(e), label=label)
        else:
            def same_as_eager():
                graph.replay()
                if torch.equal(captured, ours()):
                    return "bitwise equal to the eager call"
                return "WRONG: differs from the eager call"

            ms_graph = w.measure("cuda_graph", label, "fwd", graph.replay, check=same_as_eager,
                                 timing=w.back_to_back, note="per replay, 8 back to back",
                                 bytes_moved=kept_bytes)
            if ms is not None and ms_graph is not None:
                w.extra("cuda_graph", graph_speedup=ms / ms_graph)
            del graph
        ms_mask = w.measure("lengths_as_mask", "flash_sparse_attn, lengths as a mask", "fwd",
                            as_mask, check=agrees, timing=w.back_to_back,
                            bytes_moved=kept_bytes)
        if ms is not None and ms_mask is not None:
            w.extra("lengths_as_mask", lengths_speedup=ms_mask / ms)
        ms_sdpa = w.measure("sdpa_flash_dense", "SDPA flash, every cache key (dense)", "fwd",
                            lambda: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
                            timing=w.back_to_back, note="all K+V bytes",
                            bytes_moved=2 * B * Sk * Hk * D * q.element_size())
        if ms is not None and ms_sdpa is not None:
            w.extra("sdpa_flash_dense", ours_ratio=ms / ms_sdpa)


# ---- bias: bias gradients, broadcast and deterministic ------------------------------------------


def bias_specs(quick, smoke):
    B, S, H, D = (2, 256, 2, 64) if smoke else (2, 4096, 16, 128)
    return [dict(group="bias", key=f"bias/{shape[0]}x{shape[1]}/S{S}",
                 title=f"bias {shape} grad, causal ({B},{S},{H},{H},{D})",
                 bias_shape=list(shape), B=B, S=S, H=H, D=D)
            for shape in ((B, H, S, S), (1, H, S, S), (B, 1, S, S), (1, 1, S, S))]


def bias_workload(w):
    """Forward + backward with a full (S, S) bias broadcast over batch and/or heads, requiring
    grad: its gradient sums the dS of several (b, h). Ours by default (fp32 atomics) and with
    deterministic=True (one ordered dQ launch per (b, h) sharing a bias slice), whose bias
    gradients must agree (else the workload stops, WRONG), next to a non-broadcast bias (each dS
    written once: the (B, H, S, S) workload) and the peers that take a bias gradient, theirs
    checked against ours."""
    from torch.nn.attention import SDPBackend
    s = w.spec
    B, S, H, D = s["B"], s["S"], s["H"], s["D"]
    shape = tuple(s["bias_shape"])
    q, k, v, dout = (w.randn(B, S, H, D) for _ in range(4))
    flops = 4 * S * S * D * B * H / 2
    bias = w.randn(*shape)
    ours = flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
    ar = torch.arange(S, device=w.device)
    w.check_ours("ours", "flash_sparse_attn", ours, q, k, v, lambda b, h, i: ar <= i,
                 lambda b, h, i: bias[b % shape[0], h % shape[1], i], rows=(0, 1000, -1))
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    dbias = {}
    for det, impl, label in ((False, "ours", "flash_sparse_attn"),
                             (True, "deterministic", "flash_sparse_attn deterministic")):
        run = fwd_bwd(lambda d=det: flash_sparse_attn_func(
            *leaves[:3], attn_bias=leaves[3], is_causal=True, deterministic=d), leaves, dout)
        run()
        dbias[det] = leaves[3].grad.clone()
        w.measure(impl, label, "fwdbwd", run, flops=flops)
    diff = max_err(dbias[False], dbias[True])
    scale = dbias[False].float().abs().max().item()
    w.note("deterministic", f"dbias vs default: max|diff| {diff:.2e} (|dbias| max {scale:.2e})")
    print(f"  (dbias default vs deterministic: max|diff| {diff:.2e}, |dbias| max {scale:.2e})")
    if not diff <= 2e-2 * max(scale, 1e-3):
        raise Wrong(f"default and deterministic dbias disagree by {diff:.3g}")

    def peer(impl, label, fn):
        """Times a peer's forward + backward, then checks its bias gradient against ours (a
        wrong one marks the row's check)."""
        leaves[3].grad = None
        w.measure(impl, label, "fwdbwd", fwd_bwd(fn, leaves, dout), flops=flops)
        if leaves[3].grad is not None:
            err = max_err(leaves[3].grad, dbias[False])
            if err <= 3e-2 * max(scale, 1e-3):
                w.note(impl, f"dbias max|diff| vs ours {err:.2e}")
            else:
                w.wrong(impl, f"WRONG dbias: max|peer - ours| = {err:.3g}")

    # SDPA's memory-efficient backend takes a float mask and returns its gradient.
    peer("sdpa_eff_mask", "SDPA efficient (float mask)",
         lambda: _sdpa(*leaves[:3], SDPBackend.EFFICIENT_ATTENTION,
                       attn_mask=leaves[3] + causal_additive(S, w.device, w.dtype)))
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(causal_mod, None, None, S, S, device=w.device)
    except Exception as e:  # noqa: BLE001
        w.failed("flex", ["fwdbwd"], *classify(e), label="FlexAttention")
        return
    bl = leaves[3]
    per_batch, per_head = shape[0] > 1, shape[1] > 1

    def score_mod(score, b, h, qi, ki):
        return score + bl[b if per_batch else 0, h if per_head else 0, qi, ki].float()

    peer("flex", "FlexAttention", lambda: flex_fn()(
        *(x.transpose(1, 2) for x in leaves[:3]), score_mod=score_mod,
        block_mask=bm).transpose(1, 2))


# ---- varlen: a packed training batch ------------------------------------------------------------


def varlen_specs(quick, smoke, seed=0):
    """The packed batch: `docs` documents, their lengths cut at random (seeded) from `total`."""
    total, docs, H, Hk, D = (1024, 6, 4, 2, 64) if smoke else (65536, 16, 32, 8, 128)
    g = torch.Generator().manual_seed(seed)
    cuts = sorted((torch.randperm(total - 1, generator=g)[:docs - 1] + 1).tolist())
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    return [dict(group="varlen", key=f"varlen/docs{docs}/T{total}",
                 title=f"varlen ({docs} docs, {total} tokens, {H},{Hk},{D}) causal bias",
                 lengths=lengths, H=H, Hk=Hk, D=D)]


def varlen_workload(w):
    """Issue #15: a packed batch of `docs` documents of random lengths totalling `total` tokens,
    causal, a per-key bias (Hk, total) with its gradient, forward + backward. Ours as one packed
    call (offsets on the device), ours on the documents one by one (flash_sparse_attn_func on each
    document's views, every one a full-occupancy call), and FlexAttention over the packed sequence
    with a document mask and the bias as a score_mod (its gradient through the captured tensor);
    the peers' gradients checked against ours, then the ratios of issue #15's bars."""
    s = w.spec
    lens, H, Hk, D = s["lengths"], s["H"], s["Hk"], s["D"]
    total, docs, G = sum(lens), len(lens), H // Hk
    bounds = [sum(lens[:i]) for i in range(docs + 1)]
    print(f"  document lengths {lens}", flush=True)
    q, dout = w.randn(total, H, D), w.randn(total, H, D)
    k, v = w.randn(total, Hk, D), w.randn(total, Hk, D)
    bias = (-F.softplus(torch.randn(Hk, total, generator=w.gen, device=w.device))).to(w.dtype)
    cu = torch.tensor(bounds, device=w.device, dtype=torch.int32)
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
    doc = torch.repeat_interleave(torch.arange(docs, device=w.device),
                                  torch.tensor(lens, device=w.device))
    positions = torch.arange(total, device=w.device)
    w.check_ours("varlen", "flash_sparse_attn varlen", ours[None], q[None], k[None], v[None],
                 lambda b, h, i: (doc == doc[i]) & (positions <= i),
                 lambda b, h, i: bias[h // G], rows=(0, 1, bounds[1], bounds[5] + 3, -1))
    ours_grads = grads_of(packed, leaves, dout)
    t = {}
    t["varlen", "fwdbwd"] = w.measure("varlen", None, "fwdbwd",
                                      fwd_bwd(lambda: packed(*leaves), leaves, dout), flops=flops)
    t["per_document", "fwdbwd"] = w.measure(
        "per_document", "flash_sparse_attn per document", "fwdbwd",
        fwd_bwd(lambda: one_by_one(*leaves), leaves, dout), flops=flops,
        check=lambda: agree_grads(grads_of(one_by_one, leaves, dout), ours_grads))
    t["varlen", "fwd"] = w.measure("varlen", None, "fwd", lambda: packed(q, k, v, bias),
                                   flops=flops)
    label = "FlexAttention (document mask + bias)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        bm = create_block_mask(mask_mod, None, None, total, total, device=w.device)
    except Exception as e:  # noqa: BLE001
        w.failed("flex", ["fwdbwd"], *classify(e), label=label)
    else:
        def flex(q_, k_, v_, b_):
            def score_mod(score, b, h, qi, ki):
                return score + b_[h // G, ki].float()
            return flex_fn()(q_.transpose(0, 1)[None], k_.transpose(0, 1)[None],
                             v_.transpose(0, 1)[None], score_mod=score_mod, block_mask=bm,
                             enable_gqa=True)[0].transpose(0, 1)

        t["flex", "fwdbwd"] = w.measure(
            "flex", label, "fwdbwd", fwd_bwd(lambda: flex(*leaves), leaves, dout), flops=flops,
            check=lambda: agree_grads(grads_of(flex, leaves, dout), ours_grads))
    w.ratios(t, [("fwd+bwd: varlen / per document", ("varlen", "fwdbwd"),
                  ("per_document", "fwdbwd"), [("<=", 1.15, "#15")]),
                 ("fwd+bwd: FlexAttention / varlen", ("flex", "fwdbwd"), ("varlen", "fwdbwd"),
                  [(">=", 1.5, "#15")])])


# ---- topk: the reference's workflow (issues #11 and #12) ----------------------------------------

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
    flex_attention on CUDA (flex_fn; eager elsewhere, e.g. the CPU of --smoke): compiling the
    whole function made Inductor fail on the H200 (torch 2.11) with "The argument
    '128*((-128)) + 127' is not comparable" when the gathered keys are fewer than the queries.
    Also bench/train_step.py's flex-gather variant."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
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
    attend = flex_fn() if q.is_cuda else flex_attention
    return attend(q, k_g, v_g, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


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


# id: (form, (B, S, H, Hk, D), keys kept). --topk-cases runs them in the order given; the cases of
# one shape share its inputs and its dense baselines.
TOPK_CASES = {
    "key16k": ("key", (1, 16384, 32, 8, 128), 2048),
    "row16k": ("row", (1, 16384, 32, 8, 128), 2048),
    "key32k": ("key", (1, 32768, 32, 8, 128), 2048),
    "mem32k": ("memory", (1, 32768, 32, 8, 128), 2048),
    "keyref": ("key", (1, 32768, 2, 1, 64), 1024),     # the reference's own benchmark shape
    "rowref": ("row", (1, 32768, 2, 1, 64), 1024),
}
# --smoke: the same cases on shapes a CPU runs in seconds.
TOPK_SMOKE_CASES = {
    "key16k": ("key", (1, 512, 4, 2, 64), 64),
    "row16k": ("row", (1, 512, 4, 2, 64), 64),
    "key32k": ("key", (1, 1024, 4, 2, 64), 64),
    "mem32k": ("memory", (1, 1024, 4, 2, 64), 64),
    "keyref": ("key", (1, 512, 2, 1, 64), 32),
    "rowref": ("row", (1, 512, 2, 1, 64), 32),
}


def topk_dense_key(shape):
    return "topk/dense/" + "x".join(map(str, shape))


def topk_specs(quick, smoke, cases):
    """The selected cases in order, each shape's dense baselines before its first case that needs
    them (the memory case measures its own)."""
    table = TOPK_SMOKE_CASES if smoke else TOPK_CASES
    out, dense_listed = [], set()
    for case in cases:
        form, shape, keep = table[case]
        if form != "memory" and shape not in dense_listed:
            dense_listed.add(shape)
            out.append(dict(group="topk", key=topk_dense_key(shape), form="dense",
                            title=f"dense causal {shape_text(shape)} (no mask, no bias)",
                            shape=list(shape), keep=keep))
        what = {"key": "key mask", "row": "per row", "memory": "per row peak memory fwd+bwd"}
        out.append(dict(group="topk", key=f"topk/{case}/" + "x".join(map(str, shape)),
                        form=form, case=case, shape=list(shape), keep=keep,
                        title=f"topk {what[form]} {shape_text(shape)} keep {keep} causal"))
    return out


def untie_top(bias, keep):
    """randn in a 16-bit float repeats values, so a row's keep-th largest bias usually ties with
    others, and which of those a top-k keeps is up to the implementation (create_mask: the lowest
    indices; torch.topk: unspecified). Lowers the tied entries past the first `keep` (by index) to
    the next smaller value, in place, so that every implementation keeps the same keys."""
    rows = bias.view(-1, bias.shape[-1])                                         # (B * Hk, S)
    t = rows.topk(keep, dim=-1).values[:, -1:]                                   # keep-th largest
    tied = rows == t
    surplus = tied & (tied.cumsum(-1) > keep - (rows > t).sum(-1, keepdim=True))
    # Next smaller value through the bit pattern (sign and magnitude): one step toward 0 when
    # positive, away from it when negative; below +-0 comes the smallest negative subnormal
    # (bits 0x8001).
    bits = t.view(torch.int16)
    lower = torch.where(t > 0, bits - 1,
                        torch.where(t < 0, bits + 1, torch.full_like(bits, -0x7FFF)))
    rows.copy_(torch.where(surplus, lower.view(t.dtype), rows))


class TopkInputs:
    """q, k, v, the bias (randn; ties at each row's keep-th value undone) and the output gradient
    of one (B, S, H, Hk, D) shape, drawn from a generator seeded by the shape: the cases of a
    shape and its dense baselines see the same q, k and v."""

    def __init__(self, shape, keep, device, dtype):
        B, S, H, Hk, D = shape
        self.shape, self.keep = shape, keep
        self.label = shape_text(shape)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(self.label.encode()))

        def randn(*size):
            return torch.randn(*size, generator=gen, device=device).to(dtype)

        self.q = randn(B, S, H, D)
        self.k, self.v = randn(B, S, Hk, D), randn(B, S, Hk, D)
        self.dout = randn(B, S, H, D)
        self.bias = randn(B, Hk, 1, S)
        untie_top(self.bias, keep)

    def causal_mask(self):
        """The 4-D causal mask (1, 1, S, S) that transformers hands to create_mask."""
        S = self.shape[1]
        return torch.ones(S, S, device=self.q.device, dtype=torch.bool).tril()[None, None]


def kept_flops(mask, H, D):
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
# allowances (see agree); note goes to its row.
TopkImpl = collections.namedtuple("TopkImpl", "id label fn is_reference note",
                                  defaults=(False, ""))


def topk_run_impls(w, x, impls, flops):
    """Measures each TopkImpl: the forward, then forward + backward with q, k, v and the bias
    requiring grad. impls[0] is ours, checked against float64 by the caller; every other is
    checked against it (output, then gradients) before it is timed. Returns {(id, measure): ms}."""
    t = {}
    ours_fn = impls[0].fn
    ours = ours_fn(x.q, x.k, x.v, x.bias)
    for i, impl in enumerate(impls):
        check = None
        if i:
            check = lambda impl=impl: agree(  # noqa: E731
                "out", impl.fn(x.q, x.k, x.v, x.bias), ours, 2e-2,
                "empty rows" if impl.is_reference else None)
        t[impl.id, "fwd"] = w.measure(impl.id, impl.label, "fwd",
                                      lambda fn=impl.fn: fn(x.q, x.k, x.v, x.bias),
                                      check=check, note=impl.note, flops=flops)
    leaves = [a.detach().clone().requires_grad_(True) for a in (x.q, x.k, x.v, x.bias)]
    ours_grads = grads_of(ours_fn, leaves, x.dout)
    for i, impl in enumerate(impls):
        check = None
        if i:
            check = lambda impl=impl: agree_grads(  # noqa: E731
                grads_of(impl.fn, leaves, x.dout), ours_grads,
                "anywhere" if impl.is_reference else None)
        t[impl.id, "fwdbwd"] = w.measure(impl.id, impl.label, "fwdbwd",
                                         fwd_bwd(lambda fn=impl.fn: fn(*leaves), leaves, x.dout),
                                         check=check, note=impl.note, flops=flops)
    return t


def topk_dense(w, x):
    """Our dense causal (no mask, no bias), SDPA cuDNN and flash dense causal, on x's shape: the
    baselines of the cases of that shape."""
    from torch.nn.attention import SDPBackend
    B, S, H, Hk, D = x.shape
    ar = torch.arange(S, device=x.q.device)
    out = flash_sparse_attn_func(x.q, x.k, x.v, is_causal=True)
    w.check_ours("dense", "ours dense causal", out, x.q, x.k, x.v, lambda b, h, i: ar <= i)
    del out
    impls = [TopkImpl("dense", "ours dense causal",
                      lambda q, k, v, b: flash_sparse_attn_func(q, k, v, is_causal=True))]
    for impl, label, backend in [("cudnn", "SDPA cuDNN dense causal", SDPBackend.CUDNN_ATTENTION),
                                 ("flash", "SDPA flash dense causal", SDPBackend.FLASH_ATTENTION)]:
        impls.append(TopkImpl(impl, label, lambda q, k, v, b, backend=backend: _sdpa(
            q, k, v, backend, is_causal=True)))
    topk_run_impls(w, x, impls, 4 * S * S * D * B * H / 2)


def selection_in_call(x, keep, per_row):
    """Ours with the top-k selection inside the call, as a TopkImpl "topk": `topk=keep` (with
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
        return TopkImpl("topk", "ours, " + ", ".join(f"{k}={v}" for k, v in options.items()),
                        with_topk)
    except TypeError as e:
        missing = [k for k in options if f"'{k}'" in str(e)]
        if "unexpected keyword" not in str(e) or not missing:
            raise
    causal = x.causal_mask() if per_row else None

    def with_create_mask(q, k, v, bias):
        B, S = q.shape[:2]
        mask = create_mask(bias, causal, B, S, S, keep, torch.finfo(bias.dtype).min)
        return flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

    return TopkImpl("topk", f"ours, create_mask{'(causal)' if per_row else ''} + attention",
                    with_create_mask,
                    note=f"no {missing[0]}= in this build: create_mask + attention, both timed")


def topk_bars(x, per_row):
    """The ratios the issues set bars on, as WorkloadRun.ratios specs. "given": ours with the mask
    given; "in-call": ours with the selection inside the call; dense: no mask, no bias."""
    B, S, H, Hk, D = x.shape
    both = (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))
    if per_row:
        specs = [(f"{name}: given / our dense", ("ours", m), ("dense", m),
                  [("<=", 1.3, "#11")] if S == 16384 else []) for m, name in both]
        return specs + [
            ("fwd: in-call / our dense", ("topk", "fwd"), ("dense", "fwd"), []),
            ("fwd+bwd: in-call / our dense", ("topk", "fwdbwd"), ("dense", "fwdbwd"),
             [("<=", 1.15, "#11")]),
            ("fwd+bwd: in-call / cuDNN dense", ("topk", "fwdbwd"), ("cudnn", "fwdbwd"),
             [("<=", 0.5, "#12")]),
            ("fwd: reference / in-call", ("ref", "fwd"), ("topk", "fwd"), []),
            ("fwd+bwd: reference / in-call", ("ref", "fwdbwd"), ("topk", "fwdbwd"),
             [(">=", 3, "#11"), (">=", 6, "#12")]),
            ("fwd+bwd: reference / given", ("ref", "fwdbwd"), ("ours", "fwdbwd"), [])]
    # The key-mask bars against dense attention are set on the (1, S, 32, 8, 128) shapes only.
    dense_bars = (H, Hk, D) == (32, 8, 128)
    cudnn_bar = 0.3 if S <= 16384 else 0.2
    specs = []
    for ours, who in (("ours", "given"), ("topk", "in-call")):
        for m, name in both:
            specs += [
                (f"{name}: {who} / our dense", (ours, m), ("dense", m),
                 [("<=", 1.15, "#11")] if dense_bars else []),
                (f"{name}: {who} / cuDNN dense", (ours, m), ("cudnn", m),
                 [("<=", cudnn_bar, "#12")] if dense_bars else []),
                (f"{name}: reference / {who}", ("ref", m), (ours, m),
                 [(">=", 10, "#12")] if m == "fwdbwd" else [])]
        specs.append((f"fwd+bwd: {who} / flex-gather", (ours, "fwdbwd"), ("flex", "fwdbwd"),
                      [("<=", 0.6, "#12")]))
    return specs


def topk_case(w, x, per_row):
    """One top-k form on x's shape; its ratios to the dense baselines of that shape read those
    from --json. The key mask (per_row False): the global top-`keep` keys per (batch, kv head),
    (B, Hk, 1, S), causality from the kernel: what flash_sparse_attention_forward builds for Doge
    (attention_mask=None). Per row: each row's top-`keep` causal keys, create_mask with the causal
    4-D mask: (B, Hk, S, S)."""
    B, S, H, Hk, D = x.shape
    G, keep = H // Hk, x.keep
    dense = topk_dense_key(x.shape)
    t = {(impl, m): w.recorded_ms(dense, impl, m)
         for impl in ("dense", "cudnn", "flash") for m in ("fwd", "fwdbwd")}
    mask = create_mask(x.bias, x.causal_mask() if per_row else None, B, S, S, keep,
                       torch.finfo(x.bias.dtype).min)
    flops = kept_flops(mask, H, D)

    def given(q, k, v, bias):
        return flash_sparse_attn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

    label = f"ours, {'(B,Hk,S,S)' if per_row else 'key'} mask given"
    ar = torch.arange(S, device=x.q.device)
    w.check_ours("ours", label, given(x.q, x.k, x.v, x.bias), x.q, x.k, x.v,
                 lambda b, h, i: mask[b, h // G, i if per_row else 0] & (ar <= i),
                 lambda b, h, i: x.bias[b, h // G, 0])
    print(f"  (density {100 * flops / (2 * D * H * B * S * S):.2f}% of the causal triangle; "
          "'given': the mask made by create_mask before the call, not timed)")
    impls = [TopkImpl("ours", label, given), selection_in_call(x, keep, per_row)]
    if not per_row:
        impls.append(TopkImpl("flex", "FlexAttention, gathered keys", lambda q, k, v, b: (
            flex_gather(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), b,
                        keep).transpose(1, 2))))
    reference, why = reference_kernel() if x.q.is_cuda else (None, "needs CUDA (a Triton kernel)")
    if reference is not None:
        impls.append(TopkImpl("ref", "reference Triton, same mask",
                              lambda q, k, v, b: reference(q, k, v, mask, b, True),
                              is_reference=True))
    t.update(topk_run_impls(w, x, impls, flops))
    if reference is None:
        w.failed("ref", ["fwd", "fwdbwd"], "unavailable", f"reference: {why}",
                 label="reference Triton, same mask")
    w.ratios(t, topk_bars(x, per_row))


def topk_memory(w, x):
    """Peak memory (torch.cuda.max_memory_allocated above what is allocated before the call) of
    one forward + backward, per-row top-k against dense causal; issue #11's bar: < 2x. Without
    topk_causal in this build, the mask create_mask builds counts, the causal 4-D mask it reads
    (an input, as q is) does not. CUDA only."""
    leaves = [a.detach().clone().requires_grad_(True) for a in (x.q, x.k, x.v, x.bias)]

    def peak_mb(fn):
        if not x.q.is_cuda:
            raise Unavailable("peak memory needs CUDA (torch.cuda.max_memory_allocated)")
        for a in leaves:
            a.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*leaves).backward(x.dout)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    dense = w.peak("dense", "ours dense causal", lambda: peak_mb(
        lambda q, k, v, b: flash_sparse_attn_func(q, k, v, is_causal=True)))
    selection = selection_in_call(x, x.keep, per_row=True)
    per_row = w.peak("topk", selection.label, lambda: peak_mb(selection.fn), note=selection.note)
    w.ratios({"row": per_row, "dense": dense},
             [("peak: per row / dense", "row", "dense", [("<", 2, "#11")])])


def topk_workload(w):
    """Issues #11 and #12 (see the module docstring): one case, or a shape's dense baselines."""
    s = w.spec
    x = TopkInputs(tuple(s["shape"]), s["keep"], w.device, w.dtype)
    if s["form"] == "dense":
        topk_dense(w, x)
    elif s["form"] == "memory":
        topk_memory(w, x)
    else:
        topk_case(w, x, per_row=s["form"] == "row")


WORKLOAD_RUNNERS = {"bias": bias_workload, "topk": topk_workload, "varlen": varlen_workload,
                    "kvcache": kvcache_workload, "decode_bars": decode_bars_workload}


# ------------------------------------------------------------------------------------------------
# Results file, progress


class Results:
    def __init__(self, path, meta, resume):
        self.path = path
        self.data = {"format": FORMAT, "meta": meta, "rows": []}
        if path and resume and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("format") != FORMAT:
                raise SystemExit(f"--resume: {path} is not a {FORMAT} file "
                                 f"(format {old.get('format')!r})")
            self.data["rows"] = old["rows"]
            runs = old["meta"].get("runs", [])
            meta["runs"] = runs + meta["runs"]
        self.by_key = {r["key"]: r for r in self.data["rows"]}
        self.workloads = {r["workload"] for r in self.data["rows"]}

    @property
    def done(self):
        return self.by_key.keys()

    def add(self, *rows):
        """Appends rows and rewrites the file once."""
        for row in rows:
            self.data["rows"].append(row)
            self.by_key[row["key"]] = row
            self.workloads.add(row["workload"])
        self.save()

    def ms(self, key, measure):
        """The median ms of `measure` in the row `key`, or None (no such row or measure)."""
        return self.by_key.get(key, {}).get(f"{measure}_ms")

    def save(self):
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def fmt_s(s):
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A one-line progress bar with ETA on stderr (a fresh line per entry when not a tty)."""

    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, label):
        el = time.perf_counter() - self.t0
        eta = "?" if self.done == 0 else fmt_s(el / self.done * (self.total - self.done))
        n = 24
        fill = n * self.done // max(1, self.total)
        line = (f"[{'#' * fill}{'.' * (n - fill)}] {self.done}/{self.total} "
                f"elapsed {fmt_s(el)} ETA {eta}  {label}")
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self):
        self.done += 1

    def close(self):
        if self.tty:
            sys.stderr.write("\n")
        el = time.perf_counter() - self.t0
        sys.stderr.write(f"sweep: {self.done} entries in {fmt_s(el)}\n")


def summary_line(row):
    def ms(k):
        v = row.get(k)
        return f"{v:9.3f}" if v is not None else f"{row['fail'].get(k[:-3], '-'):>9s}"
    comp = ""
    if row["impl"] == "flex" and "first_call_s" in row:
        comp = f" compile fwd {row['first_call_s']:.1f}s"
        if "first_train_s" in row:
            comp += f" fwd+bwd {row['first_train_s']:.1f}s"
    peak = row.get("peak_fwdbwd_mb", row.get("peak_fwd_mb"))
    peak_s = f" peak {peak:8.0f} MiB" if peak is not None else ""
    note = ("  " + "; ".join(row["notes"])[:160]) if row["notes"] else ""
    return (f"  {row['label'][:38]:38s} fwd {ms('fwd_ms')} bwd {ms('bwd_ms')} "
            f"fwd+bwd {ms('fwdbwd_ms')} ms{peak_s}{comp}{note}")


# ------------------------------------------------------------------------------------------------


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="results file, rewritten after every entry")
    ap.add_argument("--resume", action="store_true", help="skip entries already in --json")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma list of workload groups, of: {','.join(ALL_GROUPS)} "
                         f"(default {','.join(GROUPS)})")
    ap.add_argument("--impls", default=None,
                    help=f"comma list of implementations: {','.join(IMPLS)} (not for the "
                         f"workload groups {','.join(WORKLOAD_GROUPS)})")
    ap.add_argument("--filter", default=None,
                    help="regex on entry keys 'workload|impl' (the workload groups: on the "
                         "workload key)")
    ap.add_argument("--topk-cases", default=",".join(TOPK_CASES),
                    help="the topk group's cases, of: " + ", ".join(TOPK_CASES))
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes and densities (dense, trainable, reference, decode)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; any device, CPU included")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer; 0 disables")
    ap.add_argument("--flush", choices=("clean", "zero"), default="clean",
                    help="how the flush evicts: zero the buffer then read it (clean, default), "
                         "or only zero it (runs before 2026-12-03; its write-back lands in the "
                         "timed call)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default="bf16", help="bf16 or fp16")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    args = ap.parse_args(argv)
    def comma_list(option, value, known, what):
        """The names of a comma list, each one of `known` (else a usage error)."""
        names = [n for n in value.split(",") if n]
        bad = [n for n in names if n not in known]
        if bad or not names:
            ap.error(f"{option}: unknown {what}(s) {bad or value!r}; expected a comma list of "
                     f"{', '.join(known)}")
        return names

    groups = comma_list("--only", args.only, ALL_GROUPS, "group")
    args.groups = groups
    if args.impls is not None:
        impls = comma_list("--impls", args.impls, IMPLS, "implementation")
        whole = [g for g in groups if g in WORKLOAD_GROUPS]
        if whole:
            ap.error(f"--impls: the workload groups {', '.join(whole)} run every implementation "
                     "of a workload; select their workloads with --filter")
        args.impls = set(impls)
    args.topk_cases = comma_list("--topk-cases", args.topk_cases, TOPK_CASES, "case")
    if args.filter is not None:
        try:
            args.filter = re.compile(args.filter)
        except re.error as e:
            ap.error(f"--filter: not a valid regular expression ({e}): {args.filter!r}")
    if args.reps is None:
        args.reps = 2 if args.smoke else 10
    if args.reps < 1:
        ap.error(f"--reps: expected a positive integer, got {args.reps}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.flush_mb < 0:
        ap.error(f"--flush-mb: expected an integer >= 0, got {args.flush_mb}")
    if args.dtype not in ("bf16", "fp16"):
        ap.error(f"--dtype: expected bf16 or fp16, got {args.dtype!r}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or args.list else "cpu"
    if args.list:
        return args
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device: cuda requested but torch sees no CUDA device")
    if args.device == "cpu" and not args.smoke:
        ap.error("--device cpu: only with --smoke (the full sweep's shapes need a GPU)")
    if args.resume and not args.json:
        ap.error("--resume: needs --json FILE (the file whose entries are skipped)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    entries = enumerate_entries(args.groups, args.quick, args.smoke, args.device.split(":")[0],
                                args.impls, args.filter, args.topk_cases)
    if args.list:
        for spec, wkey, impls in entries:
            print(wkey, "(whole workload)" if impls is None else " ".join(impls))
        return 0
    if args.device.startswith("cuda"):
        if ":" in args.device:
            torch.cuda.set_device(torch.device(args.device))
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device_name = props.name
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, "\
                      f"{torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    run = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "flash_sparse_attn": flash_sparse_attn.__version__,
        "git": git_commit(),
        # Kernel experiments compiled in (src/cuda/experiments.h), the ones on: {} for a default
        # build (and for builds from before the report, an A/B's older base).
        "experiments": {name: value for name, value
                        in getattr(flash_sparse_attn._C, "cuda_kernel_experiments", dict)().items()
                        if value},
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python3 bench/sweep.py " + " ".join(shlex.quote(a) for a in argv),
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "flush_mb": args.flush_mb,
        "flush": args.flush,
        "quick": args.quick,
        "smoke": args.smoke,
    }
    meta = dict(run, runs=[run])
    results = Results(args.json, meta, args.resume)
    todo = []
    for spec, wkey, impls in entries:
        if impls is None:
            if wkey not in results.workloads:
                todo.append((spec, wkey, None))
            continue
        impls = [i for i in impls if f"{wkey}|{i}" not in results.done]
        if impls:
            todo.append((spec, wkey, impls))
    total = sum(1 if t[2] is None else len(t[2]) for t in todo)
    built = "".join(f", {name}={value}" for name, value in run["experiments"].items())
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton_version}, "
          f"flash_sparse_attn {flash_sparse_attn.__version__} ({run['git']}{built}), "
          f"{run['date']}; {total} entries to run ({len(entries)} workloads selected)", flush=True)
    results.save()
    timer = Timer(args.device, args.flush_mb, args.flush)
    progress = Progress(total)
    for spec, wkey, impls in todo:
        if impls is None:
            progress.show(wkey)
            print(f"{wkey}: {spec['title']}", flush=True)
            results.add(*run_workload(WorkloadRun(spec, wkey, timer, args, dtype, results)))
            progress.step()
            free_memory()
            continue
        progress.show(f"{wkey}: building inputs")
        try:
            p = Problem(spec, args.device, dtype)
        except Exception as e:  # noqa: BLE001
            label, msg = classify(e)
            for impl in impls:
                results.add(dict(key=f"{wkey}|{impl}", workload=wkey, group=spec["group"],
                                 spec=spec, impl=impl,
                                 label=IMPLS[impl], fail={"fwd": label, "build": label},
                                 notes=[f"inputs: {msg}"]))
                progress.step()
            free_memory()
            continue
        print(f"{wkey}  shape (B,Sq,Sk,H,Hk,D)=({spec['B']},{p.Sq},{p.Sk},{spec['H']},"
              f"{spec['Hk']},{spec['D']}) density {100 * p.density:.1f}%", flush=True)
        if p.backward:
            # Our gradients, the peers' reference, computed before anything is timed; after our
            # own timed loops they are recomputed and must not have changed (run_entry).
            p.ours_grads()
            if p._ours_grads is not None:
                p._ours_grads = [g.clone() for g in p._ours_grads]
        for impl in impls:
            progress.show(f"{wkey}|{impl}")
            row = run_entry(p, impl, timer, args)
            row.update(key=f"{wkey}|{impl}", workload=wkey, group=spec["group"], spec=spec,
                       density=p.density, flops=p.flops, bytes_moved=p.bytes_moved,
                       density_independent=impl.startswith("sdpa") and spec["group"] == "trainable")
            results.add(row)
            progress.step()
            print(summary_line(row), flush=True)
        del p
        free_memory()
    progress.close()
    if args.json:
        print(f"results: {args.json} ({len(results.data['rows'])} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
