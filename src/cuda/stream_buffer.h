#pragma once
// Scratch memory of one call, stream-ordered, from the library's pool (memory_pool.h).

#include <cuda_runtime.h>

#include "cuda/memory_pool.h"

namespace fsa::detail::cuda {

// Pool memory released (after the work queued on the stream) at scope exit.
struct StreamBuffer {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  StreamBuffer() = default;
  explicit StreamBuffer(cudaStream_t s) : stream(s) {}
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  ~StreamBuffer() {
    scratch_free(ptr, stream);
  }
};

}  // namespace fsa::detail::cuda
