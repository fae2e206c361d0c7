"""Mask utilities with the reference project's names and semantics (SPEC.md section 5), on the C++
core: ``create_mask``, ``topk_mask``, ``relu_mask``, ``block_smooth`` (and ``topk_indices``), plus
``create_block_mask``, the block-level selector that goes from a per-key bias straight to a block
selection for ``flash_sparse_attn_func(..., block_mask=...)`` without building an Sq x Sk mask.

Inputs may be torch tensors or numpy arrays (anything the extension takes through DLPack); the
output is of the same kind, on the same device. The core fills, selects and smooths in one pass per
output row: no (B, H, Sq, Sk) float temporary is built (the reference builds two). CUDA tensors are
processed by the core's CUDA kernels on the current torch stream, with results identical to the
CPU's (docs/numerics.md, "Mask utilities").
"""

from typing import Optional, Tuple, Union

from .. import _C

try:
    import torch
except ImportError:  # the numpy path needs no torch
    torch = None


# ---- plumbing ------------------------------------------------------------------------------------


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _detached(x):
    """x without autograd history (DLPack does not export a tensor that requires grad)."""
    return x.detach() if _is_torch(x) and x.requires_grad else x


_to_dlpack = getattr(torch._C, "_to_dlpack", None) if torch is not None else None


def _arg(x):
    """What the extension takes: torch tensors as DLPack capsules from torch's C exporter (much
    cheaper than Tensor.__dlpack__), anything else (numpy arrays) as is."""
    if _to_dlpack is not None and _is_torch(x):
        return _to_dlpack(x)
    return x


# The current stream's raw handle: torch's private accessor is what its own generated code calls
# (a public torch.cuda.current_stream() builds a Stream object per call: microseconds that matter
# for a single-row decode mask).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) if torch is not None else None


def _stream(x) -> int:
    """The cudaStream_t the core runs CUDA work on: the current torch stream of x's device."""
    if _is_torch(x) and x.is_cuda:
        if _raw_stream is not None:
            return _raw_stream(x.device.index)
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def _empty_bool(like, shape):
    """An uninitialized bool output of the same kind as `like`, on its device."""
    if _is_torch(like):
        return torch.empty(shape, dtype=torch.bool, device=like.device)
    import numpy as np

    return np.empty(shape, dtype=np.bool_)


def _broadcast_shape(bias, mask):
    """The output shape: the broadcast of two 4-D shapes (computed here, which is cheaper than a
    call into the core; the core checks that the shapes do broadcast before writing anything)."""
    if bias.ndim == 4 and (mask is None or mask.ndim == 4):
        if mask is None:
            return tuple(bias.shape)
        return tuple(x if y == 1 else y for x, y in zip(bias.shape, mask.shape))
    return _C.dynamic_mask_shape(_arg(bias), _arg(mask))  # raises with the core's message


def _finfo_min(bias) -> float:
    if _is_torch(bias):
        if not bias.is_floating_point():
            raise TypeError(f"attention_bias: expected a float dtype, got {bias.dtype}")
        return float(torch.finfo(bias.dtype).min)
    import numpy as np

    dtype = np.dtype(bias.dtype)
    if dtype.kind != "f":
        raise TypeError(f"attention_bias: expected a float dtype, got {dtype}")
    return float(np.finfo(dtype).min)


