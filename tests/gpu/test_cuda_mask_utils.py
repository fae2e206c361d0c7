"""The mask utilities on CUDA tensors against the CPU core, bit for bit (SPEC.md section 5: "results
identical to the CPU core, the tie rule included").

Runs only where a CUDA device and a CUDA build of the package exist (scripts/gpu_check.sh). Every
input is drawn on the CPU from a seeded generator and copied to the GPU, so both devices see the
same values; a case passes iff torch.equal(cuda_result.cpu(), cpu_result). The CPU core is itself
checked against a loop-by-loop oracle in tests/python/test_mask_utils.py. Inputs are chosen to hit
every path of the kernels: ties at the threshold (the tie walk), fill values, NaN and infinities,
rows kept whole, windows at and past the row length, rows too long for shared memory (keys re-read
from global memory), block smoothing by threads, by warps and by a second kernel.
"""

import os
import time
import warnings
import zlib

import pytest
import torch

from flash_sparse_attn import _C
from flash_sparse_attn.utils.mask import (
    block_smooth,
    create_block_mask,
    create_mask,
    relu_mask,
    topk_mask,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(_C, "has_cuda", False),
    reason="needs a CUDA device and a CUDA build of flash_sparse_attn",
)

SEED = int(os.environ.get("FSA_TEST_SEED", time.time_ns() % (2**31)))
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# ---- helpers -------------------------------------------------------------------------------------


def generator(*salt):
    """A CPU generator per case: the seed (printed on failure) plus a stable hash of the case."""
    return torch.Generator().manual_seed(SEED + zlib.crc32(repr(salt).encode()))


def assert_same(cuda_out, cpu_out, what):
    """cuda_out (on the GPU) equals cpu_out bit for bit; on failure, say where."""
    where = f"{what} (FSA_TEST_SEED={SEED})"
    assert cuda_out.is_cuda, f"result not on the GPU: {where}"
    got = cuda_out.cpu()
    assert got.dtype == cpu_out.dtype and got.shape == cpu_out.shape, (
        f"got {got.dtype} {tuple(got.shape)}, expected {cpu_out.dtype} {tuple(cpu_out.shape)}: "
        f"{where}")
    if torch.equal(got, cpu_out):
        return
    diff = (got != cpu_out).nonzero()
    first = tuple(diff[0].tolist())
    row = first[:-1]  # the first differing row (all but the key dim)
    raise AssertionError(
        f"{diff.shape[0]} of {got.numel()} entries differ, first at {first}; that row keeps "
        f"{int(got[row].sum())} entries on CUDA, {int(cpu_out[row].sum())} on the CPU: {where}")


