"""Malformed-input fuzz of the Python API (issue #13): seeded random calls of
flash_sparse_attn_func on CPU tensors, each valid and small with zero to two random defects
(a rank, a dim off by one, a dtype, a non-contiguous last dim, a scalar option, top-k
arguments, a deterministic flag). Every call either raises ValueError / TypeError /
NotImplementedError whose message starts with an argument's name, or returns a finite output
(and its gradients when they are asked for). The same for the other entry points, each with its
own argument names: packed sequences (flash_sparse_attn_varlen_func), K / V caches
(flash_sparse_attn_with_kvcache) and the mask utilities (create_mask, create_block_mask). The
counts of calls are printed for the CI log."""

import itertools
import math
import random

import pytest
import torch

from flash_sparse_attn import (flash_sparse_attn_func, flash_sparse_attn_varlen_func,
                               flash_sparse_attn_with_kvcache)
from flash_sparse_attn.utils.mask import create_block_mask, create_mask

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


# ---- the other entry points: packed sequences, K / V caches, the mask utilities -----------------

VARLEN_ARGUMENTS = ("query", "key", "value", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                    "max_seqlen_k", "attn_mask", "attn_bias", "topk", "topk_causal")
CACHE_ARGUMENTS = ("q", "k_cache", "v_cache", "cache_seqlens", "page_table", "attn_bias",
                   "softmax_scale")
MASK_ARGUMENTS = ("attention_bias", "attention_mask", "batch_size", "query_len", "key_len",
                  "window_size", "min_dtype", "block_size", "type", "num_blocks", "reduce")


def damage_shape(rng, shape):
    shape = list(shape)
    kind = rng.randrange(3)
    if kind == 0 and shape:
        shape.pop()
    elif kind == 1:
        shape.append(rng.choice([1, 2]))
    elif shape:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice([-1, 1, 5]))
    return shape


def damage_tensor(rng, shapes, dtypes, bad_dtypes):
    """One defect of a random tensor of the call: its shape, or its dtype."""
    name = rng.choice(sorted(shapes))
    if rng.random() < 0.5:
        shapes[name] = damage_shape(rng, shapes[name])
    else:
        dtypes[name] = rng.choice(bad_dtypes)


