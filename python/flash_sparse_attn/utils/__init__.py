"""Utilities: ``flash_sparse_attn.utils.mask`` (the reference's mask helpers, on the C++ core)."""