def bias_values(shape, dtype, gen, kind="normal"):
    """A CPU bias. kinds: normal; levels (values from 8 levels: ties everywhere); special (normal
    with NaN, +-inf and the dtype's finfo.min sprinkled in); zeros (values from -1, -0.0, +0.0,
    1)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "levels":
        x = torch.randint(0, 8, shape, generator=gen).to(torch.float64) / 4 - 1
    elif kind == "zeros":
        x = torch.tensor([-1.0, -0.0, 0.0, 1.0], dtype=torch.float64)[
            torch.randint(0, 4, shape, generator=gen)]
    x = x.to(dtype)
    if kind == "special":
        pick = torch.rand(shape, generator=gen)
        x[pick < 0.02] = float("nan")
        x[(pick >= 0.02) & (pick < 0.04)] = float("inf")
        x[(pick >= 0.04) & (pick < 0.06)] = float("-inf")
        x[(pick >= 0.06) & (pick < 0.08)] = torch.finfo(dtype).min
    return x


def random_mask(shape, gen, density=0.7):
    return torch.rand(shape, generator=gen) < density


def both_devices(fn, *tensors, **kwargs):
    """fn on CUDA copies of the tensors (checked: no warning, result on the GPU) and on the CPU
    tensors themselves."""
    cuda_args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_out = fn(*cuda_args, **kwargs)
    cpu_out = fn(*tensors, **kwargs)
    return cuda_out, cpu_out


def check_create_mask(bias, mask, window, block=None, kind="topk", min_dtype=None, what=""):
    """create_mask on CUDA copies of bias and mask (no warning, output on their device) equals
    create_mask on the CPU tensors."""
    batch, _, query_len, key_len = bias.shape
    if mask is not None and mask.dim() == 4:
        batch, _, query_len, key_len = torch.broadcast_shapes(bias.shape, mask.shape)
    if min_dtype is None:
        min_dtype = torch.finfo(bias.dtype).min

    def run(bias_, mask_):
        return create_mask(bias_, mask_, batch, query_len, key_len, window, min_dtype,
                           block_size=block, type=kind)

    cuda_args = (bias.cuda(), None if mask is None else mask.cuda())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_out = run(*cuda_args)
    assert cuda_out.device == cuda_args[0].device, f"output on {cuda_out.device}: {what}"
    assert_same(cuda_out, run(bias, mask), what)


# ---- top-k: dtypes, distributions, windows -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "levels", "special", "zeros"])
@pytest.mark.parametrize("sk", [1, 17, 1000, 1025])
def test_topk_dtypes_and_distributions(dtype, kind, sk):
    gen = generator("dist", str(dtype), kind, sk)
    bias = bias_values((2, 3, 4, sk), dtype, gen, kind)
    mask = random_mask((2, 1, 4, sk), gen)
    for window in sorted({0, 1, 7, max(sk - 1, 0), sk, sk + 5, sk // 3}):
        check_create_mask(bias, mask, window, what=f"{dtype} {kind} Sk={sk} window={window}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fill", [0.0, -0.0, -1.0, 1.0])
def test_topk_fill_values_and_signed_zeros(dtype, fill):
    """A fill equal to values present in the bias (both zeros match a zero fill): those entries
    take top-k slots but are never kept."""
    gen = generator("fill", str(dtype), fill)
    bias = bias_values((2, 2, 3, 257), dtype, gen, "zeros")
    mask = random_mask((2, 2, 3, 257), gen, 0.5)
    for window in (0, 5, 64, 200, 257):
        check_create_mask(bias, mask, window, min_dtype=fill,
                          what=f"{dtype} fill={fill} window={window}")
        check_create_mask(bias, None, window, min_dtype=fill,
                          what=f"{dtype} fill={fill} window={window} no mask")


def test_topk_fill_overflowing_the_dtype():
    """min_dtype below fp16's range rounds to -inf, as masked_fill stores it."""
    gen = generator("overflow")
    bias = bias_values((1, 2, 8, 300), torch.float16, gen, "special")
    mask = random_mask((1, 2, 8, 300), gen)
    check_create_mask(bias, mask, 40, min_dtype=-1e30, what="fp16 fill -1e30")


# ---- broadcasting and layouts --------------------------------------------------------------------

BROADCAST_PAIRS = [
    ((2, 4, 3, 100), (2, 4, 3, 100)),
    ((2, 4, 1, 100), (2, 1, 3, 100)),
    ((1, 4, 3, 100), (2, 1, 1, 100)),
    ((2, 1, 3, 100), None),
    ((1, 1, 1, 100), (2, 4, 3, 100)),
    ((2, 4, 3, 100), (1, 1, 1, 1)),
    ((2, 4, 3, 1), (2, 4, 3, 100)),  # bias broadcast along keys: every entry ties
    ((1, 4, 1, 100), (1, 1, 3, 100)),  # heads of the bias against rows of the mask
]


@pytest.mark.parametrize("bias_shape,mask_shape", BROADCAST_PAIRS)
@pytest.mark.parametrize("kind", ["topk", "relu"])
@pytest.mark.parametrize("block", [None, 4, 5])
def test_broadcast_shapes(bias_shape, mask_shape, kind, block):
    gen = generator("bcast", bias_shape, mask_shape, kind, block)
    bias = bias_values(bias_shape, torch.bfloat16, gen, "levels")
    mask = random_mask(mask_shape, gen) if mask_shape else None
    for window in (0, 1, 7, 99, 100, 105) if kind == "topk" else (None,):
        check_create_mask(bias, mask, window, block=block, kind=kind,
                          what=f"{bias_shape} x {mask_shape} {kind} block={block} w={window}")


def test_expanded_and_strided_views_are_read_in_place():
    gen = generator("views")
    base = bias_values((2, 3, 40, 64), torch.float32, gen, "levels")
    bias = base.transpose(2, 3)[..., :16, :].transpose(2, 3)  # (2, 3, 40, 16), key stride 64
    key_mask = random_mask((2, 1, 1, 16), gen)
    mask = key_mask.expand(2, 3, 40, 16)  # stride-0 view
    head_bias = base[:, :1, :1].expand(2, 3, 1, 64)  # stride 0 over heads
    for window in (0, 3, 9, 16):
        check_create_mask(bias, mask, window, what=f"strided bias, expanded mask, w={window}")
        check_create_mask(head_bias, None, window, what=f"expanded bias w={window}")