def _check_array(x, name: str, optional: bool = False) -> None:
    if x is None and optional:
        return
    if _is_torch(x) or hasattr(x, "__dlpack__"):
        return
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _block_pair(block_size) -> Tuple[int, int]:
    """A selection tile, block_size: one positive int for both sides or a pair (block_m,
    block_n) of them (create_block_mask's and flash_sparse_attn_func's block_size)."""
    pair = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(pair) != 2 or any(isinstance(x, bool) or not hasattr(x, "__index__") for x in pair):
        raise TypeError("block_size: expected an int or a pair (block_m, block_n) of ints, got "
                        f"{block_size!r}")
    if min(pair) < 1:
        raise ValueError(f"block_size: expected positive sizes, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def _block_size_arg(block_size: Optional[int]) -> int:
    if block_size is None:
        return 1
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: expected an int or None, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size: expected a positive integer, got {block_size}")
    return block_size


def _dynamic_mask(attention_bias, attention_mask, type, window_size, min_dtype, block_size):
    _check_array(attention_bias, "attention_bias")
    _check_array(attention_mask, "attention_mask", optional=True)
    block = _block_size_arg(block_size)
    if type == "topk":
        if window_size is None:
            raise ValueError("window_size: required for type='topk'")
        window_size = int(window_size)
        if window_size < 0:
            raise ValueError(f"window_size: expected >= 0, got {window_size}")
    else:
        window_size = 0
    if min_dtype is None:
        min_dtype = _finfo_min(attention_bias)
    bias, mask = _detached(attention_bias), _detached(attention_mask)
    out = _empty_bool(bias, _broadcast_shape(bias, mask))
    _C.dynamic_mask(_arg(bias), _arg(mask), type, window_size, float(min_dtype), block, _arg(out),
                    _stream(bias))
    return out


# ---- the reference's API -------------------------------------------------------------------------


def topk_indices(attention_bias, window_size: int, **kwargs):
    r"""Indices of the ``window_size`` largest entries along the key dim, ascending.

    Args:
        attention_bias: (batch_size, num_kv_heads, key_len) torch tensor.
        window_size: how many indices per row.

    Returns:
        (batch_size, num_kv_heads, window_size) int64 tensor.
    """
    values = attention_bias.detach()
    idx = torch.topk(values, window_size, dim=-1, largest=True, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def block_smooth(attention_mask, key_len: int, block_size: int):
    r"""Block smoothing along the key dim, in place: every run of ``block_size`` keys becomes all
    True iff strictly more than half of it is True; a trailing partial run uses its own length.

    Args:
        attention_mask: bool (..., key_len), modified in place.
        key_len: its key length (the last dim).
        block_size: positive; 1 leaves the mask unchanged.

    Returns:
        attention_mask.
    """
    _check_array(attention_mask, "attention_mask")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size}.")
    if attention_mask.shape[-1] != key_len:
        raise ValueError(
            f"key_len: expected attention_mask's last dim ({attention_mask.shape[-1]}), "
            f"got {key_len}"
        )
    if block_size == 1:
        return attention_mask
    _C.block_smooth(_arg(attention_mask), block_size, _stream(attention_mask))
    return attention_mask


def topk_mask(
    attention_bias,
    attention_mask,
    window_size: int,
    min_dtype: float,
    block_size: Optional[int] = None,
    **kwargs,
):
    r"""Dynamic mask keeping the ``window_size`` largest bias entries per row.

    Args:
        attention_bias: ({batch_size|1}, {num_heads|num_kv_heads|1}, {query_len|1}, key_len)
            float tensor; detached.
        attention_mask: optional bool tensor broadcastable with it; False entries are filled with
            ``min_dtype`` first and are never selected (nor is any entry equal to ``min_dtype``),
            even when fewer than ``window_size`` are valid.
        window_size: entries kept per row (>= 0; more than key_len keeps every valid entry).
        min_dtype: the fill value (e.g. ``torch.finfo(attention_bias.dtype).min``).
        block_size: optional block smoothing along the key dim (see ``block_smooth``).

    Returns:
        bool mask of the broadcast shape of attention_bias and attention_mask.
    """
    return _dynamic_mask(attention_bias, attention_mask, "topk", window_size, min_dtype, block_size)


def relu_mask(
    attention_bias,
    attention_mask,
    min_dtype: float,
    block_size: Optional[int] = None,
    **kwargs,
):
    r"""Dynamic mask keeping the entries whose (mask-filled) bias is > 0.

    Args: as ``topk_mask``, without window_size.

    Returns:
        bool mask of the broadcast shape of attention_bias and attention_mask.
    """
    return _dynamic_mask(attention_bias, attention_mask, "relu", None, min_dtype, block_size)


def _expand_2d(attention_mask, batch_size: int, query_len: int, key_len: int):
    if attention_mask.shape[0] != batch_size:
        raise ValueError(
            f"attention_mask: expected batch size {batch_size}, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    width = attention_mask.shape[-1]
    if width == key_len:  # a view, nothing to build
        return attention_mask.reshape(batch_size, 1, 1, key_len)
    out = _empty_bool(attention_mask, (batch_size, 1, 1, key_len))
    # raises for any other width
    _C.expand_mask_2d(_arg(attention_mask), query_len, key_len, _arg(out), _stream(attention_mask))
    return out


def create_mask(
    attention_bias,
    attention_mask,
    batch_size: int,
    query_len: int,
    key_len: int,
    window_size: int,
    min_dtype: float,
    block_size: Optional[int] = None,
    type: str = "topk",
):
    r"""Creates the mask for Flash Sparse Attention from a bias (the reference's ``create_mask``).

    Args:
        attention_bias: ({batch_size|1}, {num_heads|num_kv_heads|1}, {query_len|1}, key_len).
        attention_mask: optional bool, (batch_size, seq_len) or broadcastable with the bias. A 2-D
            mask of width key_len becomes (batch_size, 1, 1, key_len); of width query_len with
            key_len > query_len it is left-padded with True to key_len; any other width raises
            ValueError.
        batch_size, query_len, key_len: the attention problem's sizes.
        window_size: ``type="topk"``: entries kept per row.
        min_dtype: the fill for masked entries (None: the bias dtype's finfo.min).
        block_size: optional block smoothing along the key dim (> 0).
        type: "topk" or "relu" (anything else raises ValueError).

    Returns:
        bool mask of the broadcast shape of attention_bias and attention_mask.
    """
    if type not in ("topk", "relu"):
        raise ValueError(f"type: unsupported mask type {type!r}; supported types are 'topk' and "
                         "'relu'")
    _check_array(attention_bias, "attention_bias")
    _check_array(attention_mask, "attention_mask", optional=True)
    if attention_mask is not None and attention_mask.ndim == 2:
        attention_mask = _expand_2d(attention_mask, batch_size, query_len, key_len)
    return _dynamic_mask(attention_bias, attention_mask, type, window_size, min_dtype, block_size)


# ---- beyond the reference: block-level selection -------------------------------------------------


def create_block_mask(
    attention_bias,
    query_len: int,
    num_blocks: int,
    block_size: Union[int, Tuple[int, int]] = 128,
    is_causal: bool = False,
    reduce: str = "max",
):
    r"""Selects key blocks straight from a per-key bias, never building an Sq x Sk mask.

    For every (batch, head, query block) it keeps the ``num_blocks`` key blocks with the highest
    score (``reduce`` = "max" or "mean" of the bias over the block's keys; blocks whose score is
    -inf never compete), plus, with ``is_causal``, the blocks holding each row's diagonal key
    (bottom-right aligned); key blocks wholly in a row block's future are never kept.

    Args:
        attention_bias: ({B|1}, {Hk|H|1}, {1|query_len}, key_len), typically (B, Hk, 1, Sk).
        query_len: the attention problem's query length.
        num_blocks: key blocks kept per query block by score (besides the causal ones).
        block_size: the selection tile (block_m, block_n), or one int for both; pass the same
            value as ``block_size=`` to ``flash_sparse_attn_func``. The default 128 x 128 is a
            whole multiple of every backend's tile (CPU 64 x 64, CUDA 128 x 64).
        is_causal: as the attention call's ``is_causal``.
        reduce: "max" or "mean".

    Returns:
        bool (B|1, Hk|H|1, ceil(query_len / block_m), ceil(key_len / block_n)), True = visit:
        ``flash_sparse_attn_func(q, k, v, attn_bias=..., block_mask=mask, block_size=...)``.
    """
    _check_array(attention_bias, "attention_bias")
    block_m, block_n = _block_pair(block_size)
    bias = _detached(attention_bias)
    if bias.ndim != 4:
        raise ValueError(
            "attention_bias: expected 4 dims ({B|1}, {H|Hk|1}, {1|query_len}, key_len), got shape "
            f"{tuple(bias.shape)}"
        )
    for name, value in (("query_len", query_len), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value}")
    m_blocks = -(-int(query_len) // block_m)
    n_blocks = -(-int(bias.shape[3]) // block_n)
    out = _empty_bool(attention_bias, (bias.shape[0], bias.shape[1], m_blocks, n_blocks))
    _C.select_blocks(_arg(bias), int(query_len), block_m, block_n, int(num_blocks), reduce,
                     bool(is_causal), _arg(out), _stream(bias))
    return out


__all__ = [
    "topk_indices",
    "block_smooth",
    "topk_mask",
    "relu_mask",
    "create_mask",
    "create_block_mask",
]