def offsets(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def varlen_call(rng):
    """flash_sparse_attn_varlen_func over 1-3 packed sequences (some empty), with gradients half
    the time; defects: a shape, a dtype, an offset out of order or range, the offsets' dtype or
    rank, topk, max_seqlen_q."""
    n = rng.choice([1, 2, 3])
    lens_q = [rng.choice([0, 1, 5, 70]) for _ in range(n)]
    lens_k = [rng.choice([0, 1, 7, 90]) for _ in range(n)]
    h, hk = rng.choice([(2, 1), (2, 2), (4, 2)])
    d, dtype = rng.choice([8, 16]), rng.choice([torch.float32, torch.bfloat16])
    shapes = {"query": [sum(lens_q), h, d], "key": [sum(lens_k), hk, d],
              "value": [sum(lens_k), hk, d]}
    dtypes = dict.fromkeys(shapes, dtype)
    kwargs = {"is_causal": rng.random() < 0.5}
    if rng.random() < 0.5:
        shapes["attn_bias"] = [rng.choice([1, hk, h]), sum(lens_k)]
        dtypes["attn_bias"] = rng.choice([dtype, torch.float32])
        if rng.random() < 0.4:
            kwargs["topk"] = rng.choice([1, 4, 100])
            kwargs["topk_causal"] = kwargs["is_causal"] and rng.random() < 0.5
    if rng.random() < 0.3:
        shapes["attn_mask"] = [rng.choice([1, hk, h]), sum(lens_k)]
        dtypes["attn_mask"] = torch.bool
    cu = {"cu_seqlens_q": offsets(lens_q), "cu_seqlens_k": offsets(lens_k)}
    for _ in range(rng.choice([0, 1, 1, 2])):
        kind = rng.randrange(5)
        if kind == 0:
            damage_tensor(rng, shapes, dtypes,
                          [torch.float64, torch.int32, torch.bool, torch.float16])
        elif kind == 1:
            name = rng.choice(sorted(cu))
            c = cu[name].clone().reshape(-1)  # (a defect may have made it 2-D or float)
            j = rng.randrange(len(c))
            c[j] = rng.choice([-1, 1 << 20, int(c[j]) + 1, int(c[j]) - 1])
            cu[name] = c.reshape(cu[name].shape)
        elif kind == 2:
            name = rng.choice(sorted(cu))
            cu[name] = rng.choice([cu[name].long(), cu[name].float(), cu[name][:-1],
                                   cu[name].reshape(1, -1)])
        elif kind == 3:
            kwargs["topk"] = rng.choice([0, -2, 2.5, True])
        else:
            kwargs["max_seqlen_q"] = rng.choice([0, -1, 1 << 20])
    tensors = {n: make(s, dtypes[n], False) for n, s in shapes.items()}
    grad = rng.random() < 0.5 and all(
        tensors[n].is_floating_point() for n in ("query", "key", "value"))

    def call():
        if grad:
            for n in ("query", "key", "value"):
                tensors[n].requires_grad_(True)
        out = flash_sparse_attn_varlen_func(
            tensors["query"], tensors["key"], tensors["value"], cu["cu_seqlens_q"],
            cu["cu_seqlens_k"], attn_mask=tensors.get("attn_mask"),
            attn_bias=tensors.get("attn_bias"), **kwargs)
        if grad:
            out.float().sum().backward()
            return [out] + [tensors[n].grad for n in ("query", "key", "value")]
        return [out]
    return call


def cache_call(rng):
    """flash_sparse_attn_with_kvcache over a contiguous or a paged cache, with or without lengths;
    defects: a shape, a dtype, a length or a page out of range, the lengths' shape, the scale."""
    b, sq = rng.choice([1, 2]), rng.choice([1, 2, 5])
    h, hk = rng.choice([(2, 1), (4, 2)])
    d, dtype = rng.choice([8, 16]), rng.choice([torch.float32, torch.bfloat16])
    table = None
    if rng.random() < 0.5:
        pages, page_size, max_pages = rng.choice([1, 3, 6]), rng.choice([4, 16]), rng.choice([1, 3])
        cache = [pages, page_size, hk, d]
        table = torch.randint(0, pages, (b, max_pages), dtype=torch.int32)
        sk = max_pages * page_size
    else:
        sk = rng.choice([1, 9, 40])
        cache = [b, sk, hk, d]
    shapes = {"q": [b, sq, h, d], "k_cache": cache, "v_cache": list(cache)}
    dtypes = dict.fromkeys(shapes, dtype)
    if rng.random() < 0.4:
        shapes["attn_bias"] = [b, rng.choice([1, hk, h]), 1, sk]
        dtypes["attn_bias"] = dtype
    lengths = torch.randint(0, sk + 1, (b,), dtype=torch.int32) if rng.random() < 0.7 else None
    kwargs = {"is_causal": rng.random() < 0.5}
    for _ in range(rng.choice([0, 1, 1, 2])):
        kind = rng.randrange(5)
        if kind == 0:
            damage_tensor(rng, shapes, dtypes, [torch.float64, torch.int32, torch.float16])
        elif kind == 1 and lengths is not None:
            lengths = lengths.clone()
            lengths[0] = rng.choice([-1, sk + 1, 1 << 20])
        elif kind == 2 and table is not None:
            table = table.clone()
            table[0, 0] = rng.choice([-1, 1 << 20, (1 << 31) - 1])
        elif kind == 3:
            lengths = torch.zeros(b + 1, dtype=rng.choice([torch.int32, torch.int64]))
        else:
            kwargs["softmax_scale"] = rng.choice([-1.0, math.nan])
    tensors = {n: make(s, dtypes[n], False) for n, s in shapes.items()}

    def call():
        with torch.no_grad():
            return [flash_sparse_attn_with_kvcache(
                tensors["q"], tensors["k_cache"], tensors["v_cache"], cache_seqlens=lengths,
                page_table=table, attn_bias=tensors.get("attn_bias"), **kwargs)]
    return call


def mask_call(rng):
    """create_mask or create_block_mask on a bias (B, H, {1|Sq}, Sk); defects: its shape or dtype,
    the window, the fill, the block size, the mask type, num_blocks, query_len, reduce."""
    b, h, sq, sk = (rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 5, 130]),
                    rng.choice([1, 9, 200]))
    shape = [rng.choice([1, b]), h, rng.choice([1, sq]), sk]
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    block = rng.random() < 0.5
    if block:
        kwargs = {"attention_bias": None, "query_len": sq, "num_blocks": rng.choice([0, 1, 3]),
                  "block_size": rng.choice([128, 64, (64, 128), 7]),
                  "is_causal": rng.random() < 0.5, "reduce": rng.choice(["max", "mean"])}
        bad = {"query_len": [-1, 2.5], "num_blocks": [-1, 1.5], "block_size": [0, -1, (1, 2, 3),
                                                                              True],
               "reduce": ["sum"]}
    else:
        mask = None
        if rng.random() < 0.4:
            mask = make(rng.choice([[b, sk], [b, 1, 1, sk]]), torch.bool, False)
        kwargs = {"attention_bias": None, "attention_mask": mask, "batch_size": b,
                  "query_len": sq, "key_len": sk, "window_size": rng.choice([1, 3, 1 << 20]),
                  "min_dtype": rng.choice([None, -1e4]),
                  "block_size": rng.choice([None, None, 1, 4]),
                  "type": rng.choice(["topk", "topk", "relu"])}
        bad = {"window_size": [0, -1, 2.5], "min_dtype": [math.nan], "block_size": [0, -3],
               "type": ["softmax"],
               "attention_mask": [make([b, 3], torch.bool, False), make([b, sk], torch.int32,
                                                                        False)]}
    for _ in range(rng.choice([0, 1, 1, 2])):
        kind = rng.randrange(3)
        if kind == 0:
            shape = damage_shape(rng, shape)
        elif kind == 1:
            dtype = rng.choice([torch.int32, torch.bool, torch.float64])
        else:
            name = rng.choice(sorted(bad))
            kwargs[name] = rng.choice(bad[name])
    kwargs["attention_bias"] = make(shape, dtype, False)
    fn = create_block_mask if block else create_mask
    return lambda: [fn(**kwargs)]


