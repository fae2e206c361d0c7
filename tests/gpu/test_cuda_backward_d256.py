"""Head dim 256 backward on Hopper (src/cuda/backward_wide_sm90.cuh). The dK/dV pass runs its
consumer warpgroups in roles: one computes x^T, P^T and dV, hands the fp32 P^T to the other
through shared memory, which computes dP^T, dS^T and dK. The dQ pass splits each key tile (32
keys each for x and dP) and the head dim (128 columns of dQ each), passing dS through shared
memory. Every gradient against float64 autograd by SPEC's rule (tests/gpu/test_cuda_backward.py's
`check_backward`: no NaN, exact zeros where no kept entry reaches).

The cases aim at what the passes decide: full and partial tiles of the lists, ragged query and
key tiles, D = 200 padded to 256 (columns past the head dim), a 16-bit bias with a query dim
(staged in shared memory by the dQ pass when the key dim is a multiple of 8, read from global
memory by the dK/dV pass) beside an fp32 one, every bias shape's gradient (the dK/dV pass's
column sums; the dQ pass's per-entry stores, sums over a batch or heads, and row sums both
warpgroups add), the key tile's query work in 1 to 8 shares (fp32 partial rows summed by the
reduction) and unsplit, many query heads per kv head (the P^T buffers' parity across heads),
deterministic mode, per-row top-k over compacted keys (the sm80 passes), and Q / dO that no TMA
tensor map describes (the dK/dV pass copies them with cp.async). On devices without the sm90
kernels the same cases run the sm80 passes.
"""

import pytest
import torch

from flash_sparse_attn import flash_sparse_attn_func

from flash_sparse_attn.utils.mask import create_mask

from test_cuda_backward import check_backward, gen  # noqa: F401 (gen: fixture)
from test_cuda_forward import DTYPES, check_tma_fallback, qkv, randn
from test_cuda_forward_d256 import block_mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk,D", [(512, 512, 256), (200, 777, 256), (1000, 300, 256),
                                     (333, 450, 200)])
def test_dense(dtype, causal, Sq, Sk, D, gen):
    # Sq > Sk causal leaves rows without keys; ragged last tiles on both axes.
    check_backward(*qkv(2, Sq, Sk, 4, 2, D, dtype, gen), causal=causal,
                   label=f"D256 bwd {Sq}x{Sk} D={D}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep,drop", [(0.5, 0.0), (0.5, 0.3), (0.9, 0.05)])
def test_block_masks(dtype, keep, drop, gen):
    # A key tile's transposed lists hold full and partial query tiles (drop > 0: partial ones);
    # whole keys and rows without any entry get exact zeros.
    B, S, H = 2, 768, 4
    q, k, v = qkv(B, S, S, H, 2, 256, dtype, gen)
    mask = block_mask(B, 2, S, S, keep, gen, drop)
    check_backward(q, k, v, mask=mask, causal=True, label=f"D256 bwd blocks {keep} {drop}")


