#!/usr/bin/env python3
"""One training step of a small Doge-style decoder: flash_sparse_attn's trainable top-k attention
against the same model on PyTorch SDPA dense causal (issue #12's bar: a step at 16K tokens
<= 0.8x and at 32K tokens <= 0.6x the SDPA step), all variants in one process.

The model, plain torch, bf16 weights, activations and AdamW states:
  token embedding (vocab 32000, a Llama-sized vocabulary)
  4 x [RMSNorm -> attention -> residual, RMSNorm -> gated MLP -> residual]
  RMSNorm -> LM head -> cross entropy on the next token (logits in float32)
  attention: hidden 1024, 8 query heads, 2 kv heads, head dim 128, RoPE on q and k, and per layer a
    key bias A * softplus(dt_proj(V)) of shape (B, Hk, 1, S): dt_proj a Linear(Hk*D -> Hk) over the
    value states, A a learned (Hk,) parameter, as in the reference project's Doge model
  gated MLP: down(silu(gate(x)) * up(x)), intermediate size 4096
Initialization: torch's defaults, and A = 1. The bias then varies from key to key (the tokens are
random), so the top-k keys lie scattered over the sequence as in a trained model; Doge's own A = 0
would make the bias constant and its top-k the first `window` keys (the tie rule), a contiguous
best case.

Attention variants (same initial weights, same tokens):
  fsa          flash_sparse_attention_forward(module, q, k, v, attention_mask=None,
               attention_bias=bias, window_size=2048, is_causal=True), the transformers
               integration: create_mask keeps the global top-2048 keys per (batch, kv head), the
               kernel adds the bias and causality
  fsa-rows     the same call with the 4-D causal mask a transformers model passes (1, 1, S, S):
               create_mask then keeps each row's top-2048 keys among those causality lets it see
               (the reference's per-row selection), run as per-row top-k (topk_causal) over the
               keys some row keeps
  sdpa-cudnn   torch SDPA with the cuDNN backend, dense causal; the dynamic mask and the bias are
               ignored (dt_proj and A get no gradient)
  sdpa-flash   the same with the flash backend
  flex-gather  bench/sweep.py's flex_gather, compiled: the floor a user can write in torch
               (gather the top-2048 keys, FlexAttention over them with the bias as score_mod)
  sdpa-math    SDPA's math backend: the CPU stand-in of --smoke

Reported per variant and length (batch 1): the median step time (forward + backward + AdamW step;
CUDA events, after warmup steps), the attention alone (forward + backward of one layer's attention
call on that layer's recorded inputs, times the layers) and its share of the step, the peak memory
of the steps (torch.cuda.max_memory_allocated), and the step time over the best SDPA variant's
against issue #12's bars. The table comes last; --json writes every number.

Before anything is timed, the fsa variant is checked at 512 tokens, window 128 (so that the top-k
selection matters), against an eager reference that builds the same mask with create_mask and runs
softmax attention with the bias in float64 (inputs rounded to bf16 as the kernel gets them):
  - per layer, on that layer's recorded q, k, v and bias, with a random output gradient: out, dq,
    dk, dv, dbias;
  - the model's loss, each layer's attention replaced by the reference.
The tolerance is SPEC.md's pass rule: max|fsa - float64| <= 2 * max|naive - float64| + atol, where
naive is the same eager math in bf16 (the error any bf16 implementation makes). atol is 4e-3 times
the largest |value| of the float64 tensor (the SPEC's bf16 atol, scaled because gradients are far
from magnitude 1), and 1e-4 times the loss for the loss (a mean over every token, which the
attention's rounding moves far less than one element). A failed check marks the fsa rows, which are
still timed, and makes the exit status 1.

    python3 bench/train_step.py [--sizes 16384,32768] [--variants fsa,sdpa-cudnn,...]
                                [--reps 10] [--warmup 3] [--json out.json]
    python3 bench/train_step.py --smoke   # a tiny model on the CPU: the code paths, not timings
                                          # (flex-gather fails there: no FlexAttention CPU backward)
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_sparse_attn
from flash_sparse_attn.integrations.flash_sparse_attention import flash_sparse_attention_forward
from flash_sparse_attn.utils.mask import create_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402  (bench/sweep.py: flex_gather, the FlexAttention peer)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 32000
    hidden: int = 1024
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 4096
    window: int = 2048
    check_tokens: int = 512
    check_window: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6


SMOKE = Config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
               window=16, check_tokens=64, check_window=16)
SDPA_BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-math": SDPBackend.MATH}
BARS = {16384: 0.8, 32768: 0.6}  # issue #12: fsa step / SDPA step


# ---- the model -----------------------------------------------------------------------------------


def rope_tables(seq_len, head_dim, theta, device, dtype):
    """cos, sin (S, D) of the rotary embedding (the two halves of the head dim rotate together)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device) / head_dim)
    angles = torch.arange(seq_len, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, S, heads, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.window_size = cfg.window
        self.is_causal = True
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        self.dt_proj = nn.Linear(cfg.kv_heads * cfg.head_dim, cfg.kv_heads, bias=False)
        self.A = nn.Parameter(torch.ones(cfg.kv_heads))

    def forward(self, x, cos, sin, attend):
        """attend(module, q, k, v, bias) with head-first q (B, H, S, D), k / v (B, Hk, S, D) (the
        transformers convention) and bias (B, Hk, 1, S); returns (B, S, H, D)."""
        B, S, _ = x.shape
        c = self.cfg
        q = apply_rope(self.q_proj(x).view(B, S, c.heads, c.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, S, c.kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(x).view(B, S, c.kv_heads, c.head_dim)
        dt = self.dt_proj(v.reshape(B, S, c.kv_heads * c.head_dim))                 # (B, S, Hk)
        bias = (self.A * F.softplus(dt)).transpose(1, 2).unsqueeze(2)              # (B, Hk, 1, S)
        out = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)
        return self.o_proj(out.reshape(B, S, c.heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend):
        x = x + self.attn(self.attn_norm(x), cos, sin, attend)
        return x + self.mlp(self.mlp_norm(x))


class DogeStyleLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens, attend):
        """Mean next-token cross entropy of tokens (B, S + 1)."""
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        x = self.embed(inputs)
        cos, sin = rope_tables(inputs.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device,
                               x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def set_window(self, window):
        for layer in self.layers:
            layer.attn.window_size = window


# ---- attention variants: attend(module, q, k, v, bias) -> (B, S, H, D) ---------------------------


def attend_fsa(module, q, k, v, bias):
    return flash_sparse_attention_forward(module, q, k, v, attention_mask=None,
                                          attention_bias=bias, window_size=module.window_size,
                                          is_causal=True)[0]


_causal_masks = {}


def causal_mask(seq_len, device):
    """The (1, 1, S, S) bool causal mask, one tensor per length and device (a transformers model
    builds one per forward and hands it to every layer; the integration checks it once)."""
    key = (seq_len, str(device))
    if key not in _causal_masks:
        _causal_masks.clear()
        _causal_masks[key] = torch.ones(seq_len, seq_len, dtype=torch.bool,
                                        device=device).tril()[None, None]
    return _causal_masks[key]


def attend_fsa_rows(module, q, k, v, bias):
    return flash_sparse_attention_forward(module, q, k, v,
                                          attention_mask=causal_mask(q.shape[2], q.device),
                                          attention_bias=bias, window_size=module.window_size,
                                          is_causal=True)[0]


def attend_sdpa(backend):
    def attend(module, q, k, v, bias):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=True).transpose(1, 2)
    return attend


def attend_flex_gather(module, q, k, v, bias):
    # Compiled FlexAttention on CUDA; elsewhere (the --smoke forward) the uncompiled one.
    return sweep.flex_gather(q, k, v, bias, module.window_size).transpose(1, 2)


def attend_eager(dtype, per_row=False):
    """The check's reference (float64) and naive (bf16) attention: the mask from create_mask as
    flash_sparse_attention_forward builds it (per_row: given the causal 4-D mask), causal,
    softmax(q k^T / sqrt(D) + bias) v in `dtype`; the output goes back to q's dtype, as the model
    continues in it."""
    def attend(module, q, k, v, bias):
        B, H, S, D = q.shape
        G = H // k.shape[1]
        mask = create_mask(bias, causal_mask(S, q.device) if per_row else None, B, S, S,
                           module.window_size, torch.finfo(bias.dtype).min)
        keep = mask.repeat_interleave(G, dim=1) & torch.ones(S, S, dtype=torch.bool,
                                                             device=q.device).tril()
        kx, vx = (t.to(dtype).repeat_interleave(G, dim=1) for t in (k, v))
        scores = q.to(dtype) @ kx.transpose(-1, -2) / math.sqrt(D)
        scores = (scores + bias.to(dtype).repeat_interleave(G, dim=1)).masked_fill(~keep, -math.inf)
        # A row that keeps no key (the global top-k leaves early rows empty) is 0 (SPEC.md): its
        # softmax is NaN, and masked_fill's backward gives its scores a zero gradient.
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return (probs @ vx).transpose(1, 2).to(q.dtype)
    return attend


VARIANTS = {"fsa": attend_fsa, "fsa-rows": attend_fsa_rows, "flex-gather": attend_flex_gather,
            **{name: attend_sdpa(backend) for name, backend in SDPA_BACKENDS.items()}}


# ---- measuring -----------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, reps, warmup, device):
    """Median of `reps` calls after `warmup` calls: CUDA events on the GPU, wall time elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def record_attention_inputs(model, tokens, attend):
    """[(module, q, k, v, bias)] of every layer's attention call in one forward without grad."""
    calls = []

    def recording(module, q, k, v, bias):
        calls.append((module, q, k, v, bias))
        return attend(module, q, k, v, bias)

    with torch.no_grad():
        model(tokens, recording)
    return calls


def attention_fwd_bwd(attend, call, dout):
    """A closure running forward + backward of one recorded attention call, its inputs as leaves
    (with their strides: q, k, v are transposed views in the model)."""
    module, *inputs = call
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        attend(module, *leaves).backward(dout)
    return run, leaves


def time_variant(name, base, cfg, tokens, reps, warmup, device):
    """One variant at one length: a row with step_ms, attention_ms, peak_gib."""
    model = copy.deepcopy(base)
    attend = VARIANTS[name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens, attend).backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = median_ms(step, reps, warmup, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    call = record_attention_inputs(model, tokens, attend)[0]
    dout = torch.randn(call[1].shape[0], call[1].shape[2], cfg.heads, cfg.head_dim,
                       device=device, dtype=call[1].dtype)
    run, _ = attention_fwd_bwd(attend, call, dout)
    attention_ms = cfg.layers * median_ms(run, reps, warmup, device)
    return {"step_ms": step_ms, "attention_ms": attention_ms,
            "attention_share": attention_ms / step_ms, "peak_gib": peak_gib}


# ---- the check -----------------------------------------------------------------------------------


def pass_rule(ours, ref, naive, rel_atol=4e-3):
    """SPEC.md's rule: max|ours - ref| <= 2 max|naive - ref| + rel_atol max|ref|, no NaN."""
    err = (ours.double() - ref).abs().max().item()
    bound = 2 * (naive.double() - ref).abs().max().item() + rel_atol * ref.abs().max().item()
    return {"err": err, "bound": bound, "ok": bool(err <= bound and not torch.isnan(ours).any())}


def check_fsa(base, cfg, device, variant="fsa"):
    """The fsa (or fsa-rows) variant against float64 (see the module docstring); returns the
    check's record."""
    # Looked up when called (not through VARIANTS), so that a test can swap in a wrong one.
    ours = attend_fsa_rows if variant == "fsa-rows" else attend_fsa
    per_row = variant == "fsa-rows"
    model = copy.deepcopy(base)
    model.set_window(cfg.check_window)
    tokens = torch.randint(cfg.vocab, (1, cfg.check_tokens + 1), device=device)
    ref_attend = attend_eager(torch.float64, per_row)
    naive_attend = attend_eager(torch.bfloat16, per_row)
    results = []
    with torch.no_grad():
        losses = {name: model(tokens, attend).item() for name, attend in
                  (("fsa", ours), ("float64", ref_attend), ("bf16", naive_attend))}
    loss = {name: torch.tensor(value, dtype=torch.float64) for name, value in losses.items()}
    results.append({"what": "loss", **pass_rule(loss["fsa"], loss["float64"], loss["bf16"], 1e-4)})
    for layer, call in enumerate(record_attention_inputs(model, tokens, ours)):
        dout = torch.randn(1, cfg.check_tokens, cfg.heads, cfg.head_dim, device=device,
                           dtype=call[1].dtype)
        values = {}
        for name, attend in (("fsa", ours), ("float64", ref_attend), ("bf16", naive_attend)):
            run, leaves = attention_fwd_bwd(attend, call, dout)
            with torch.no_grad():
                out = attend(call[0], *leaves)
            run()
            # no gradient reaching an input is a zero gradient (what a wrong attention may give)
            values[name] = [out] + [torch.zeros_like(t) if t.grad is None else t.grad
                                    for t in leaves]
        for i, what in enumerate(("out", "dq", "dk", "dv", "dbias")):
            rule = pass_rule(values["fsa"][i], values["float64"][i].double(), values["bf16"][i])
            results.append({"what": f"layer {layer} {what}", **rule})
    ok = all(r["ok"] for r in results)
    worst = max(results, key=lambda r: r["err"] / max(r["bound"], 1e-30))
    print(f"check ({variant} vs float64, {cfg.check_tokens} tokens, window {cfg.check_window}): "
          f"{'ok' if ok else 'FAILED'}; loss {losses['fsa']:.6f} vs {losses['float64']:.6f} "
          f"(bf16 eager {losses['bf16']:.6f}); closest to its bound: {worst['what']} "
          f"{worst['err']:.2e} <= {worst['bound']:.2e}", flush=True)
    for r in results:
        if not r["ok"]:
            print(f"  FAILED {r['what']}: {r['err']:.3e} > {r['bound']:.3e}", flush=True)
    return {"ok": ok, "losses": losses, "results": results}


# ---- driver --------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="tokens per step (default 16384,32768)")
    ap.add_argument("--variants", default=None,
                    help="of: " + ", ".join(VARIANTS) +
                         " (default: fsa,fsa-rows,sdpa-cudnn,sdpa-flash,flex-gather)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model on the CPU (sizes 64,128; 2 timed steps after 1)")
    args = ap.parse_args(argv)

    smoke = args.smoke
    cfg = SMOKE if smoke else Config()
    sizes = [int(s) for s in (args.sizes or ("64,128" if smoke else "16384,32768")).split(",")]
    variants = (args.variants or ("fsa,sdpa-math,flex-gather" if smoke else
                                  "fsa,fsa-rows,sdpa-cudnn,sdpa-flash,flex-gather")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    reps = args.reps or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark times a GPU; --smoke runs a tiny model on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    where = "CPU (smoke)" if smoke else torch.cuda.get_device_name(device)
    print(f"train step: Doge-style {cfg.layers} x (hidden {cfg.hidden}, {cfg.heads} / "
          f"{cfg.kv_heads} heads, D {cfg.head_dim}, MLP {cfg.intermediate}), vocab {cfg.vocab}, "
          f"window {cfg.window}, bf16, batch 1; {where}, torch {torch.__version__}, "
          f"flash_sparse_attn {flash_sparse_attn.__version__}, {time.strftime('%Y-%m-%d')}",
          flush=True)

    torch.manual_seed(0)
    base = DogeStyleLM(cfg).to(device=device, dtype=torch.bfloat16)
    checks = {name: check_fsa(base, cfg, device, name)
              for name in ("fsa", "fsa-rows") if name == "fsa" or name in variants}
    check = checks["fsa"]

    rows = []
    for seq_len in sizes:
        tokens = torch.randint(cfg.vocab, (1, seq_len + 1), device=device)
        for name in variants:
            row = {"variant": name, "tokens": seq_len}
            start = time.perf_counter()
            try:
                row.update(time_variant(name, base, cfg, tokens, reps, warmup, device))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # noqa: BLE001 - a row says what failed
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if name in checks and not checks[name]["ok"]:
                row["note"] = "CHECK FAILED"
            rows.append(row)
            torch.cuda.empty_cache()
            print(f"  {name} at {seq_len}: " + (f"step {row['step_ms']:.2f} ms, attention "
                  f"{row['attention_ms']:.2f} ms" if "step_ms" in row else row["error"]) +
                  f" ({time.perf_counter() - start:.0f} s)", flush=True)

    ratios = fsa_over_sdpa(rows)
    print_table(rows, ratios)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__,
                       "flash_sparse_attn": flash_sparse_attn.__version__,
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "config": dataclasses.asdict(cfg), "reps": reps, "warmup": warmup,
                       "check": check, "checks": checks, "rows": rows,
                       "fsa_over_best_sdpa": ratios}, f, indent=1)
    return 0 if all(c["ok"] for c in checks.values()) else 1


def fsa_over_sdpa(rows):
    """{tokens: {"ratio", "sdpa" (the fastest SDPA variant), "bar"}} where both were timed (and
    "rows_ratio", fsa-rows over the same SDPA variant, where that was timed too)."""
    ratios = {}
    for seq_len in sorted({r["tokens"] for r in rows}):
        timed = {r["variant"]: r["step_ms"] for r in rows
                 if r["tokens"] == seq_len and "step_ms" in r}
        sdpa = {v: ms for v, ms in timed.items() if v in SDPA_BACKENDS}
        if "fsa" in timed and sdpa:
            best = min(sdpa, key=sdpa.get)
            ratios[seq_len] = {"ratio": timed["fsa"] / sdpa[best], "sdpa": best,
                               "bar": BARS.get(seq_len)}
            if "fsa-rows" in timed:
                ratios[seq_len]["rows_ratio"] = timed["fsa-rows"] / sdpa[best]
    return ratios


def print_table(rows, ratios):
    print()
    print(f"{'variant':12s} {'tokens':>7s} {'step ms':>9s} {'attention ms':>13s} {'share':>6s} "
          f"{'peak GiB':>9s}  note")
    for r in rows:
        if "step_ms" not in r:
            print(f"{r['variant']:12s} {r['tokens']:7d} {'-':>9s} {'-':>13s} {'-':>6s} {'-':>9s}  "
                  f"{r['error']}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['variant']:12s} {r['tokens']:7d} {r['step_ms']:9.2f} {r['attention_ms']:13.2f} "
              f"{100 * r['attention_share']:5.0f}% {peak:>9s}  {r.get('note', '')}")
    for seq_len, r in ratios.items():
        verdict = ""
        if r["bar"] is not None:
            met = "met" if r["ratio"] <= r["bar"] else "NOT met"
            verdict = f" (issue #12 bar <= {r['bar']}: {met})"
        if "rows_ratio" in r:
            print(f"fsa-rows / {r['sdpa']} step at {seq_len} tokens: {r['rows_ratio']:.3f}")
        print(f"fsa / {r['sdpa']} step at {seq_len} tokens: {r['ratio']:.3f}{verdict}")


if __name__ == "__main__":
    sys.exit(main())
