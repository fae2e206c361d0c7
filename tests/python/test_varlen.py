"""Packed sequences (flash_sparse_attn_varlen_func, issue #15): every sequence's output and
gradients equal those of flash_sparse_attn_func on that sequence alone (the same core, so to
rounding), and the float64 reference; empty and length-1 sequences; no attention across them."""

import math

import pytest
import torch

from flash_sparse_attn import flash_sparse_attn_func, flash_sparse_attn_varlen_func

H, HK, D = 4, 2, 16


def _packed(lens_q, lens_k, seed, with_mask=False, with_bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, D, generator=g).to(dtype)
    k = torch.randn(tk, HK, D, generator=g).to(dtype)
    v = torch.randn(tk, HK, D, generator=g).to(dtype)
    mask = (torch.rand(HK, tk, generator=g) < 0.7) if with_mask else None
    bias = torch.randn(HK, tk, generator=g).to(dtype) if with_bias else None
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    return q, k, v, mask, bias, cu_q, cu_k


def _grads(fn, leaves, dout):
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extras", ["none", "mask+bias", "topk", "topk_causal"])
def test_each_sequence_as_if_alone(causal, extras):
    if extras == "topk_causal" and not causal:
        pytest.skip("topk_causal selects among the keys causality lets a row see")
    lens_q = [5, 0, 1, 17, 9]
    lens_k = [5, 3, 1, 20, 9] if not causal else [7, 3, 1, 17, 12]  # Sk >= Sq: causal rows see keys
    with_mask = extras == "mask+bias"
    with_bias = extras != "none"
    topk = 4 if extras.startswith("topk") else None
    per_row = {"topk_causal": True} if extras == "topk_causal" else {}
    q, k, v, mask, bias, cu_q, cu_k = _packed(lens_q, lens_k, 7, with_mask, with_bias)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    bias_leaf = bias.clone().requires_grad_(True) if bias is not None else None
    inputs = leaves + ([bias_leaf] if bias_leaf is not None else [])
    out, grads = _grads(
        lambda q_, k_, v_, *b: flash_sparse_attn_varlen_func(
            q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k), attn_mask=mask,
            attn_bias=b[0] if b else None, is_causal=causal, topk=topk, **per_row),
        inputs, dout)
    assert torch.isfinite(out).all()
    for b in range(len(lens_q)):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs:
            continue
        one = [t[s:e].unsqueeze(0).clone().requires_grad_(True)
               for t, (s, e) in ((q, (qs, qe)), (k, (ks, ke)), (v, (ks, ke)))]
        bias_one = (bias[:, ks:ke][None, :, None].clone().requires_grad_(True)
                    if bias is not None else None)
        mask_one = mask[:, ks:ke][None, :, None] if mask is not None else None
        ref = flash_sparse_attn_func(*one, attn_mask=mask_one, attn_bias=bias_one,
                                     is_causal=causal, topk=topk, **per_row)
        ref.backward(dout[qs:qe].unsqueeze(0))
        where = f"sequence {b} ({extras}, causal={causal})"
        torch.testing.assert_close(out[qs:qe], ref.detach()[0], rtol=1e-5, atol=1e-6, msg=where)
        torch.testing.assert_close(grads[0][qs:qe], one[0].grad[0], rtol=1e-5, atol=1e-6,
                                   msg=where)
        torch.testing.assert_close(grads[1][ks:ke], one[1].grad[0], rtol=1e-5, atol=1e-6,
                                   msg=where)
        torch.testing.assert_close(grads[2][ks:ke], one[2].grad[0], rtol=1e-5, atol=1e-6,
                                   msg=where)
        if bias is not None:
            torch.testing.assert_close(grads[3][:, ks:ke], bias_one.grad[0, :, 0], rtol=1e-5,
                                       atol=1e-6, msg=where)
    # Keys of a sequence without queries (sequence 1) get exactly zero gradient.
    ks, ke = int(cu_k[1]), int(cu_k[2])
    assert (grads[1][ks:ke] == 0).all() and (grads[2][ks:ke] == 0).all()


