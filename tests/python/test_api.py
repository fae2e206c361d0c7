"""The reference's public names, backend selection, and the transformers integration."""

import math

import pytest
import torch

import flash_sparse_attn
from flash_sparse_attn import flash_sparse_attn_func
from flash_sparse_attn.integrations.flash_sparse_attention import (
    flash_sparse_attention_forward,
    register_flash_sparse_attention,
)
from flash_sparse_attn.utils import mask as mask_utils

from conftest import attention_math


def test_public_names():
    for name in ("flash_sparse_attn_func", "flash_sparse_attn_func_auto", "get_available_backends",
                 "CUDA_AVAILABLE", "TRITON_AVAILABLE", "FLEX_AVAILABLE",
                 "flash_sparse_attn_varlen_func", "triton_sparse_attn_func",
                 "flex_sparse_attn_func"):
        assert hasattr(flash_sparse_attn, name), name
    for name in ("create_mask", "topk_mask", "relu_mask", "block_smooth", "create_block_mask"):
        assert callable(getattr(mask_utils, name)), name
    assert flash_sparse_attn.CUDA_AVAILABLE == flash_sparse_attn._C.has_cuda
    assert flash_sparse_attn.TRITON_AVAILABLE is False and flash_sparse_attn.FLEX_AVAILABLE is False


def test_backends():
    backends = flash_sparse_attn.get_available_backends()
    assert "cpu" in backends
    assert flash_sparse_attn.flash_sparse_attn_func_auto() is flash_sparse_attn_func
    assert flash_sparse_attn.flash_sparse_attn_func_auto("cpu") is flash_sparse_attn_func
    if not flash_sparse_attn.CUDA_AVAILABLE:
        with pytest.raises(RuntimeError, match="CUDA"):
            flash_sparse_attn.flash_sparse_attn_func_auto("cuda")
    for missing in ("triton", "flex"):
        with pytest.raises(RuntimeError):
            flash_sparse_attn.flash_sparse_attn_func_auto(missing)
    with pytest.raises(ValueError, match="Unknown backend"):
        flash_sparse_attn.flash_sparse_attn_func_auto("tpu")


def test_reference_positional_signature():
    q = torch.randn(1, 9, 2, 8)
    k = torch.randn(1, 9, 2, 8)
    v = torch.randn(1, 9, 2, 8)
    mask = torch.rand(1, 1, 9, 9) < 0.7
    mask[..., 0] = True
    bias = torch.randn(1, 2, 9, 9)
    # (query, key, value, attn_mask, attn_bias, softmax_scale, is_causal, softcap, deterministic,
    #  return_attn_probs), all positional as the reference allows
    out, lse, probs = flash_sparse_attn_func(q, k, v, mask, bias, 0.5, True, 3.0, True, True)
    ref, _ = attention_math(q.double(), k.double(), v.double(), mask=mask, bias=bias.double(),
                            scale=0.5, causal=True, softcap=3.0)
    assert probs is None and (out.double() - ref).abs().max().item() < 1e-5


class _Module(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal = is_causal
        self.proj = torch.nn.Linear(4, 4)


def test_transformers_forward_head_first_with_bias_window():
    b, h, hk, sq, sk, d = 2, 4, 2, 6, 20, 16
    q = torch.randn(b, h, sq, d)
    k = torch.randn(b, hk, sk, d)
    v = torch.randn(b, hk, sk, d)
    bias = torch.randn(b, hk, sq, sk)
    out, weights = flash_sparse_attention_forward(_Module(), q, k, v, None, bias, scaling=0.25,
                                                  window_size=5)
    assert weights is None and out.shape == (b, sq, h, d)
    mask = mask_utils.create_mask(bias, None, b, sq, sk, 5, torch.finfo(bias.dtype).min)
    ref, _ = attention_math(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                            v.transpose(1, 2).double(), mask=mask, bias=bias.double(),
                            scale=0.25, causal=True)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_transformers_forward_padding_mask_zeroes_padded_queries():
    b, h, s, d = 2, 2, 7, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    out, _ = flash_sparse_attention_forward(_Module(), q, k, v, pad, None)
    key_mask = pad.view(b, 1, 1, s)
    ref, _ = attention_math(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                            v.transpose(1, 2).double(), mask=key_mask, causal=True)
    ref = ref * pad.view(b, s, 1, 1)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (out[1, :3] == 0).all()
    with pytest.raises(ValueError, match="attention_bias"):
        flash_sparse_attention_forward(_Module(), q, k, v, pad, torch.zeros(b, h, s, s))


def test_transformers_forward_decode_and_float_mask():
    b, h, sk, d = 1, 2, 11, 8
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
    additive = torch.zeros(b, 1, 1, sk)
    additive[..., 4] = torch.finfo(torch.float32).min
    out, _ = flash_sparse_attention_forward(_Module(), q, k, v, additive, None)
    keep = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    keep[..., 4] = False
    ref, _ = attention_math(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                            v.transpose(1, 2).double(), mask=keep)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_transformers_registration_runs_a_model():
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    register_flash_sparse_attention()
    assert "flash_sparse_attn" in transformers.AttentionInterface._global_mapping
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :2] = 0
    logits = {}
    for impl in ("eager", "flash_sparse_attn"):
        model.config._attn_implementation = impl
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.allclose(logits["eager"][0], logits["flash_sparse_attn"][0], atol=1e-5)
    assert torch.allclose(logits["eager"][1, 2:], logits["flash_sparse_attn"][1, 2:], atol=1e-5)
    assert math.isfinite(logits["flash_sparse_attn"].sum().item())


def test_cuda_memory_pool_functions_exist_and_are_harmless():
    """release_cuda_memory / cuda_memory_reserved: callable in every build (a no-op and 0 before
    any CUDA call, or without CUDA)."""
    import flash_sparse_attn
    flash_sparse_attn.release_cuda_memory()
    reserved = flash_sparse_attn.cuda_memory_reserved()
    assert isinstance(reserved, int) and reserved >= 0
    if not flash_sparse_attn.CUDA_AVAILABLE:
        assert reserved == 0


def test_kernel_experiments_reported_by_the_build():
    """_C.cuda_kernel_experiments(): {name: value} of the kernel experiments the CUDA backend was
    compiled with (src/cuda/experiments.h), every one an int (0: off); none without CUDA."""
    from flash_sparse_attn import _C
    experiments = _C.cuda_kernel_experiments()
    assert isinstance(experiments, dict)
    if not _C.has_cuda:
        assert experiments == {}
        return
    assert experiments and all(name.startswith("FSA_SM90_") for name in experiments)
    assert all(isinstance(value, int) for value in experiments.values())
