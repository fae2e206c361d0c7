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
            entries per row are kept (create_mask(type="topk")).
        softcap: softcap of the scores (None / 0 = off).
        **kwargs: is_causal, deterministic; output_attentions / head_mask are not supported.

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
    elif (
        attention_bias is not None and window_size is not None and key_len > window_size
    ):
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
    )
    if query_valid is not None:
        out = out * query_valid[:, :, None, None].to(out.dtype)
    return out, None


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
