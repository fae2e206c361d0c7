"""Head dim 256 on the Hopper forward: a CTA runs two of the plan's 64-row query tiles, one per
consumer warpgroup, over the union of their key lists (src/cuda/forward_kernel_sm90.cuh,
PairedWalk). Against float64 with SPEC's pass rule (tests/gpu/test_cuda_forward.py's `check`).

The cases aim at what the union walk decides per key tile: a tile both plan tiles keep, one that
only one keeps (the other warpgroup hands the stage back unread), a tile full to one and partial
to the other, an odd number of plan tiles (the last CTA's second warpgroup has none), tiles
without any key, split-KV (key-tile ranges per split) and the persistent schedule. On devices
without the sm90 kernels the same cases run the sm80 kernel.
"""

import subprocess
import sys

import pytest
import torch

from test_cuda_forward import DTYPES, check, gen, qkv, randn  # noqa: F401 (gen: fixture)


def block_mask(B, H, Sq, Sk, keep, gen, drop=0.0):
    """A (B, H, Sq, Sk) mask from random 64 x 64 blocks (each kept with probability `keep`),
    with a share `drop` of the kept entries dropped again, so kept blocks are partial."""
    mb, nb = (Sq + 63) // 64, (Sk + 63) // 64
    blocks = torch.rand(B, H, mb, nb, generator=gen, device="cuda") < keep
    mask = blocks.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :Sq, :Sk]
    if drop > 0.0:
        mask = mask & (torch.rand(B, H, Sq, Sk, generator=gen, device="cuda") >= drop)
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1024, 1024), (960, 1100), (200, 777), (1000, 300)])
def test_dense(dtype, causal, Sq, Sk, gen):
    # 960 rows are 15 plan tiles: the last CTA's second warpgroup has no rows. Causal with
    # Sq > Sk leaves the first rows without keys; Sq < Sk starts the band at Sk - Sq.
    check(*qkv(2, Sq, Sk, 4, 2, 256, dtype, gen), causal=causal, label=f"D256 {Sq}x{Sk}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep,drop", [(0.5, 0.0), (0.5, 0.3), (0.15, 0.0), (0.9, 0.05)])
def test_block_masks(dtype, keep, drop, gen):
    # Adjacent plan tiles keep different key tiles: a warpgroup skips the other's, and with
    # `drop` a key tile can be full to one plan tile and partial to the other.
    B, S, H = 2, 1088, 4
    q, k, v = qkv(B, S, S, H, H, 256, dtype, gen)
    mask = block_mask(B, H, S, S, keep, gen, drop)
    check(q, k, v, mask=mask, label=f"D256 blocks keep={keep} drop={drop}")
    check(q, k, v, mask=mask, causal=True, label=f"D256 blocks causal keep={keep} drop={drop}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_keys(dtype, gen):
    # Whole plan tiles (and so whole CTAs) with an empty list: O = 0 and LSE = -inf exactly.
    B, S, H = 1, 640, 2
    q, k, v = qkv(B, S, S, H, H, 256, dtype, gen)
    mask = block_mask(B, H, S, S, 0.3, gen)
    mask[:, :, 128:320] = False  # plan tiles 2-4: CTA 1 without keys, CTA 2's first half
    check(q, k, v, mask=mask, label="D256 empty plan tiles")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 4, 1, 900), (2, 2, 1, 900), (2, 4, 700, 900),
                                        (1, 1, 700, 900), (2, 4, 700, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias(dtype, bias_shape, gen):
    # A key bias per (batch, head) travels with its K/V tile; a 16-bit bias with a query dim as a
    # staged (128 x 64) tile per stage; the others are read by the logits.
    q, k, v = qkv(2, 700, 900, 4, 2, 256, dtype, gen)
    bias = randn(*bias_shape, dtype=dtype, gen=gen)
    check(q, k, v, bias=bias, causal=True, label=f"D256 bias {bias_shape}")
    check(q, k, v, bias=bias.float(), label=f"D256 fp32 bias {bias_shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_with_block_mask_and_softcap(dtype, gen):
    B, S, H = 2, 832, 4
    q, k, v = qkv(B, S, S, H, 2, 256, dtype, gen)
    mask = block_mask(B, H, S, S, 0.6, gen, drop=0.2)
    bias = randn(B, H, S, S, dtype=dtype, gen=gen)
    check(q, k, v, mask=mask, bias=bias, causal=True, label="D256 mask + bias")
    check(q, k, v, mask=mask, softcap=20.0, label="D256 mask + softcap")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_split_kv(dtype, causal, gen):
    # One or two CTAs of rows over many key tiles: split-KV cuts the union walk by key-tile
    # ranges, and the combine merges the splits.
    q, k, v = qkv(1, 128, 8192, 1, 1, 256, dtype, gen)
    check(q, k, v, causal=causal, label="D256 split-KV")
    q, k, v = qkv(1, 100, 5000, 2, 1, 256, dtype, gen)
    mask = block_mask(1, 2, 100, 5000, 0.4, gen, drop=0.1)
    check(q, k, v, mask=mask, causal=causal, label="D256 split-KV with a mask")


@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_schedule(dtype, gen):
    # More CTA tiles than SMs: each CTA walks several (query block, head, batch) tiles, and the
    # next tile's Q waits for the last S of the one before (Q stays in shared memory at D = 256).
    q, k, v = qkv(2, 2112, 2112, 16, 4, 256, dtype, gen)
    check(q, k, v, causal=True, label="D256 persistent")


GATHERED_LOG = """
import sys, torch, flash_sparse_attn
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 640, h, 256, generator=g, device="cuda").to(torch.bfloat16)
           for h in (4, 2, 2))
bias = torch.randn(1, 2, 1, 640, generator=g, device="cuda").to(torch.bfloat16)
flash_sparse_attn.flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True)
torch.cuda.synchronize()
print("<per-row>", file=sys.stderr, flush=True)
for _ in range(2):
    flash_sparse_attn.flash_sparse_attn_func(q, k, v, attn_bias=bias, is_causal=True, topk=96,
                                             topk_causal=True)
torch.cuda.synchronize()
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Hopper forward's choice of kernel")
def test_row_topk_on_the_sm80_forward_is_logged_once():
    # Per-row top-k over compacted keys at D = 256 runs the sm80 forward (the Hopper one does not
    # gather keys by slot at this head dim): our choice, so stderr says it once per process (a
    # fresh one here), and never for a call the Hopper forward serves.
    run = subprocess.run([sys.executable, "-c", GATHERED_LOG], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    before, marker, after = run.stderr.partition("<per-row>")
    assert marker and "runs the sm80" not in before, run.stderr
    assert after.count("runs the sm80 forward") == 1, run.stderr
