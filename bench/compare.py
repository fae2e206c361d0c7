#!/usr/bin/env python3
"""Forward timings of flash_sparse_attn next to its peers, in one process on one GPU.

Peers: PyTorch SDPA with the flash and cuDNN backends (dense), and FlexAttention (compiled) with a
BlockMask built from block lists (kv_num_blocks / kv_indices, never by evaluating a mask over
Sq x Sk) and a bias score_mod. Every peer's output is checked against ours before it is timed; a
peer that errors or runs out of memory is reported as such. Times are CUDA-event medians.

    python3 bench/compare.py [--reps 20] [--json out.json] [--only dense,trainable,decode,bias]

(`bias` is not in the default set: forward + backward with full biases broadcast over batch/heads,
the atomics and the deterministic path of the bias gradient side by side.)
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import flash_sparse_attn
from flash_sparse_attn import flash_sparse_attn_func

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    flex_compiled = torch.compile(flex_attention, dynamic=False)
except Exception as e:  # noqa: BLE001 - reported per workload
    flex_compiled = None
    FLEX_ERROR = repr(e)


def median_ms(fn, reps):
    for _ in range(3):
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

    def add(self, workload, impl, ms=None, flops=None, note="", bytes_moved=None):
        row = {"workload": workload, "impl": impl, "ms": ms, "note": note}
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


def decode(table, reps, B=1, Sk=524288, H=32, Hk=8, D=128, keep_every=8, block=128):
    from torch.nn.attention import SDPBackend
    name = f"decode fwd ({B},1,{Sk},{H},{Hk},{D}) 1/{keep_every} blocks bf16"
    print(name, flush=True)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep_blocks = (torch.arange(Sk // block, device="cuda") % keep_every) == 0
    mask = keep_blocks.repeat_interleave(block)[None, None, None, :]  # (1, 1, 1, Sk) key-only
    kept_bytes = 2 * (Sk // keep_every) * Hk * D * 2
    run = lambda: flash_sparse_attn_func(q, k, v, attn_mask=mask, is_causal=True)  # noqa: E731
    ours = run()
    check_rows(name, ours, q, k, v, lambda b, h, i: mask[0, 0, 0], rows=(0,))
    table.add(name, "flash_sparse_attn", median_ms(run, reps), None, "kept K+V bytes",
              kept_bytes)
    dense_bytes = 2 * Sk * Hk * D * 2
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        table.add(name, "SDPA flash, all keys (dense)", median_ms(
            lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, enable_gqa=True), reps), None,
            "all K+V bytes", dense_bytes)
    except Exception as e:  # noqa: BLE001
        table.add(name, "SDPA flash, all keys (dense)", note=f"error: {str(e)[:100]}")
    if flex_compiled is None:
        table.add(name, "FlexAttention", note=f"unavailable: {FLEX_ERROR}")
        return
    nb = Sk // block
    kv_num = keep_blocks.sum().to(torch.int32).view(1, 1, 1).expand(B, H, 1).contiguous()
    kv_idx = torch.nonzero(keep_blocks).flatten().to(torch.int32)
    kv_idx = torch.cat([kv_idx, torch.zeros(nb - kv_idx.numel(), dtype=torch.int32,
                                            device="cuda")]).view(1, 1, 1, nb).expand(B, H, 1, nb)
    bm = BlockMask.from_kv_blocks(torch.zeros_like(kv_num), torch.zeros_like(kv_idx.contiguous()),
                                  kv_num, kv_idx.contiguous(), BLOCK_SIZE=block,
                                  seq_lengths=(1, Sk))
    peer(table, name, "FlexAttention (BlockMask)",
         lambda: flex_compiled(qh, kh, vh, block_mask=bm, enable_gqa=True).transpose(1, 2),
         ours, 2e-2, reps, None, kept_bytes)


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
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, "
          f"flash_sparse_attn {flash_sparse_attn.__version__}, {time.strftime('%Y-%m-%d')}")
    table = Table()
    runs = {"dense": dense_causal, "trainable": trainable_mask, "decode": decode,
            "bias": broadcast_bias}
    for key in args.only.split(","):
        runs[key](table, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "rows": table.rows}, f, indent=1)


if __name__ == "__main__":
    main()
