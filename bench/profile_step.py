"""Where a training step's time goes: torch.profiler over whole steps of bench/train_step.py's
Doge-style model, and over one layer's attention call, per variant (CUDA only).

    python3 bench/profile_step.py [--tokens 16384] [--variants fsa,fsa-rows,sdpa-cudnn] [--top 30]

For each variant it prints the step's wall time (median of 5, synchronized), the kernels of a
step by self device time (count per step), and for one layer's attention forward + backward: the
host time of the call without a sync (what the CPU needs to queue it), its CUDA-event time, and
its kernels. A call whose host time is close to or above its event time is launch-bound when it
runs alone; inside a step the host runs ahead of the GPU, so the step pays its kernels only.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402  (bench/train_step.py: the model, its variants, the timers)


def print_kernels(prof, steps: int, top: int, title: str) -> None:
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    print(f"== {title}: self device time {total:.3f} ms per step (operators and their kernels)")
    for e in events[:top]:
        print(f"  {e.self_device_time_total / steps / 1000:8.3f} ms  x{e.count / steps:<5.1f} "
              f"{e.key[:110]}")


def profile_variant(name, base, cfg, tokens, top, device) -> None:
    model = copy.deepcopy(base)
    attend = ts.VARIANTS[name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens, attend).backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    print(f"## {name}, {tokens.shape[1] - 1} tokens: step {statistics.median(walls):.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print_kernels(prof, 3, top, f"{name}, one step")

    call = ts.record_attention_inputs(model, tokens, attend)[0]
    dout = torch.randn(call[1].shape[0], call[1].shape[2], cfg.heads, cfg.head_dim,
                       device=device, dtype=call[1].dtype)
    run, _ = ts.attention_fwd_bwd(attend, call, dout)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        start = time.perf_counter()
        run()
        host.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    event = ts.median_ms(run, 10, 3, device)
    print(f"   one layer's attention fwd+bwd: host {statistics.median(host):.3f} ms (no sync), "
          f"CUDA events {event:.3f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print_kernels(prof, 5, top, f"{name}, one layer's attention fwd+bwd")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--variants", default="fsa,fsa-rows,sdpa-cudnn")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA device")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in ts.VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {sorted(ts.VARIANTS)}")
    device = torch.device("cuda")
    cfg = ts.Config()
    torch.manual_seed(0)
    base = ts.DogeStyleLM(cfg).to(device, torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab, (1, args.tokens + 1), device=device)
    for name in variants:
        profile_variant(name, base, cfg, tokens, args.top, device)


if __name__ == "__main__":
    main()
