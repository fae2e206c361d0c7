#!/usr/bin/env python3
"""The comparison sweep: flash_sparse_attn next to its peers, in one process on one card.

Peers: PyTorch SDPA (flash and cuDNN backends on dense workloads; the memory-efficient and cuDNN
backends with the equivalent materialized float mask where the mask matters: that is the "dense
attention with a float mask" users have today) and FlexAttention (compiled; BlockMask built from
block lists with BlockMask.from_kv_blocks, never by evaluating a mask over Sq x Sk; a bias
score_mod whose captured bias receives its gradient).

Workload groups (--only):
  dense      causal and non-causal, D in {64, 128, 256}, S in {4K, 16K} (B = 32K tokens / S, H = 16)
  trainable  (1, S, 32, 8, 128), bias (B, Hk, 1, S), causal; per (batch, kv head, 128-query block)
             the diagonal block plus the top earlier 128-key blocks by mean bias, as many as give
             the target density (5-50% of S x S); S in {4K, 16K, 64K}
  reference  the reference project's published configuration: (1, S, 2, 1, 64), causal, a per-key
             bias, each query keeps its top-1024 causal keys by that bias (its "window 1024");
             S in 256 .. 32K
  decode     Sq = 1, Sk in 4K .. 512K, (1, 1, Sk, 32, 8, 128), a key mask keeping 1/8 of the
             128-key blocks (forward only: inference)

For each (workload, implementation) entry: the output is checked against ours (ours against
float64 on sampled rows) before anything is timed; then forward, backward (alone, through a
retained graph), forward+backward, and peak memory beyond what existed before the call. Times are
CUDA-event medians after warmup, with L2 flushed (a 256 MiB buffer zeroed outside the timed
region) before every rep. A peer that errors, runs out of memory, or does not support a case is a
row saying so, never dropped. Flex compile time (the first call) is recorded apart from the medians.

Results go to --json after every entry (an interrupted run keeps what it finished); --resume skips
entries already in that file. Its format, "fsa-sweep/1" (read by bench/report.py):
  {"format": "fsa-sweep/1",
   "meta": {device, torch, cuda, triton, flash_sparse_attn, git, python, date, command, dtype,
            reps, warmup, flush_mb, quick, smoke, "runs": [the same, one per invocation]},
   "rows": [{"key": "<workload>|<impl>", "workload", "group", "spec": {shape, causal, target
             density, ...}, "impl", "label", "density" (kept fraction of Sq x Sk), "flops" (forward,
             kept entries), "bytes_moved" (decode: kept K+V), "fwd_ms", "bwd_ms", "fwdbwd_ms",
             "peak_fwd_mb", "peak_fwdbwd_mb", "aux_mb" (masks / lists built for that impl),
             "first_call_s", "first_train_s" (first calls: Flex compiles there), "reps_*",
             "max_diff_vs_fp64" (ours) or "max_diff_vs_ours", "grad_rel_diff_vs_ours",
             "fail": {measure: "oom" | "unsupported" | "error" | "wrong"}, "notes": [messages],
             "density_independent" (masked SDPA rows of the trainable group)}]}
A measure missing from a row is in its "fail" map, or was not taken (decode: forward only).

    python3 bench/sweep.py --json sweep.json [--only dense,trainable,reference,decode] [--quick]
                           [--resume] [--reps 10] [--impls ours,flex,...] [--filter REGEX]
    python3 bench/sweep.py --smoke --json /tmp/s.json     # tiny shapes, any device (CPU works)

This script must not import matplotlib (the GPU machine may lack it): plots are bench/report.py's.
"""

import argparse
import datetime
import gc
import json
import math
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
from flash_sparse_attn import flash_sparse_attn_func

FORMAT = "fsa-sweep/1"
GROUPS = ("dense", "trainable", "reference", "decode")
BLOCK = 128

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


def trainable_specs(quick, smoke):
    if smoke:
        seqs, dens, shape = (512,), (0.2, 0.5), dict(B=1, H=4, Hk=2, D=64)
    else:
        seqs = (4096, 16384) if quick else (4096, 16384, 65536)
        dens = (0.05, 0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.3, 0.5)
        shape = dict(B=1, H=32, Hk=8, D=128)
    # The masked-SDPA peers cost the same at every density (they compute every entry): they are
    # run once per S, on the workload of this density, and marked density_independent.
    mask_density = 0.2 if smoke else 0.1
    return [dict(group="trainable", S=S, target=d, causal=True, with_mask_peers=(d == mask_density),
                 **shape) for S in seqs for d in dens]


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
    if g == "dense":
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
    if g == "trainable":
        return f"trainable/S{spec['S']}/d{round(spec['target'] * 100)}"
    if g == "reference":
        return f"reference/S{spec['S']}/w{spec['window']}"
    return f"decode/Sk{spec['Sk']}/keep1of{spec['keep_every']}"


