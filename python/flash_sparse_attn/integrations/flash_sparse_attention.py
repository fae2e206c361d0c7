"""HuggingFace transformers integration: the reference's ``flash_sparse_attention_forward`` entry
point, and a one-line registration into transformers' attention-function registry:

    from flash_sparse_attn.integrations.flash_sparse_attention import register_flash_sparse_attention
    register_flash_sparse_attention()          # then attn_implementation="flash_sparse_attn"

transformers is only imported by ``register_flash_sparse_attention``: the forward function itself
works on plain torch modules.
"""

import logging
from typing import Optional

import torch

from ..flash_sparse_attn_interface import flash_sparse_attn_func
from ..utils.mask import _expand_2d, create_mask

logger = logging.getLogger(__name__)

_warned_unsupported = False


def _as_bool_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """transformers hands bool masks (True = keep) to SDPA-style implementations; integer masks
    (1 = keep) and additive float masks (0 = keep, a very negative value or -inf = drop) are
    converted."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask != 0


def _packed_bounds(kwargs, batch_size: int, seqlen: int):
    """Packed sequences (padding-free training, DataCollatorWithFlattening: documents in one row,
    their boundaries in cu_seq_lens_* or in position_ids that restart at 0): (cu_seqlens_q,
    cu_seqlens_k), or None for an ordinary batch."""
    for q_name, k_name in (("cu_seq_lens_q", "cu_seq_lens_k"), ("cu_seqlens_q", "cu_seqlens_k")):
        cu_q, cu_k = kwargs.get(q_name), kwargs.get(k_name)
        if cu_q is None and cu_k is None:
            continue
        if cu_q is None or cu_k is None:
            raise ValueError(f"{q_name} / {k_name}: packed sequences need both, got one")
        if batch_size != 1:
            raise NotImplementedError(
                f"{q_name}: packed sequences come as one row (batch_size 1), got {batch_size}")
        return cu_q, cu_k
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] > 1:
        bounds = _restart_bounds(position_ids)
        if bounds is not None:
            if batch_size != 1 or position_ids.shape[-1] != seqlen:
                raise NotImplementedError(
                    "position_ids: restart within a row (packed sequences), supported for one "
                    f"row of {seqlen} tokens, got shape {tuple(position_ids.shape)}"
                )
            return bounds, bounds
    return None


_restart_cache = {}  # id(position_ids) -> (weakref, version, offsets or None)


def _restart_bounds(position_ids):
    """The documents of a packed row as int32 offsets on the host (a new document wherever the
    position ids decrease), or None when they never do. Waits for the device once per tensor
    (transformers passes every layer the same position_ids object)."""
    import weakref

    cached = _restart_cache.get(id(position_ids))
    if cached is not None and cached[0]() is position_ids and cached[1] == position_ids._version:
        return cached[2]
    row = position_ids[0] if position_ids.shape[0] == 1 else position_ids
    starts = (position_ids[:, 1:] < position_ids[:, :-1]).nonzero()[:, -1].add(1).tolist()
    answer = None
    if starts:
        answer = torch.tensor([0] + sorted(set(starts)) + [row.shape[-1]], dtype=torch.int32)
    _restart_cache.clear()
    _restart_cache[id(position_ids)] = (weakref.ref(position_ids), position_ids._version, answer)
    return answer


_causal_key_masks = {}  # id(mask) -> (weakref, version, key mask or None)
_warned_dense_mask = False


def _causal_key_mask(mask, is_causal, bias):
    """For a 4-D bool mask (B|1, 1, Sq, Sk) that is causality (bottom-right) AND one key mask per
    batch (transformers' causal mask with key padding), that key mask (B|1, 1, 1, Sk); else None.
    The check reads the mask once on its device and waits for the answer, once per mask tensor:
    transformers hands every layer of a forward the same mask object, and the answer is cached
    by that object (and its version counter)."""
    if (not is_causal or mask.dim() != 4 or mask.shape[1] != 1 or bias.dim() != 4
            or bias.shape[2] != 1):
        return None
    import weakref

    cached = _causal_key_masks.get(id(mask))
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    sq, sk = mask.shape[-2], mask.shape[-1]
    key_mask = mask[:, :, -1:, :]  # the last row sees every key causality allows
    i = torch.arange(sq, device=mask.device)[:, None]
    j = torch.arange(sk, device=mask.device)[None, :]
    causal = j <= i + sk - sq
    result = key_mask if torch.equal(mask, causal & key_mask) else None
    _causal_key_masks.clear()  # one live mask at a time is the common case; keep it bounded
    _causal_key_masks[id(mask)] = (weakref.ref(mask), mask._version, result)
    return result


def _warn_dense_mask() -> None:
    global _warned_dense_mask
    if not _warned_dense_mask:
        _warned_dense_mask = True
        logger.warning(
            "flash_sparse_attention: window_size with a 4-D attention_mask that is not causal "
            "+ key padding builds create_mask's (B, H, Sq, Sk) mask; masks that are, and "
            "attention_mask=None, select the keys without one"
        )


def _target_dtype(module: torch.nn.Module, query: torch.Tensor) -> Optional[torch.dtype]:
    """float32 inputs (PEFT casts layer norms up) go back to the model's half dtype on the GPU, where
    the kernels are fp16 / bf16; the CPU backend runs float32 as is."""
    if query.dtype != torch.float32 or not query.is_cuda:
        return None
    if torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_pre_quantization_dtype"):
        return config._pre_quantization_dtype
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            return layer.weight.dtype
    return None


def flash_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    attention_bias: Optional[torch.Tensor] = None,
    scaling: Optional[float] = None,
    window_size: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple:
    """Attention for a transformers attention module.

    Args:
        module: the attention module (``is_causal`` is read from it unless passed in kwargs).
        query: (batch_size, num_heads, query_len, head_dim).
        key, value: (batch_size, num_kv_heads, key_len, head_dim).
        attention_mask: bool, (batch_size, seq_len) padding mask or ({B|1}, {H|Hk|1}, {Sq|1},
            {Sk|1}); None for none.
        attention_bias: optional ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}) bias added to the scores.
        scaling: softmax scale (default 1 / sqrt(head_dim)).
        window_size: with a bias and key_len > window_size, only the window_size largest bias
            entries per row are kept, exactly as create_mask(type="topk") keeps them, without
            building its mask: attention_mask None keeps the global top keys per (batch, kv
            head) (a key mask), a 4-D causal (+ key padding) mask the top keys of each row among
            those it may see (per-row thresholds); any other 4-D mask falls back to create_mask's
            (B, H, Sq, Sk) mask, with a warning.
        softcap: softcap of the scores (None / 0 = off).
        **kwargs: is_causal, deterministic; output_attentions / head_mask are not supported.
            Packed sequences (one row of documents, marked by cu_seq_lens_q / cu_seq_lens_k or
            by position_ids that restart) run through flash_sparse_attn_varlen_func: no token
            attends across documents; window_size selects per document.

    Returns:
        (out, None) with out (batch_size, query_len, num_heads, head_dim).
    """
    global _warned_unsupported
    if (kwargs.get("output_attentions", False) or kwargs.get("head_mask") is not None) and (
        not _warned_unsupported
    ):
        _warned_unsupported = True
        logger.warning(
            "flash_sparse_attention does not support output_attentions=True or head_mask; "
            "use the eager implementation for those."
        )

    batch_size, _, query_len, _ = query.shape
    key_len = key.shape[2]
    packed = _packed_bounds(kwargs, batch_size, query_len)
    if any(dim == 0 for dim in query.shape):
        raise ValueError(
            f"query: shape {tuple(query.shape)} has a zero dimension; flash_sparse_attention does "
            "not take empty inputs."
        )

    # Head-first (B, H, S, D) -> the kernels' (B, S, H, D): a transposed view, no copy.
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))

    target_dtype = _target_dtype(module, query)
    if target_dtype is not None:
        query, key, value = (t.to(target_dtype) for t in (query, key, value))
        if attention_bias is not None:
            attention_bias = attention_bias.to(target_dtype)

    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    is_causal = bool(is_causal) and query_len != 1  # decode: the single row sees every key

    attention_mask = _as_bool_mask(attention_mask)
    if packed is not None:
        return _packed_forward(query, key, value, attention_mask, attention_bias, scaling,
                               window_size, softcap, is_causal, kwargs, packed), None
    query_valid = None
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_bias is not None:
            raise ValueError(
                "attention_mask: with a (batch_size, seq_len) padding mask, attention_bias has "
                "to be None."
            )
        # The reference unpads and runs its varlen kernel; here the padding mask becomes a key
        # mask (B, 1, 1, Sk) and padded query rows are zeroed, which gives the same output.
        # Width key_len: a view; width query_len < key_len: left-padded with True; else ValueError.
        key_mask = _expand_2d(attention_mask, batch_size, query_len, key_len)
        if 1 < query_len <= key_len:
            query_valid = key_mask[:, 0, 0, key_len - query_len:]  # (B, Sq)
        attention_mask = key_mask
    topk = {}
    if attention_bias is not None and window_size is not None and key_len > window_size:
        # create_mask(bias, attention_mask, ..., window_size) without an Sq x Sk mask: a key mask
        # when the selection does not depend on the row (no mask, or a key-only one), per-row
        # thresholds when the mask is causality (and key padding) over a query-invariant bias.
        if attention_mask is None or attention_mask.shape[-2] == 1:
            topk = {"topk": int(window_size)}
        else:
            key_mask = _causal_key_mask(attention_mask, is_causal, attention_bias)
            if key_mask is not None:
                attention_mask = key_mask
                topk = {"topk": int(window_size), "topk_causal": True}
            else:
                _warn_dense_mask()
                attention_mask = create_mask(
                    attention_bias, attention_mask, batch_size, query_len, key_len,
                    window_size=window_size, min_dtype=torch.finfo(attention_bias.dtype).min,
                )

    out = flash_sparse_attn_func(
        query, key, value,
        attn_mask=attention_mask,
        attn_bias=attention_bias,
        softmax_scale=scaling,
        is_causal=is_causal,
        softcap=softcap,
        deterministic=kwargs.get("deterministic"),
        **topk,
    )
    if query_valid is not None:
        out = out * query_valid[:, :, None, None].to(out.dtype)
    return out, None


def _packed_forward(query, key, value, attention_mask, attention_bias, scaling, window_size,
                    softcap, is_causal, kwargs, bounds):
    """One row of packed documents (B = 1) through flash_sparse_attn_varlen_func: no token
    attends across documents, causality and the top-``window_size`` selection are per document.
    The mask may be a (1, S) key mask; the bias a per-key (1, {H|Hk|1}, 1, S) one."""
    from ..varlen import flash_sparse_attn_varlen_func

    seqlen = key.shape[1]
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_mask = attention_mask  # (1, S): one key mask for every head
        elif attention_mask.dim() == 4 and attention_mask.shape[2] == 1:
            key_mask = attention_mask[0, :, 0, :]
        else:
            raise NotImplementedError(
                "attention_mask: with packed sequences, a (batch, seq_len) or key-only "
                f"(1, heads, 1, seq_len) mask is supported, got shape {tuple(attention_mask.shape)}"
            )
    bias = None
    if attention_bias is not None:
        if attention_bias.dim() != 4 or attention_bias.shape[2] != 1 or \
                attention_bias.shape[3] != seqlen:
            raise NotImplementedError(
                "attention_bias: with packed sequences, a per-key (1, heads, 1, seq_len) bias is "
                f"supported, got shape {tuple(attention_bias.shape)}"
            )
        bias = attention_bias[0, :, 0, :]
    topk = None
    if bias is not None and window_size is not None and seqlen > window_size:
        topk = int(window_size)
    cu_q, cu_k = bounds
    out = flash_sparse_attn_varlen_func(
        query[0], key[0], value[0], cu_q, cu_k,
        attn_mask=key_mask, attn_bias=bias, softmax_scale=scaling, is_causal=is_causal,
        softcap=softcap, deterministic=kwargs.get("deterministic"), topk=topk,
    )
    return out.unsqueeze(0)


def register_flash_sparse_attention(name: str = "flash_sparse_attn") -> None:
    """Registers ``flash_sparse_attention_forward`` in transformers' attention-function registry
    (and the SDPA mask builder for it, so models hand it bool (B, 1, Sq, Sk) masks), after which
    ``AutoModel.from_config(..., attn_implementation=name)`` uses it."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, flash_sparse_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except (ImportError, KeyError):  # older transformers: no mask registry, masks come as is
        pass
