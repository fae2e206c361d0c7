#pragma once
// The library's stream-ordered memory pool: every scratch buffer, plan and workspace of the CUDA
// backend comes from here (docs/numerics.md, "Scratch memory").

#include <cuda_runtime.h>

#include <cstddef>

namespace fsa::detail::cuda {

// cudaMallocAsync from the library's pool of the current device, ordered on `stream`; freed with
// cudaFreeAsync as usual. Unlike the device's default pool (release threshold 0: its memory goes
// back to the driver at every synchronize, and the next call maps it again), this pool keeps what
// it has reserved until release_scratch().
cudaError_t scratch_malloc(void** ptr, size_t bytes, cudaStream_t stream);

}  // namespace fsa::detail::cuda
