"""Context parallelism over gloo on the CPU (issue #16): 2 and 4 ranks as processes, each checking
its shard of the output and of every gradient against the single-process call on the whole
sequence (same seed): causal and not, ragged and zigzag shards, GQA, key mask + per-key bias with
its gradient, softcap, the global top-k by bias, and block selections over the whole sequence."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flash_sparse_attn import flash_sparse_attn_func
from flash_sparse_attn.distributed import ring_flash_sparse_attn_func, shard_positions

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# (label, S, layout, causal, mask, bias, softcap, topk, block selection tile)
CASES = [
    ("dense", 37, "contiguous", False, False, False, 0.0, None, None),
    ("causal ragged", 37, "contiguous", True, False, False, 0.0, None, None),
    ("causal zigzag mask+bias", 45, "zigzag", True, True, True, 0.0, None, None),
    ("zigzag mask+bias softcap", 40, "zigzag", False, True, True, 5.0, None, None),
    ("causal zigzag global top-k", 50, "zigzag", True, True, True, 0.0, 11, None),
    # S = 64: zigzag runs of 8 (4 ranks) or 16 (2 ranks) start at multiples of the 4 x 4 tiles
    ("causal zigzag block selection+bias", 64, "zigzag", True, False, True, 0.0, None, 4),
    ("contiguous block selection+mask", 64, "contiguous", False, True, False, 0.0, None, 4),
    ("causal contiguous mask+bias, a shard keeps no key", 64, "contiguous", True, True, True, 0.0,
     None, None),
]
B, H, HK, D = 2, 4, 2, 16


def _inputs(S, with_mask, with_bias, tile, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, HK, D, generator=g)
    v = torch.randn(B, S, HK, D, generator=g)
    mask = (torch.rand(B, HK, 1, S, generator=g) < 0.7) if with_mask else None
    if mask is not None and S >= 64:
        mask[..., S // 4: S // 2] = False  # a shard (or run) with no kept key: its pairs are skipped
    bias = torch.randn(B, HK, 1, S, generator=g) if with_bias else None
    dout = torch.randn(B, S, H, D, generator=g)
    # A block selection per (batch, kv head) keeping about half of the tiles: some pairs of query
    # and key runs select nothing (skipped), some rows see no key.
    blocks = None
    if tile is not None:
        n = -(-S // tile)
        blocks = torch.rand(B, HK, n, n, generator=g) < 0.5
    return q, k, v, mask, bias, dout, blocks


def _close(name, ours, ref, where):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values ({where})"
    err = (ours - ref).abs().max().item()
    assert err <= 2e-5 + 1e-4 * ref.abs().max().item(), f"{name}: max error {err:.3e} ({where})"


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for n, (label, S, layout, causal, with_mask, with_bias, softcap, topk,
                tile) in enumerate(CASES):
            where = f"{label}, rank {rank} of {world}"
            q, k, v, mask, bias, dout, blocks = _inputs(S, with_mask, with_bias, tile,
                                                        seed=100 + n)
            # The whole sequence in one process (every rank computes it, from the same seed).
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            bias_leaf = bias.clone().requires_grad_(True) if bias is not None else None
            ref = flash_sparse_attn_func(*leaves, attn_mask=mask, attn_bias=bias_leaf,
                                         is_causal=causal, softcap=softcap or None, topk=topk,
                                         block_mask=blocks, block_size=tile)
            ref.backward(dout)
            # This rank's shard.
            pos = shard_positions(S, rank, world, layout)
            shard = [t[:, pos].clone().requires_grad_(True) for t in (q, k, v)]
            bias_shard = (bias[..., pos].clone().requires_grad_(True) if bias is not None
                          else None)
            out = ring_flash_sparse_attn_func(
                *shard, pos, attn_mask=None if mask is None else mask[..., pos],
                attn_bias=bias_shard, is_causal=causal, softcap=softcap or None, topk=topk,
                block_mask=blocks, block_size=tile)
            out.backward(dout[:, pos])
            _close("out", out.detach(), ref.detach()[:, pos], where)
            for name, a, b in zip(("dq", "dk", "dv"), shard, leaves):
                _close(name, a.grad, b.grad[:, pos], where)
            if bias is not None:
                _close("dbias", bias_shard.grad, bias_leaf.grad[..., pos], where)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous")), nprocs=world, join=True)


def _bad_input_worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        q = torch.randn(1, 4, 2, 8)
        # Both ranks claim positions 0..3: not a permutation of the whole sequence.
        with pytest.raises(ValueError, match="positions: over the group"):
            ring_flash_sparse_attn_func(q, q, q, torch.arange(4))
        pos = shard_positions(8, rank, world)
        with pytest.raises(ValueError, match="attn_bias: sharded with the keys"):
            ring_flash_sparse_attn_func(q, q, q, pos, attn_bias=torch.zeros(1, 2, 4, 4))
        with pytest.raises(ValueError, match="positions: expected strictly increasing"):
            ring_flash_sparse_attn_func(q, q, q, pos.flip(0))
        with pytest.raises(ValueError, match="topk"):
            ring_flash_sparse_attn_func(q, q, q, pos, topk=2)
        # zigzag runs of 2 tokens cannot start at multiples of a 4-token selection tile
        with pytest.raises(ValueError, match="block_mask: every shard's runs"):
            ring_flash_sparse_attn_func(q, q, q, pos, block_mask=torch.ones(1, 2, 2, 2, dtype=torch.bool),
                                        block_size=4)
        with pytest.raises(ValueError, match="block_mask: expected a bool"):
            ring_flash_sparse_attn_func(q, q, q, pos, block_mask=torch.ones(1, 2, 3, 3, dtype=torch.bool),
                                        block_size=4)
        with pytest.raises(ValueError, match="block_size: .*block_mask is None"):
            ring_flash_sparse_attn_func(q, q, q, pos, block_size=4)
    finally:
        dist.destroy_process_group()


def test_bad_input_raises_on_every_rank():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bad_input_worker, args=(2, os.path.join(tmp, "rendezvous")), nprocs=2,
                 join=True)


def test_shard_positions_cover_the_sequence():
    for layout in ("zigzag", "contiguous"):
        for world in (1, 2, 3, 4):
            got = torch.cat([shard_positions(23, r, world, layout) for r in range(world)])
            assert torch.equal(got.sort().values, torch.arange(23))
    assert shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="layout"):
        shard_positions(8, 0, 2, "striped")


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="not initialized"):
        ring_flash_sparse_attn_func(q, q, q, torch.arange(4))
