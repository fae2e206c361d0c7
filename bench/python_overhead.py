"""The Python layer's measured bar (issue 3), on the CPU:

1. Call overhead of ``flash_sparse_attn_func`` on a tiny problem (B, Sq, Sk, H, Hk, D) =
   (1, 16, 16, 1, 1, 32), beyond the kernel: the time per Python call minus the core's own time
   per ``fsa::forward`` call measured in a C++ loop (``_C._time_forward``, same inputs, same
   threads). Reported for inference (no grad) and for a forward that records autograd.
2. ``create_mask(type="topk")`` on a (1, 8, 1, 65536) bias against the reference project's torch
   implementation of the same function (re-expressed below for timing; see ``reference_*``).

Timings: warm-up, then the median over repeats of a timed loop (this machine is shared, so the
median is the robust statistic); both sides run on the same machine in the same process.

    .venv/bin/python bench/python_overhead.py [--repeats 15] [--json out.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch

import flash_sparse_attn
from flash_sparse_attn import _C, flash_sparse_attn_func
from flash_sparse_attn.utils.mask import create_mask


def median_time(fn, calls, repeats, warmup=None):
    for _ in range(warmup if warmup is not None else max(calls // 10, 1)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


# ---- 1. call overhead ----------------------------------------------------------------------------


def overhead(repeats):
    shape = dict(b=1, sq=16, sk=16, h=1, hk=1, d=32)
    q = torch.randn(shape["b"], shape["sq"], shape["h"], shape["d"])
    k = torch.randn(shape["b"], shape["sk"], shape["hk"], shape["d"])
    v = torch.randn(shape["b"], shape["sk"], shape["hk"], shape["d"])
    out = torch.empty_like(q)
    calls = 20000

    def kernel_only():
        return _C._time_forward(q, k, v, out, calls)

    kernel = statistics.median(kernel_only() for _ in range(repeats))
    no_grad = median_time(lambda: flash_sparse_attn_func(q, k, v), calls, repeats)
    qg = q.clone().requires_grad_()
    with_grad = median_time(lambda: flash_sparse_attn_func(qg, k, v), calls // 4, repeats)
    sdpa_q, sdpa_k, sdpa_v = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = median_time(
        lambda: torch.nn.functional.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v),
        calls, repeats)
    return {
        "shape (B,Sq,Sk,H,Hk,D)": "(1,16,16,1,1,32) float32",
        "kernel_us (C++ loop)": kernel * 1e6,
        "call_us (no grad)": no_grad * 1e6,
        "overhead_us (no grad)": (no_grad - kernel) * 1e6,
        "call_us (autograd forward)": with_grad * 1e6,
        "overhead_us (autograd forward)": (with_grad - kernel) * 1e6,
        "torch_sdpa_call_us (context)": sdpa * 1e6,
    }


# ---- 2. create_mask(type="topk") vs the reference's torch implementation -------------------------
#
# The functions below re-express, for timing only, what flash-sparse-attn 1.2.3
# (flash_sparse_attn/utils/mask.py: create_mask -> topk_mask -> block_smooth; Apache-2.0,
# Copyright 2025 Jingze Shi and Liangdong Wang) does with torch ops: a masked_fill of the bias,
# torch.topk along the keys, a zeros_like bool mask scattered with "value != min_dtype", then
# block smoothing by viewing the key dim as (blocks, block_size). Same inputs, same outputs
# (checked below), so the two timings compare like with like.


def reference_block_smooth(mask, key_len, block_size):
    full = (key_len // block_size) * block_size
    if full:
        blocks = mask[..., :full].view(*mask.shape[:-1], full // block_size, block_size)
        keep = blocks.sum(dim=-1).to(torch.int64) * 2 > block_size
        blocks.copy_(keep.unsqueeze(-1).expand_as(blocks))
    if key_len > full:
        tail = mask[..., full:]
        keep = tail.sum(dim=-1, keepdim=True).to(torch.int64) * 2 > tail.shape[-1]
        tail.copy_(keep.expand_as(tail))
    return mask


def reference_create_mask_topk(bias, mask_2d, batch_size, query_len, key_len, window_size,
                               min_dtype, block_size=None):
    mask = None
    if mask_2d is not None:  # the (batch, key_len) case
        mask = mask_2d.view(batch_size, 1, 1, key_len)
    bias = bias.detach()
    if mask is not None:
        bias = bias.masked_fill(~mask, min_dtype)
    values, indices = torch.topk(bias, window_size, dim=-1, largest=True, sorted=False)
    result = torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, indices, values != min_dtype)
    if block_size is not None and block_size > 1:
        result = reference_block_smooth(result, result.shape[-1], block_size)
    return result


def topk(repeats):
    batch, heads, key_len = 1, 8, 65536
    # Distinct values: with ties top-k's choice is unspecified and the outputs could differ.
    bias = (torch.randperm(batch * heads * key_len).float() / key_len).view(batch, heads, 1,
                                                                              key_len)
    padding = torch.ones(batch, key_len, dtype=torch.bool)
    padding[:, :1000] = False
    min_dtype = torch.finfo(bias.dtype).min
    rows = []
    for window, mask_2d, block in ((2048, None, None), (256, None, None), (8192, None, None),
                                   (2048, padding, None), (2048, padding, 64)):
        ours_fn = lambda: create_mask(bias, mask_2d, batch, 1, key_len, window, min_dtype,
                                      block_size=block, type="topk")
        ref_fn = lambda: reference_create_mask_topk(bias, mask_2d, batch, 1, key_len, window,
                                                    min_dtype, block_size=block)
        assert torch.equal(ours_fn(), ref_fn()), "outputs differ"
        ours = median_time(ours_fn, 20, repeats, warmup=5)
        ref = median_time(ref_fn, 20, repeats, warmup=5)
        rows.append({
            "window": window,
            "mask": "2-D padding" if mask_2d is not None else "none",
            "block_size": block,
            "ours_ms": ours * 1e3,
            "reference_torch_ms": ref * 1e3,
            "speedup": ref / ours,
        })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "fsa_threads": _C.num_threads(),
        "flash_sparse_attn": flash_sparse_attn.__version__,
    }
    result = {"machine": info, "overhead": overhead(args.repeats), "topk": topk(args.repeats)}

    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    print("\nflash_sparse_attn_func call overhead, (1,16,16,1,1,32) float32, CPU")
    for key, value in result["overhead"].items():
        print(f"  {key:32s} {value if isinstance(value, str) else f'{value:8.2f}'}")
    print("\ncreate_mask(type='topk') on a (1, 8, 1, 65536) float32 bias")
    print(f"  {'window':>6} {'mask':>12} {'block':>5} {'ours ms':>9} {'ref torch ms':>13} "
          f"{'speedup':>8}")
    for r in result["topk"]:
        print(f"  {r['window']:6d} {r['mask']:>12} {str(r['block_size']):>5} {r['ours_ms']:9.3f} "
              f"{r['reference_torch_ms']:13.3f} {r['speedup']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
