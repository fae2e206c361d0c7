"""Malformed-input fuzz of the Python API (issue #13): seeded random calls of
flash_sparse_attn_func on CPU tensors, each valid and small with zero to two random defects
(a rank, a dim off by one, a dtype, a non-contiguous last dim, a scalar option, top-k
arguments, a deterministic flag). Every call either raises ValueError / TypeError /
NotImplementedError whose message starts with an argument's name, or returns a finite output
(and its gradients when they are asked for). The count of calls is printed for the CI log."""

import math
import random

import pytest
import torch

from flash_sparse_attn import flash_sparse_attn_func

ARGUMENTS = ("query", "key", "value", "attn_mask", "attn_bias", "softmax_scale", "softcap",
             "topk", "topk_causal", "block_mask", "block_size", "deterministic", "plan")


def random_call(rng):
    b, hk = rng.choice([1, 2]), rng.choice([1, 2])
    h = hk * rng.choice([1, 2])
    sq, sk, d = rng.choice([1, 3, 9, 130]), rng.choice([1, 4, 11, 140]), rng.choice([1, 8, 17])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    shapes = {"query": [b, sq, h, d], "key": [b, sk, hk, d], "value": [b, sk, hk, d]}
    if rng.random() < 0.5:
        shapes["attn_mask"] = [rng.choice([1, b]), rng.choice([1, hk, h]),
                               rng.choice([1, sq]), rng.choice([1, sk])]
    if rng.random() < 0.5:
        shapes["attn_bias"] = [rng.choice([1, b]), rng.choice([1, hk, h]),
                               rng.choice([1, sq]), sk]
    kwargs = {"is_causal": rng.random() < 0.5, "deterministic": rng.random() < 0.3}
    if rng.random() < 0.3:
        kwargs["softmax_scale"] = 0.1 + rng.random()
    if rng.random() < 0.2:
        kwargs["softcap"] = 1.0 + 10 * rng.random()
    if "attn_bias" in shapes and rng.random() < 0.3:
        kwargs["topk"] = rng.choice([1, 3, 50])
        kwargs["topk_causal"] = kwargs["is_causal"] and shapes["attn_bias"][2] == 1
    dtypes = {name: dtype for name in ("query", "key", "value")}
    dtypes["attn_mask"] = torch.bool
    dtypes["attn_bias"] = rng.choice([dtype, torch.float32])
    return shapes, dtypes, kwargs, {}


def damage(rng, shapes, dtypes, kwargs, strided):
    name = rng.choice(sorted(shapes))
    kind = rng.randrange(8)
    if kind == 0:
        shapes[name] = shapes[name][:-1] if rng.random() < 0.5 else shapes[name] + [1]
    elif kind == 1:
        i = rng.randrange(len(shapes[name]))
        shapes[name][i] = max(0, shapes[name][i] + rng.choice([-1, 1]))
    elif kind == 2:
        dtypes[name] = rng.choice([torch.float64, torch.int32, torch.bool, torch.float16])
    elif kind == 3:
        strided[name] = True
    elif kind == 4:
        kwargs["softmax_scale"] = rng.choice([-1.0, math.nan, math.inf])
    elif kind == 5:
        kwargs["softcap"] = rng.choice([-1.0, math.nan])
    elif kind == 6:
        kwargs["topk"] = rng.choice([0, -3, 2.5, True])
    else:
        kwargs["topk_causal"] = True


def make(shape, dtype, strided, device="cpu"):
    if dtype == torch.bool:
        t = torch.rand(shape, device=device) < 0.7
    elif dtype.is_floating_point:
        t = torch.randn(shape, device=device).to(dtype)
    else:
        t = torch.randint(0, 3, shape, dtype=dtype, device=device)
    if strided and t.dim() > 0:
        t = torch.stack([t, t], dim=-1).select(-1, 0)  # the last dim's stride becomes 2
        if t.stride(-1) == 1:
            t = t.transpose(-1, 0)
    return t


def fuzz(seed, calls_wanted, device="cpu"):
    """Runs the fuzz; returns (calls, rejected, accepted). On CUDA, float32 inputs are among the
    valid calls' rejections (the CUDA kernels take fp16 / bf16)."""
    rng = random.Random(seed)
    calls = rejected = accepted = 0
    for _ in range(calls_wanted):
        shapes, dtypes, kwargs, strided = random_call(rng)
        for _ in range(rng.choice([0, 1, 1, 2])):
            damage(rng, shapes, dtypes, kwargs, strided)
        tensors = {n: make(s, dtypes[n], strided.get(n, False), device)
                   for n, s in shapes.items()}
        grad = rng.random() < 0.5 and all(
            tensors[n].is_floating_point() for n in ("query", "key", "value"))
        if grad:
            for n in ("query", "key", "value"):
                tensors[n].requires_grad_(True)
        calls += 1
        try:
            out = flash_sparse_attn_func(
                tensors["query"], tensors["key"], tensors["value"],
                attn_mask=tensors.get("attn_mask"), attn_bias=tensors.get("attn_bias"), **kwargs)
            if grad:
                out.float().sum().backward()
        except (ValueError, TypeError, NotImplementedError) as e:
            rejected += 1
            message = str(e)
            assert message.split(":")[0] in ARGUMENTS, f"error names no argument: {message}"
            continue
        accepted += 1
        assert not out.isnan().any(), f"NaN output: {shapes} {kwargs}"
        if grad:
            for n in ("query", "key", "value"):
                assert not tensors[n].grad.isnan().any(), f"NaN d{n}: {shapes} {kwargs}"
    return calls, rejected, accepted


@pytest.mark.parametrize("seed", [1313, 7, 2026])
def test_python_api_raises_naming_an_argument_or_runs_cleanly(seed, capsys):
    calls, rejected, accepted = fuzz(seed, 500)
    with capsys.disabled():  # the count goes to the CI log
        print(f"\npython malformed-input fuzz (seed {seed}): {calls} calls, {rejected} rejected "
              f"naming an argument, {accepted} accepted")
    assert rejected > calls // 3 and accepted > calls // 10
