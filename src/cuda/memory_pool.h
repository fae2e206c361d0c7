#pragma once
// The library's stream-ordered memory pool: every scratch buffer, plan and workspace of the CUDA
// backend comes from here (docs/numerics.md, "Scratch memory").

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

namespace fsa::detail::cuda {

// cudaMallocAsync from the library's pool of the current device, ordered on `stream`; freed with
// scratch_free (cudaFreeAsync). Unlike the device's default pool (release threshold 0: its memory
// goes back to the driver at every synchronize, and the next call maps it again), this pool keeps
// what it has reserved until release_scratch().
//
// Inside a ScratchArena scope (this thread only) allocations are carved from the arena instead,
// and scratch_free leaves them alone: planning captured into a CUDA graph (plan_graph.h).
cudaError_t scratch_malloc(void** ptr, size_t bytes, cudaStream_t stream);
void scratch_free(void* ptr, cudaStream_t stream);
// Ownership of a plan's storage from scratch_malloc: frees it on `stream` when the last owner
// goes, except for arena memory, which its arena's owner frees.
std::shared_ptr<void> scratch_owner(void* ptr, cudaStream_t stream);

// Where this thread's scratch allocations go while it lives (scopes do not nest).
// - measure (base null): from the pool as usual; bytes() sums them as an arena would take them;
// - carve (base set): consecutive 256-byte aligned pieces of [base, base + capacity); an
//   allocation past the end fails with cudaErrorMemoryAllocation; nothing is freed.
class ScratchArena {
 public:
  static constexpr size_t kAlign = 256;
  explicit ScratchArena(void* base = nullptr, size_t capacity = 0);
  ~ScratchArena();
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;
  size_t bytes() const { return used_; }
  bool carving() const { return base_ != nullptr; }

 private:
  friend cudaError_t scratch_malloc(void**, size_t, cudaStream_t);
  friend void scratch_free(void*, cudaStream_t);
  friend std::shared_ptr<void> scratch_owner(void*, cudaStream_t);
  unsigned char* base_;
  size_t capacity_;
  size_t used_ = 0;
};

}  // namespace fsa::detail::cuda
