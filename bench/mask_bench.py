"""create_mask on CUDA against the same top-k selection written in torch, in the same process.

The bar (issue #11, item 1): at each of the six cases below, create_mask takes at most half the
time of the torch formulation

    filled = bias.masked_fill(~mask, min)             # no masked_fill without a mask
    idx = torch.topk(filled, window, dim=-1).indices
    out = zeros(bool).scatter(-1, idx, True) & (filled != min)

Cases: a per-head key bias (B, H, 1, S) with top-`window` selection, without a mask and with a
causal 4-D mask (1, 1, S, S). Each time is the median over --reps calls of CUDA events recorded
around one call (host overhead included, as a caller sees it), after --warmup calls; outputs are
allocated inside the call by both sides (torch's caching allocator). The timed bias is randn in
--dtype (ties at the threshold are common, as in real use); the check runs both sides once more
on a bias of distinct values (no ties, so the top-k is unique) and requires identical masks.

    python bench/mask_bench.py [--dtype bf16|fp16|fp32] [--reps 20] [--warmup 3] [--json FILE]

Prints a table; exits 1 if a check fails or a case errors (the bar's verdict is in the table and
the JSON, not the exit status).
"""

import argparse
import json
import statistics
import sys
import traceback

import torch

from flash_sparse_attn.utils.mask import create_mask

CASES = [  # (bias shape (B, H, 1, S), window)
    ((1, 1, 1, 8192), 1024),
    ((1, 1, 1, 32768), 1024),
    ((1, 8, 1, 16384), 2048),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BAR = 0.5  # ours / torch


def torch_topk_mask(bias, mask, window, min_value):
    """The selection written in torch (the reference project's create_mask)."""
    filled = bias if mask is None else bias.masked_fill(~mask, min_value)
    idx = torch.topk(filled, window, dim=-1).indices
    out = torch.zeros(filled.shape, dtype=torch.bool, device=bias.device).scatter(-1, idx, True)
    return out & (filled != min_value)


def ours_topk_mask(bias, mask, window, min_value):
    b, _, _, s = bias.shape
    return create_mask(bias, mask, b, s if mask is not None else 1, s, window, min_value)


def median_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def distinct_values(n, dtype, gen):
    """n distinct finite values of `dtype`, none equal to its finfo.min (the fill) or -0.0, in
    random order: a row on which the top-k is unique."""
    if dtype.itemsize == 2:
        pool = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        pool = pool[torch.isfinite(pool) & (pool != torch.finfo(dtype).min)]
        pool = pool[~((pool == 0) & torch.signbit(pool))]  # -0.0 equals +0.0
    else:
        pool = torch.arange(n, dtype=torch.float64).to(dtype) / n - 0.5  # distinct for n < 2^24
    if pool.numel() < n:
        raise ValueError(f"{dtype} has fewer than {n} distinct finite values")
    return pool[torch.randperm(pool.numel(), generator=gen)[:n]]


def distinct_bias(shape, dtype, gen):
    rows = shape[0] * shape[1] * shape[2]
    return torch.stack([distinct_values(shape[3], dtype, gen) for _ in range(rows)]).view(shape)


def run_case(shape, window, causal, dtype, reps, warmup, gen):
    s = shape[3]
    min_value = torch.finfo(dtype).min
    mask = torch.ones(s, s, dtype=torch.bool, device="cuda").tril().view(1, 1, s, s) if causal \
        else None
    bias = torch.randn(shape, generator=gen).to(dtype).cuda()
    ours_ms = median_ms(lambda: ours_topk_mask(bias, mask, window, min_value), reps, warmup)
    torch_ms = median_ms(lambda: torch_topk_mask(bias, mask, window, min_value), reps, warmup)

    check_bias = distinct_bias(shape, dtype, gen).cuda()
    ours = ours_topk_mask(check_bias, mask, window, min_value)
    theirs = torch_topk_mask(check_bias, mask, window, min_value)
    same = torch.equal(ours, theirs)
    differing = 0 if same else int((ours != theirs).sum().item())
    return {
        "shape": list(shape), "window": window, "mask": "causal (1, 1, S, S)" if causal else None,
        "dtype": str(dtype).replace("torch.", ""), "ours_ms": ours_ms, "torch_ms": torch_ms,
        "ratio": ours_ms / torch_ms, "meets_bar": ours_ms <= BAR * torch_ms,
        "check": "identical" if same else f"{differing} entries differ",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mask_bench: needs a CUDA device")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype},"
          f" median of {args.reps} calls after {args.warmup}")
    header = f"{'bias':<18} {'window':>6} {'mask':<8} {'ours ms':>9} {'torch ms':>9} " \
             f"{'ratio':>6} {'bar':<4} check"
    print(header)
    print("-" * len(header))
    results, ok = [], True
    for shape, window in CASES:
        for causal in (False, True):
            label = f"{str(shape):<18} {window:>6} {'causal' if causal else 'none':<8}"
            try:
                r = run_case(shape, window, causal, dtype, args.reps, args.warmup, gen)
            except Exception as e:  # report and go on: one failing case must not hide the others
                traceback.print_exc()
                results.append({"shape": list(shape), "window": window, "causal": causal,
                                "error": f"{type(e).__name__}: {e}"})
                print(f"{label} ERROR {type(e).__name__}: {e}")
                ok = False
                continue
            finally:
                torch.cuda.empty_cache()
            results.append(r)
            ok = ok and r["check"] == "identical"
            print(f"{label} {r['ours_ms']:>9.3f} {r['torch_ms']:>9.3f} {r['ratio']:>6.2f} "
                  f"{'ok' if r['meets_bar'] else 'MISS':<4} {r['check']}")
    met = sum(1 for r in results if r.get("meets_bar"))
    print(f"bar (ours <= {BAR} x torch): {met} of {len(CASES) * 2} cases")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup,
                       "results": results}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
