"""flash_sparse_attn: exact attention with a boolean mask and a trainable bias, where the work scales
with the kept tiles. A drop-in for the reference project's Python API (flash-sparse-attn 1.2.3):
the same public names and signatures, implemented on this project's C++ core (CPU backend, and
the CUDA backend where it was built).

Backends: the reference has three (its CUDA extension, Triton, Flex). Here one function,
``flash_sparse_attn_func``, runs on the tensors' device. ``CUDA_AVAILABLE`` says whether the CUDA
backend was compiled in; ``CPU_AVAILABLE`` is always true; the reference's Triton and Flex
backends do not exist here (their flags are False and their functions None, as in a reference
install without them).
"""

from typing import Optional

__version__ = "0.1.0"

# torch first when it is installed: a CUDA build of the extension needs libcudart.so.13, and if
# the extension loads it first (the system's copy) torch's own CUDA libraries then fail to load
# (segfault at import, seen on the H100 machine). Loaded after torch, the extension shares
# torch's copy.
try:
    import torch  # noqa: F401
except ImportError:
    pass

from . import _C  # noqa: E402  (the extension: fails loudly if the package was not built)

CPU_AVAILABLE = True
CUDA_AVAILABLE = bool(_C.has_cuda)
TRITON_AVAILABLE = False
FLEX_AVAILABLE = False

try:
    from .flash_sparse_attn_interface import flash_sparse_attn_func
    from .varlen import flash_sparse_attn_varlen_func
    from .kvcache import flash_sparse_attn_with_kvcache
except ImportError:  # torch is not installed: the numpy-level API (flash_sparse_attn.ops) remains
    flash_sparse_attn_func = None
    flash_sparse_attn_varlen_func = None
    flash_sparse_attn_with_kvcache = None
    CPU_AVAILABLE = False
    CUDA_AVAILABLE = False

# Not provided; None as in a reference install without them.
triton_sparse_attn_func = None
flex_sparse_attn_func = None


def release_cuda_memory() -> None:
    """Give back to the driver the memory the CUDA backend's pools hold unused. The backend takes
    its scratch (plans, gathered keys, split workspaces) from a pool of its own per device that
    keeps it across calls (so a call after a synchronize does not map it again), as torch's
    caching allocator does; ``torch.cuda.empty_cache()`` does not reach it. Synchronize first to
    give back everything. A no-op without CUDA."""
    _C.release_cuda_memory()


def cuda_memory_reserved() -> int:
    """Bytes the CUDA backend's pool of the current device holds (0 before its first CUDA call)."""
    return int(_C.cuda_memory_reserved())


def cuda_plan_graphs() -> dict:
    """The CUDA graphs of per-row top-k planning held (every device): ``graphs``, ``leased`` (in
    use by a live plan) and their ``bytes``. A plan of ``topk=..., topk_causal=True`` without a
    mask replays its shape's graph (one capture per shape and stream, from the shape's second
    plan); ``release_cuda_memory()`` drops the graphs no plan uses."""
    graphs, leased, nbytes = _C.cuda_plan_graphs()
    return {"graphs": int(graphs), "leased": int(leased), "bytes": int(nbytes)}


def get_available_backends():
    """Return a list of available backends ("cuda" when compiled in, then "cpu")."""
    backends = []
    if CUDA_AVAILABLE:
        backends.append("cuda")
    if CPU_AVAILABLE:
        backends.append("cpu")
    return backends


def flash_sparse_attn_func_auto(backend: Optional[str] = None, **kwargs):
    """Return the attention function for ``backend`` ("cuda", "cpu", "triton", "flex"), or for the
    first available one when None. "cuda" and "cpu" name the same function (it runs on the
    tensors' device); "triton" and "flex" raise RuntimeError, as the reference does when that
    backend is missing."""
    if backend is None:
        available = get_available_backends()
        if not available:
            raise RuntimeError(
                "No flash sparse attention backend is available: install torch and build the "
                "package (pip install .)."
            )
        backend = available[0]
    if backend == "cuda":
        if not CUDA_AVAILABLE:
            raise RuntimeError(
                "CUDA backend is not available: this build has no CUDA backend (rebuild with nvcc "
                "present and FSA_ENABLE_CUDA=ON)."
            )
        return flash_sparse_attn_func
    if backend == "cpu":
        if not CPU_AVAILABLE:
            raise RuntimeError("CPU backend is not available: install torch.")
        return flash_sparse_attn_func
    if backend in ("triton", "flex"):
        raise RuntimeError(
            f"{backend} backend is not available in this implementation; use backend=None or "
            "'cuda' / 'cpu' (the same math, with bottom-right aligned causality)."
        )
    raise ValueError(f"Unknown backend: {backend}. Available backends: {get_available_backends()}")


__all__ = [
    "CPU_AVAILABLE",
    "CUDA_AVAILABLE",
    "TRITON_AVAILABLE",
    "FLEX_AVAILABLE",
    "flash_sparse_attn_func",
    "flash_sparse_attn_varlen_func",
    "flash_sparse_attn_with_kvcache",
    "triton_sparse_attn_func",
    "flex_sparse_attn_func",
    "get_available_backends",
    "release_cuda_memory",
    "cuda_memory_reserved",
    "cuda_plan_graphs",
    "flash_sparse_attn_func_auto",
]