@pytest.mark.parametrize("width", ["key_len", "query_len"])
def test_2d_padding_masks(width):
    gen = generator("2d", width)
    batch, sq, sk = 3, 37, 301
    bias = bias_values((batch, 2, sq, sk), torch.bfloat16, gen)
    mask_2d = random_mask((batch, sk if width == "key_len" else sq), gen, 0.8)
    for window in (0, 7, 64, sk):
        for block in (None, 4):
            check_create_mask(bias, mask_2d, window, block=block,
                              what=f"2-D mask of width {width}, w={window}, block={block}")


def test_causal_4d_mask_like_the_benchmark():
    """The bench's shape family, small: a per-head key bias and a (1, 1, S, S) causal mask."""
    gen = generator("causal")
    s = 1000
    bias = bias_values((1, 4, 1, s), torch.bfloat16, gen)
    mask = torch.ones(s, s, dtype=torch.bool).tril().view(1, 1, s, s)
    for window in (1, 64, 500):
        check_create_mask(bias, mask, window, what=f"causal 4-D mask, w={window}")
    check_create_mask(bias, mask.expand(1, 4, s, s), 64, what="causal mask expanded over heads")


# ---- long rows: shared-memory limits, the global-memory path, separate smoothing -----------------


@pytest.mark.parametrize("dtype,sk,block", [
    (torch.float32, 70000, None),      # keys do not fit: re-read from global memory
    (torch.float32, 70000, 4),         # ... with the flags smoothed in shared memory
    (torch.bfloat16, 70000, 5),        # keys and flags in shared memory
    (torch.bfloat16, 100000, 5),       # keys fit, keys + flags do not: a second kernel smooths
    (torch.float64, 40000, None),      # 64-bit keys past shared memory
])
@pytest.mark.parametrize("kind", ["normal", "levels"])
def test_long_rows(dtype, sk, block, kind):
    gen = generator("long", str(dtype), sk, block, kind)
    bias = bias_values((1, 2, 2, sk), dtype, gen, kind)
    mask = random_mask((1, 1, 2, sk), gen, 0.9)
    for window in (1, 4096, sk - 1):
        check_create_mask(bias, mask, window, block=block,
                          what=f"{dtype} Sk={sk} block={block} {kind} w={window}")


@pytest.mark.parametrize("kind", ["normal", "levels"])
def test_rows_longer_than_512k(kind):
    gen = generator("huge", kind)
    sk = 600_000
    bias = bias_values((1, 2, 1, sk), torch.float32, gen, kind)
    mask = random_mask((1, 1, 1, sk), gen, 0.8)
    for window, block in ((2048, None), (300_000, 7), (sk, None)):
        check_create_mask(bias, mask, window, block=block,
                          what=f"Sk={sk} {kind} w={window} block={block}")


# ---- relu and block smoothing --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 4, 5, 40])
def test_relu(dtype, block):
    gen = generator("relu", str(dtype), block)
    bias = bias_values((2, 3, 5, 1025), dtype, gen, "special")
    mask = random_mask((2, 1, 5, 1025), gen)
    for fill in (-1e9, 0.0, 1.0):
        check_create_mask(bias, mask, None, block=block, kind="relu", min_dtype=fill,
                          what=f"relu {dtype} block={block} fill={fill}")
    cuda_out, cpu_out = both_devices(relu_mask, bias, mask, min_dtype=-1.0, block_size=block)
    assert_same(cuda_out, cpu_out, "relu_mask")


@pytest.mark.parametrize("block", [1, 2, 4, 5, 32, 33, 40, 1000, 5000])
def test_block_smooth_in_place(block):
    gen = generator("smooth", block)
    for shape in ((4097,), (3, 1000), (2, 3, 333), (2, 2, 3, 1025)):
        cpu = random_mask(shape, gen, 0.5)
        cuda = cpu.cuda()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert block_smooth(cuda, shape[-1], block) is cuda
        block_smooth(cpu, shape[-1], block)
        assert_same(cuda, cpu, f"block_smooth {shape} block={block}")


def test_block_smooth_strided_view():
    gen = generator("smooth-view")
    base = random_mask((3, 40), gen, 0.5)
    cuda_base = base.cuda()
    block_smooth(base[:, ::2], 20, 3)
    block_smooth(cuda_base[:, ::2], 20, 3)
    assert_same(cuda_base, base, "block_smooth on a key-strided view")


@pytest.mark.parametrize("block", [4, 5, 40])
def test_topk_mask_with_block_smoothing(block):
    gen = generator("topk-smooth", block)
    bias = bias_values((2, 2, 3, 999), torch.float16, gen, "levels")
    mask = random_mask((2, 2, 3, 999), gen)
    cuda_out, cpu_out = both_devices(topk_mask, bias, mask, window_size=300,
                                     min_dtype=torch.finfo(torch.float16).min, block_size=block)
    assert_same(cuda_out, cpu_out, f"topk_mask block={block}")


