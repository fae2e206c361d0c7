"""The numpy path: the same core through DLPack with numpy arrays (flash_sparse_attn.ops), outputs
allocated by numpy, read-only broadcast views read in place."""

import numpy as np
import pytest
import torch

from flash_sparse_attn import ops

from conftest import attention_math


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_forward_backward_numpy_matches_reference(dtype):
    rng = np.random.default_rng(5)
    b, sq, sk, h, hk, d = 2, 19, 23, 4, 2, 16
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    mask = np.broadcast_to(rng.random((b, 1, 1, sk)) < 0.8, (b, h, sq, sk))  # read-only view
    bias = rng.standard_normal((1, hk, sq, sk)).astype(dtype)
    out, lse = ops.attention_forward(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                     return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (b, h, sq)

    tq, tk, tv, tb = (torch.from_numpy(np.ascontiguousarray(x)).double().requires_grad_()
                      for x in (q, k, v, bias))
    tmask = torch.from_numpy(np.ascontiguousarray(mask))
    ref, ref_lse = attention_math(tq, tk, tv, mask=tmask, bias=tb, causal=True)
    tol = 1e-5 if dtype == np.float32 else 4e-3
    assert np.abs(out.astype(np.float64) - ref.detach().numpy()).max() < tol
    finite = np.isfinite(ref_lse.detach().numpy())
    assert np.array_equal(np.isneginf(lse), ~finite)
    assert np.abs(lse[finite] - ref_lse.detach().numpy()[finite]).max() < 1e-3

    dout = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv, dbias = ops.attention_backward(dout, q, k, v, out, lse, attn_mask=mask,
                                               attn_bias=bias, is_causal=True)
    ref.backward(torch.from_numpy(dout).double())
    gtol = 1e-4 if dtype == np.float32 else 3e-2
    for ours, r in ((dq, tq), (dk, tk), (dv, tv), (dbias, tb)):
        assert ours.shape == r.shape and ours.dtype == dtype
        assert np.abs(ours.astype(np.float64) - r.grad.numpy()).max() < gtol


def test_numpy_errors():
    q = np.zeros((1, 4, 2, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="key"):
        ops.attention_forward(q, q.astype(np.float16), q)
    with pytest.raises(ValueError, match="query"):
        ops.attention_forward(q[0], q, q)
    with pytest.raises(TypeError, match="query"):
        ops.attention_forward(q.astype(np.int64), q, q)