def test_topk_causal_per_document_against_float64():
    """Each row keeps the top-w keys of its own document's causal prefix (create_mask given that
    document's causal mask), documents long enough to run over compacted keys (>= 128 rows)."""
    from flash_sparse_attn.utils.mask import create_mask

    lens = [0, 1, 150, 129, 40]
    w = 12
    q, k, v, _, bias, cu_q, cu_k = _packed(lens, lens, 11, with_bias=True)
    out = flash_sparse_attn_varlen_func(q, k, v, cu_q, cu_k, attn_bias=bias, is_causal=True,
                                        topk=w, topk_causal=True)
    for b in range(len(lens)):
        s, e = int(cu_q[b]), int(cu_q[b + 1])
        if e == s:
            continue
        L = e - s
        bias_b = bias[:, s:e][None, :, None].double()
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
        keep = create_mask(bias_b, causal, 1, L, L, w, torch.finfo(torch.float64).min)
        keep = keep.repeat_interleave(H // HK, dim=1)[0]  # (H, L, L)
        qd = q[s:e].double().transpose(0, 1)
        kd, vd = (t[s:e].double().transpose(0, 1).repeat_interleave(H // HK, dim=0)
                  for t in (k, v))
        scores = qd @ kd.transpose(-1, -2) / math.sqrt(D) + bias_b[0].repeat_interleave(
            H // HK, dim=0)
        probs = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)
        ref = (probs @ vd).transpose(0, 1)
        assert (out[s:e].double() - ref).abs().max().item() < 1e-5, f"document {b}"


def test_against_float64_and_no_cross_talk():
    lens = [6, 11, 1]
    q, k, v, _, _, cu, _ = _packed(lens, lens, 3)
    out = flash_sparse_attn_varlen_func(q, k, v, cu, cu, is_causal=True)
    # Changing one sequence's keys changes nothing in the others.
    k2 = k.clone()
    k2[6:17] += 1.0
    out2 = flash_sparse_attn_varlen_func(q, k2, v, cu, cu, is_causal=True)
    assert torch.equal(out[:6], out2[:6]) and torch.equal(out[17:], out2[17:])
    assert not torch.equal(out[6:17], out2[6:17])
    for s, e in ((0, 6), (6, 17), (17, 18)):
        qh, kh, vh = (t[s:e].double().transpose(0, 1) for t in (q, k, v))
        kh, vh = kh.repeat_interleave(H // HK, 0), vh.repeat_interleave(H // HK, 0)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)
        n = e - s
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        ref = (scores.softmax(-1) @ vh).transpose(0, 1)
        assert (out[s:e].double() - ref).abs().max().item() < 1e-5


def test_lse_and_empty_keys():
    q, k, v, _, _, cu_q, cu_k = _packed([3, 2], [0, 4], 5)
    out, lse, _ = flash_sparse_attn_varlen_func(q, k, v, cu_q, cu_k, return_attn_probs=True)
    assert lse.shape == (H, 5)
    assert (out[:3] == 0).all() and (lse[:, :3] == -math.inf).all()  # no keys: empty rows
    assert torch.isfinite(lse[:, 3:]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 4])), "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 2, 5])), "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([0, 5])), "cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 5.0])), "cu_seqlens_q"),
    (dict(max_seqlen_q=2), "max_seqlen_q"),
    (dict(attn_bias=torch.zeros(3, 6)), "attn_bias"),
    (dict(attn_mask=torch.ones(2, 6)), "attn_mask"),
    (dict(topk=2), "topk"),
    (dict(attn_bias=torch.zeros(2, 6), topk_causal=True, is_causal=True), "topk_causal"),
    (dict(attn_bias=torch.zeros(2, 6), topk=2, topk_causal=True), "topk_causal"),
    (dict(attn_bias=torch.zeros(2, 6), topk=0, topk_causal=True, is_causal=True), "topk"),
])
def test_bad_input_names_the_argument(bad, match):
    q, k, v, _, _, cu_q, cu_k = _packed([2, 3], [4, 2], 1)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_sparse_attn_varlen_func(q, k, v, **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [(2, None), (1, 2), (2, 1), (4, 2), (2, 4)])
def test_packed_topk_mask_is_create_mask_per_sequence(dtype, heads):
    """topk without topk_causal selects all sequences' keys at once with tensor ops
    (_packed_topk_mask); it equals create_mask on each sequence alone, bit for bit: ties to the
    lower index, -0.0 below +0.0, NaN above +inf, masked keys and values equal to the fill never
    kept, sequences shorter than the window, empty sequences."""
    from flash_sparse_attn.utils.mask import create_mask
    from flash_sparse_attn.varlen import _packed_topk_mask

    hb, hm = heads
    lens = [0, 3, 40, 1, 17, 0, 64]
    g = torch.Generator().manual_seed(5)
    total = sum(lens)
    bias = torch.randint(-3, 4, (hb, total), generator=g).to(dtype)  # many ties
    fill = torch.finfo(dtype).min
    bias[:, 5] = -0.0
    bias[:, 6] = 0.0
    bias[:, 7] = fill
    bias[:, 9] = float("nan")
    bias[:, 11] = float("-inf")
    bias[:, 12] = float("inf")
    mask = None if hm is None else torch.rand(hm, total, generator=g) < 0.7
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    for w in (1, 4, 16, 100):
        got = _packed_topk_mask(bias, mask, cu, w)
        for s, e in zip(cu.tolist(), cu.tolist()[1:]):
            if e == s:
                continue
            b1 = bias[:, s:e][None, :, None]
            m1 = None if mask is None else mask[:, s:e][None, :, None]
            if m1 is not None and m1.shape[1] != b1.shape[1] and min(m1.shape[1], b1.shape[1]) > 1:
                if m1.shape[1] < b1.shape[1]:
                    m1 = m1.repeat_interleave(b1.shape[1] // m1.shape[1], dim=1)
                else:
                    b1 = b1.repeat_interleave(m1.shape[1] // b1.shape[1], dim=1)
            want = create_mask(b1, m1, 1, 1, e - s, w, fill)[0, :, 0]
            assert torch.equal(got[:, s:e].expand_as(want), want), (dtype, heads, w, s, e)