# ---- the block-level selector --------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("sq,sk,tile", [
    (100, 100, (16, 16)), (37, 130, (8, 16)), (130, 37, (16, 8)), (1, 257, (64, 32)),
    (1000, 4096, (64, 64)),
    (300, 3000, (1, 1)),  # a block per key: thousands of candidates per query block
])
@pytest.mark.parametrize("query_rows", [False, True])
def test_select_blocks(causal, reduce, sq, sk, tile, query_rows):
    gen = generator("blocks", causal, reduce, sq, sk, tile, query_rows)
    shape = (2, 3, sq if query_rows else 1, sk)
    for kind, dtype in (("normal", torch.float32), ("levels", torch.bfloat16),
                        ("special", torch.float16), ("normal", torch.float64)):
        bias = bias_values(shape, dtype, gen, kind)
        n_blocks = -(-sk // tile[1])
        for top_k in sorted({0, 1, 3, n_blocks // 2, n_blocks + 2}):
            cuda_out, cpu_out = both_devices(create_block_mask, bias, sq, num_blocks=top_k,
                                             block_size=tile, is_causal=causal, reduce=reduce)
            assert_same(cuda_out, cpu_out,
                        f"select_blocks {shape} {dtype} {kind} tile={tile} top_k={top_k} "
                        f"causal={causal} reduce={reduce}")


@pytest.mark.parametrize("causal", [False, True])
def test_select_blocks_into_a_larger_output(causal):
    """A bias of batch and heads 1 selects for every (batch, head) of a larger output (the layout
    PlanOptions::block_mask takes), through the extension directly."""
    gen = generator("blocks-bcast", causal)
    bias = bias_values((1, 1, 1, 777), torch.bfloat16, gen, "levels")
    shape = (2, 3, -(-500 // 64), -(-777 // 32))
    outs = []
    for device in ("cuda", "cpu"):
        out = torch.empty(shape, dtype=torch.bool, device=device)
        stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
        _C.select_blocks(bias.to(device), 500, 64, 32, 4, "mean", causal, out, stream)
        outs.append(out)
    assert_same(outs[0], outs[1], f"select_blocks into {shape}, causal={causal}")


# ---- devices and streams -------------------------------------------------------------------------


def test_outputs_on_the_input_device_and_no_host_copy_warning():
    gen = generator("device")
    bias = bias_values((2, 2, 1, 300), torch.bfloat16, gen).cuda()
    mask_2d = random_mask((2, 300), gen).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [create_mask(bias, mask_2d, 2, 1, 300, 16, None, block_size=4),
                create_mask(bias, None, 2, 1, 300, None, -1e9, type="relu"),
                topk_mask(bias, None, 8, -1e9), relu_mask(bias, None, -1e9),
                create_block_mask(bias, 300, 2, block_size=(64, 64))]
    for out in outs:
        assert out.device == bias.device and out.dtype == torch.bool


def test_mixed_devices_raise_a_clear_error():
    gen = generator("mixed")
    bias = bias_values((2, 2, 1, 64), torch.float32, gen)
    mask = random_mask((2, 2, 1, 64), gen)
    with pytest.raises(ValueError, match="attention_mask.*device"):
        topk_mask(bias.cuda(), mask, 8, -1e9)
    with pytest.raises(ValueError, match="attention_mask.*device"):
        create_mask(bias.cuda(), mask[:, 0, 0], 2, 1, 64, 8, -1e9)  # a CPU 2-D mask
    with pytest.raises(ValueError, match="attention_mask.*device"):
        topk_mask(bias, mask.cuda(), 8, -1e9)


def test_runs_on_the_current_stream():
    """Inputs written on a side stream are read there without a sync by the caller."""
    gen = generator("stream")
    host = bias_values((4, 4, 16, 2048), torch.float32, gen, "levels")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        bias = torch.empty(host.shape, device="cuda")
        bias.copy_(host, non_blocking=False)
        bias.mul_(2.0)  # queued on the side stream right before the mask is built
        out = topk_mask(bias, None, 100, -1e30)
    side.synchronize()
    assert_same(out, topk_mask(host * 2.0, None, 100, -1e30), "topk_mask on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    gen = generator("device1")
    bias = bias_values((2, 2, 4, 500), torch.bfloat16, gen, "levels")
    with torch.cuda.device(0):
        out = topk_mask(bias.to("cuda:1"), None, 50, -1e30)
    assert out.device == torch.device("cuda:1")
    assert_same(out, topk_mask(bias, None, 50, -1e30), "topk_mask on cuda:1")
