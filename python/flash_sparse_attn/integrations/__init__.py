"""Integrations: ``flash_sparse_attention.flash_sparse_attention_forward`` for HuggingFace
transformers, and ``register_flash_sparse_attention()`` to add it to transformers' registry."""