def fuzz_entry_points(seed, calls_wanted):
    """Runs calls_wanted calls, the three kinds in turn; returns {kind: (calls, accepted)}."""
    rng = random.Random(seed)
    kinds = ((varlen_call, VARLEN_ARGUMENTS), (cache_call, CACHE_ARGUMENTS),
             (mask_call, MASK_ARGUMENTS))
    counts = {kind.__name__: [0, 0] for kind, _ in kinds}
    for i in range(calls_wanted):
        kind, arguments = kinds[i % len(kinds)]
        call = kind(rng)
        counts[kind.__name__][0] += 1
        try:
            results = call()
        except (ValueError, TypeError, NotImplementedError) as e:
            message = str(e)
            assert message.split(":")[0] in arguments, \
                f"{kind.__name__}: an error that names no argument: {message}"
            continue
        counts[kind.__name__][1] += 1
        for r in results:
            assert not (r.is_floating_point() and r.isnan().any()), f"{kind.__name__}: NaN"
    return counts


@pytest.mark.parametrize("seed", [5, 2027])
def test_other_entry_points_raise_naming_an_argument_or_run_cleanly(seed, capsys):
    counts = fuzz_entry_points(seed, 600)
    with capsys.disabled():
        print(f"\npython malformed-input fuzz of the other entry points (seed {seed}): "
              + ", ".join(f"{k} {c} calls, {a} accepted" for k, (c, a) in counts.items()))
    for kind, (calls, accepted) in counts.items():
        assert calls // 10 < accepted < calls, kind