BIAS_SHAPES = [(2, 4, 328, 512), (1, 4, 328, 512), (2, 2, 328, 512), (2, 4, 1, 512),
               (2, 2, 1, 512), (1, 1, 1, 512), (2, 4, 328, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_shapes(dtype, bias_shape, gen):
    # Sk = 512: a 16-bit bias with a query dim is staged in shared memory (Params::bias_staged);
    # the fp32 copy of the first shape is read from global memory by the element pass.
    q, k, v = qkv(2, 328, 512, 4, 2, 256, dtype, gen)
    mask = torch.rand(2, 2, 328, 512, device="cuda", generator=gen) < 0.85
    mask[:, :, 5] = False       # a row that keeps nothing
    mask[:, 0, :, 70] = False   # a key no row of kv head 0 keeps
    check_backward(q, k, v, mask=mask, bias=randn(*bias_shape, dtype=dtype, gen=gen),
                   causal=True, label=f"D256 bwd bias {bias_shape}")
    if bias_shape == BIAS_SHAPES[0]:
        check_backward(q, k, v, mask=mask,
                       bias=randn(*bias_shape, dtype=torch.float32, gen=gen), causal=True,
                       label=f"D256 bwd fp32 bias {bias_shape}")


@pytest.mark.parametrize("split_log2", ["0", "1", "2", "3"])
def test_shares(split_log2, monkeypatch, gen):
    # FSA_CUDA_DKV_SPLIT_LOG2 forces 2^k shares of each key tile's query work: each share writes
    # fp32 rows of dK / dV and its own column sums, which the reduction adds.
    monkeypatch.setenv("FSA_CUDA_DKV_SPLIT_LOG2", split_log2)
    q, k, v = qkv(1, 700, 640, 4, 1, 256, torch.bfloat16, gen)
    check_backward(q, k, v, bias=randn(1, 1, 1, 640, dtype=torch.bfloat16, gen=gen), causal=True,
                   label=f"D256 bwd shares 2^{split_log2}")


def test_unsplit_grid(gen):
    # 68 key tiles x 4 kv heads = 272 CTAs, two per SM on 132 SMs or fewer: no shares, dK and dV
    # written straight from the accumulators.
    q, k, v = qkv(1, 192, 4352, 8, 4, 256, torch.bfloat16, gen)
    check_backward(q, k, v, bias=randn(1, 4, 1, 4352, dtype=torch.bfloat16, gen=gen),
                   label="D256 bwd unsplit")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_heads_per_kv_head(dtype, gen):
    # G = 8: each CTA walks eight heads' lists; the column sums switch heads along the way.
    B, S = 1, 384
    q, k, v = qkv(B, S, S, 16, 2, 256, dtype, gen)
    bias = randn(B, 2, 1, S, dtype=dtype, gen=gen)
    mask = create_mask(bias, torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None, None],
                       B, S, S, 96, torch.finfo(dtype).min, type="topk")
    check_backward(q, k, v, mask=mask, bias=bias, causal=True, label="D256 bwd GQA 8")


@pytest.mark.parametrize("bias_shape", [(2, 2, 1, 640), (1, 4, 400, 640)],
                         ids=lambda s: "x".join(map(str, s)))
def test_deterministic(bias_shape, gen):
    # deterministic=True: the same bits on every call. Column sums: two additions onto zero per
    # share, shares summed in order; a bias summed over the batch: one dQ launch per member, in
    # order (BackwardParams::ordered_dbias).
    q, k, v = qkv(2, 400, 640, 4, 2, 256, torch.bfloat16, gen)
    bias = randn(*bias_shape, dtype=torch.bfloat16, gen=gen)
    check_backward(q, k, v, bias=bias, causal=True, deterministic=True,
                   label=f"D256 bwd deterministic {bias_shape}")
    dout = randn(*q.shape, dtype=q.dtype, gen=gen)
    runs = []
    for _ in range(3):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
        flash_sparse_attn_func(*leaves[:3], attn_bias=leaves[3], is_causal=True,
                               deterministic=True).backward(dout)
        runs.append([x.grad for x in leaves])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_topk_over_compacted_keys(dtype, gen):
    # Per-row causal top-k over compacted keys: the dK/dV pass's groups gather K and V by slot,
    # which the D = 256 Hopper pass does not; such calls run the sm80 dK/dV pass (logged once).
    B, S, H, Hk, window = 1, 640, 4, 2, 96
    q, k, v = qkv(B, S, S, H, Hk, 256, dtype, gen)
    bias = randn(B, Hk, 1, S, dtype=dtype, gen=gen)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None, None]
    mask = create_mask(bias, causal, B, S, S, window, torch.finfo(dtype).min)
    check_backward(q, k, v, mask=mask, bias=bias, causal=True, label="D256 bwd row top-k",
                   ours_how={"topk": window, "topk_causal": True})


# `expand` ("q" or "kv"): the operand given with a head stride of 0, against the same call on
# contiguous copies; "kv" compares the output too.
TMA_FALLBACK = """
import sys, torch, flash_sparse_attn
expand = "{expand}"
g = torch.Generator(device="cuda").manual_seed({seed})
q0 = torch.randn(1, 400, 1 if expand == "q" else 4, 256, generator=g, device="cuda")
k0, v0 = (torch.randn(1, 400, 1 if expand == "kv" else 2, 256, generator=g, device="cuda")
          for _ in range(2))
q0, k0, v0 = (x.to(torch.bfloat16) for x in (q0, k0, v0))
dout = torch.randn(1, 400, 4, 256, generator=g, device="cuda").to(torch.bfloat16)
def grads(expanded):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q0, k0, v0)]
    q, k, v = (x.expand(1, 400, heads, 256) for x, heads in zip(leaves, (4, 2, 2)))
    if not expanded:
        q, k, v = (x.contiguous() for x in (q, k, v))
    out = flash_sparse_attn.flash_sparse_attn_func(q, k, v, is_causal=True)
    out.backward(dout)
    return ([out.detach()] if expand == "kv" else []) + [x.grad for x in leaves]
dense = grads(False)
torch.cuda.synchronize()
print("<expanded>", file=sys.stderr, flush=True)
runs = [grads(True) for _ in range(3)]
torch.cuda.synchronize()
same = all(torch.equal(a, b) for run in runs for a, b in zip(run, dense))
print("equal" if same else "differ", flush=True)
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Hopper dK/dV pass's TMA path")
def test_tma_fallback_is_logged_once_and_exact():
    # Q expanded over heads (stride 0): the D = 256 dK/dV pass copies Q and dO with cp.async, with
    # the same bits in every gradient.
    check_tma_fallback(TMA_FALLBACK.replace("{expand}", "q"),
                       ("query or output gradient", "the Hopper dK/dV pass"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Hopper forward's and dQ pass's TMA paths")
def test_kv_tma_fallback_is_logged_once_and_exact():
    # K and V expanded over kv heads (stride 0): the D = 256 forward and dQ pass copy them with
    # cp.async, with the same bits in the output and every gradient.
    check_tma_fallback(TMA_FALLBACK.replace("{expand}", "kv"),
                       ("key or value", "the Hopper forward"),
                       ("key or value", "the Hopper dQ pass"))
