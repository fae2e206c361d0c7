"""Framework-neutral entry points over numpy arrays (or any DLPack producer on the CPU).

``flash_sparse_attn_func`` is the torch API; these two functions run the same core on numpy
arrays, allocating their outputs with numpy. Arrays are read in place through their strides (only
the head dim must be contiguous), so e.g. ``np.broadcast_to`` masks and biases are not copied.
"""

from typing import Optional

import numpy as np

from . import _C


def attention_forward(
    query,
    key,
    value,
    attn_mask=None,
    attn_bias=None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """out (B, Sq, H, D) in the query dtype, and lse (B, H, Sq) float32 when ``return_lse``."""
    query = np.asarray(query)
    if query.ndim != 4:
        raise ValueError(
            "query: expected 4 dims (batch, seqlen_q, num_heads, head_dim), "
            f"got shape {query.shape}"
        )
    batch, seqlen_q, num_heads, _ = query.shape
    out = np.empty(query.shape, dtype=query.dtype)
    lse = np.empty((batch, num_heads, seqlen_q), dtype=np.float32) if return_lse else None
    _C.forward(query, key, value, attn_mask, attn_bias, out, lse, softmax_scale, bool(is_causal),
               float(softcap), None, 0)
    return (out, lse) if return_lse else out


def attention_backward(
    dout,
    query,
    key,
    value,
    out,
    lse,
    attn_mask=None,
    attn_bias=None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    softcap: float = 0.0,
    deterministic: bool = False,
):
    """(dquery, dkey, dvalue, dbias); dbias has attn_bias's shape (None without a bias)."""
    dq = np.empty(np.shape(query), dtype=np.asarray(query).dtype)
    dk = np.empty(np.shape(key), dtype=np.asarray(key).dtype)
    dv = np.empty(np.shape(value), dtype=np.asarray(value).dtype)
    dbias = None
    if attn_bias is not None:
        dbias = np.empty(np.shape(attn_bias), dtype=np.asarray(attn_bias).dtype)
    _C.backward(dout, query, key, value, out, lse, attn_mask, attn_bias, dq, dk, dv, dbias,
                softmax_scale, bool(is_causal), float(softcap), bool(deterministic), None, 0)
    return dq, dk, dv, dbias
