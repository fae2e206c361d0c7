"""The transformers integration's window_size: the reference's create_mask selection without an
Sq x Sk mask (attention_mask None: a key mask; a 4-D causal + key-padding mask: per-row
thresholds), the dense fallback for other 4-D masks, and packed sequences run per document."""

import pytest
import torch

import flash_sparse_attn.integrations.flash_sparse_attention as integration
from flash_sparse_attn.integrations.flash_sparse_attention import flash_sparse_attention_forward
from flash_sparse_attn.utils import mask as mask_utils

from conftest import attention_math


class _Module(torch.nn.Module):
    is_causal = True


def head_first(b, h, hk, s, d, dtype=torch.bfloat16):
    return (torch.randn(b, h, s, d).to(dtype), torch.randn(b, hk, s, d).to(dtype),
            torch.randn(b, hk, s, d).to(dtype))


def reference(q, k, v, mask, bias):
    out, _ = attention_math(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                            v.transpose(1, 2).double(), mask=mask, bias=bias.double(), causal=True)
    return out


def forbid_dense_masks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the integration built create_mask's Sq x Sk mask")
    monkeypatch.setattr(integration, "create_mask", refuse)


def test_window_without_mask_keeps_create_masks_key_mask(monkeypatch):
    b, h, hk, s, d, w = 2, 4, 2, 160, 16, 24
    q, k, v = head_first(b, h, hk, s, d)
    bias = torch.randn(b, hk, 1, s).to(torch.bfloat16)
    expected = mask_utils.create_mask(bias, None, b, s, s, w, torch.finfo(bias.dtype).min)
    forbid_dense_masks(monkeypatch)
    out, _ = flash_sparse_attention_forward(_Module(), q, k, v, None, bias, window_size=w)
    assert (out.double() - reference(q, k, v, expected, bias)).abs().max().item() < 2e-2


def test_window_with_causal_padding_mask_uses_row_thresholds(monkeypatch):
    b, h, hk, s, d, w = 2, 4, 2, 150, 16, 20
    q, k, v = head_first(b, h, hk, s, d)
    bias = torch.randn(b, hk, 1, s).to(torch.bfloat16)
    keys = torch.ones(b, 1, 1, s, dtype=torch.bool)
    keys[1, ..., :7] = False  # left padding of the second sequence
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask4d = causal[None, None] & keys
    expected = mask_utils.create_mask(bias, mask4d, b, s, s, w, torch.finfo(bias.dtype).min)
    forbid_dense_masks(monkeypatch)
    out, _ = flash_sparse_attention_forward(_Module(), q, k, v, mask4d, bias, window_size=w)
    ref = reference(q, k, v, expected, bias)
    assert (out.double() - ref).abs().max().item() < 2e-2
    # The additive float form of the same mask takes the same path.
    additive = torch.zeros(b, 1, s, s).masked_fill(~mask4d, torch.finfo(torch.float32).min)
    out2, _ = flash_sparse_attention_forward(_Module(), q, k, v, additive, bias, window_size=w)
    assert torch.equal(out, out2)


def test_window_with_another_4d_mask_falls_back_to_create_mask(caplog):
    b, h, s, d, w = 1, 2, 64, 16, 10
    q, k, v = head_first(b, h, h, s, d)
    bias = torch.randn(b, h, 1, s).to(torch.bfloat16)
    mask4d = torch.rand(b, 1, s, s) < 0.5  # not causal
    expected = mask_utils.create_mask(bias, mask4d, b, s, s, w, torch.finfo(bias.dtype).min)
    integration._warned_dense_mask = False
    with caplog.at_level("WARNING"):
        out, _ = flash_sparse_attention_forward(_Module(), q, k, v, mask4d, bias, window_size=w)
    assert "builds create_mask" in caplog.text
    assert (out.double() - reference(q, k, v, expected, bias)).abs().max().item() < 2e-2


def test_packed_sequences_run_per_document():
    # One row of documents (padding-free training): the same as each document on its own, with
    # causality, a per-key bias and window_size per document; marked by cu_seq_lens_* or by
    # position_ids that restart.
    q, k, v = head_first(1, 4, 2, 12, 16, dtype=torch.float32)
    bias = torch.randn(1, 2, 1, 12)
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    by_cu, _ = flash_sparse_attention_forward(_Module(), q, k, v, None, bias, window_size=4,
                                              cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]])
    by_pos, _ = flash_sparse_attention_forward(_Module(), q, k, v, None, bias, window_size=4,
                                               position_ids=positions)
    assert torch.equal(by_cu, by_pos)
    for s, e in ((0, 3), (3, 10), (10, 12)):
        alone, _ = flash_sparse_attention_forward(
            _Module(), q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, bias[..., s:e],
            window_size=4)
        assert (by_cu[:, s:e] - alone).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        flash_sparse_attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=cu)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        flash_sparse_attention_forward(_Module(), q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool),
                                       position_ids=positions)
    plain = torch.arange(12)[None]
    out, _ = flash_sparse_attention_forward(_Module(), q, k, v, None, position_ids=plain)
    assert out.shape == (1, 12, 4, 16)