def enumerate_entries(groups, quick, smoke, device, impl_filter, key_filter):
    makers = {"dense": dense_specs, "trainable": trainable_specs, "reference": reference_specs,
              "decode": decode_specs}
    out = []
    for g in groups:
        for spec in makers[g](quick, smoke):
            wkey = workload_key(spec)
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
        if g == "dense":
            kept = self.Sq * (self.Sq + 1) / 2 if self.causal else self.Sq * self.Sk
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
        if g == "dense":
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
                                      is_causal=self.causal, **kw)

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

    def check_ours(self, out, rows=(0, 1, 127, 128, -1)):
        """Max |ours - float64| over sampled query rows of every (batch, head)."""
        B, Sq, H, D = self.q.shape
        worst = 0.0
        scale = 1.0 / math.sqrt(D)
        for b in range(B):
            for i in sorted({r % Sq for r in rows}):
                for h in range(H):
                    keep = self.keep_row(b, h, i)
                    kk = self.k[b, :, h // self.G].double()[keep]
                    vv = self.v[b, :, h // self.G].double()[keep]
                    s = kk @ self.q[b, i, h].double() * scale
                    if self.bias is not None:
                        s = s + self.bias[b, h // self.G, 0].double()[keep]
                    ref = (torch.softmax(s, 0) @ vv if kk.shape[0]
                           else torch.zeros(D, dtype=torch.float64, device=self.device))
                    worst = max(worst, (out[b, i, h].double() - ref).abs().max().item())
        return worst


# ------------------------------------------------------------------------------------------------
# Implementations: each gives fwd() (no autograd) and train(leaves) -> output with a graph


class Unsupported(Exception):
    """This implementation does not support this case (reported as 'unsupported')."""


def _sdpa(q, k, v, backend, **kw):
    from torch.nn.attention import sdpa_kernel
    if q.shape[2] != k.shape[2]:
        kw["enable_gqa"] = True
    with sdpa_kernel(backend):
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
        G = p.G

        def run(q, k, v, bias):
            score_mod = None
            if bias is not None:
                bk = bias[:, :, 0, :]

                def score_mod(score, b, h, q_idx, kv_idx):
                    return score + bk[b, h // G, kv_idx].float()
            return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                      block_mask=bm, enable_gqa=G > 1).transpose(1, 2)

        return Impl(lambda: run(p.q, p.k, p.v, p.bias),
                    lambda L: run(*L[:3], L[3] if len(L) > 3 else None), aux_bytes=aux, tol=tol)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# Measurement


class Timer:
    def __init__(self, device, flush_mb):
        self.cuda = device.startswith("cuda")
        self.flush_buf = (torch.empty(flush_mb << 20, dtype=torch.uint8, device=device)
                          if self.cuda and flush_mb > 0 else None)
        if self.cuda:
            self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

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

    def median(self, fn, reps, warmup, setup=None, budget_ms=4000.0):
        """CUDA-event median of `reps` calls after `warmup`; L2 flushed before each rep, outside
        the timed region. Slow calls get fewer reps (at least 3) to keep a rep budget per
        measurement; returns (median ms, reps used)."""
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
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            if self.cuda:
                self.ev[0].record()
                fn()
                self.ev[1].record()
                self.ev[1].synchronize()
                times.append(self.ev[0].elapsed_time(self.ev[1]))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
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
    """(label, message) for an exception: oom / unsupported / error."""
    msg = f"{type(e).__name__}: {e}".strip()
    msg = re.sub(r"\s+", " ", msg)[:300]
    low = msg.lower()
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in low:
        return "oom", msg
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
    if impl_name == "flex":
        import torch._dynamo
        torch._dynamo.reset()
    free_memory()


def classify_text(msg):
    if msg and ("head_dim <= 128" in msg or "not supported" in msg.lower()):
        return "unsupported"
    return (msg or "")[:80]


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
        self.done = {r["key"] for r in self.data["rows"]}

    def add(self, row):
        self.data["rows"].append(row)
        self.done.add(row["key"])
        self.save()

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
                    help=f"comma list of workload groups: {','.join(GROUPS)}")
    ap.add_argument("--impls", default=None,
                    help=f"comma list of implementations: {','.join(IMPLS)}")
    ap.add_argument("--filter", default=None, help="regex on entry keys 'workload|impl'")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and densities")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; any device, CPU included")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer; 0 disables")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default="bf16", help="bf16 or fp16")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    args = ap.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        ap.error(f"--only: unknown group(s) {bad or args.only!r}; expected a comma list of "
                 f"{', '.join(GROUPS)}")
    args.groups = groups
    if args.impls is not None:
        impls = [i for i in args.impls.split(",") if i]
        bad = [i for i in impls if i not in IMPLS]
        if bad or not impls:
            ap.error(f"--impls: unknown implementation(s) {bad or args.impls!r}; expected a comma "
                     f"list of {', '.join(IMPLS)}")
        args.impls = set(impls)
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
                                args.impls, args.filter)
    if args.list:
        for spec, wkey, impls in entries:
            print(wkey, " ".join(impls))
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
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python3 bench/sweep.py " + " ".join(shlex.quote(a) for a in argv),
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "flush_mb": args.flush_mb,
        "quick": args.quick,
        "smoke": args.smoke,
    }
    meta = dict(run, runs=[run])
    results = Results(args.json, meta, args.resume)
    todo = [(s, w, [i for i in impls if f"{w}|{i}" not in results.done]) for s, w, impls in entries]
    todo = [t for t in todo if t[2]]
    total = sum(len(t[2]) for t in todo)
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton_version}, "
          f"flash_sparse_attn {flash_sparse_attn.__version__} ({run['git']}), {run['date']}; "
          f"{total} entries to run ({len(entries)} workloads selected)", flush=True)
    results.save()
    timer = Timer(args.device, args.flush_mb)
    progress = Progress(total)
    for spec, wkey, impls in todo:
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
