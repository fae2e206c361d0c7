// One memory pool per device for the CUDA backend's scratch (memory_pool.h).

#include "cuda/memory_pool.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/plan_graph.h"

namespace fsa::detail::cuda {
namespace {

std::mutex pools_mutex;
std::vector<cudaMemPool_t> pools;  // by device ordinal; nullptr until that device's first use

// The pool of `device`, created on first use. The release threshold is the largest size: memory
// freed into the pool stays reserved across synchronizations until release_scratch() trims it.
cudaMemPool_t pool_of(int device) {
  std::lock_guard<std::mutex> lock(pools_mutex);
  if (device >= int(pools.size())) pools.resize(device + 1, nullptr);
  if (!pools[device]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    FSA_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t threshold = UINT64_MAX;
    FSA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    pools[device] = pool;
  }
  return pools[device];
}

thread_local ScratchArena* t_arena = nullptr;  // this thread's ScratchArena scope, if any

// FSA_CUDA_SCRATCH_POISON=B fills every scratch allocation with the byte B (1 to 255, e.g. 0xff:
// NaN as a float, -1 as an int32; 0x7f: a large positive int32 and float) on its stream, a debug
// switch for the tests: a read of scratch that nothing wrote first otherwise sees what the pool's
// last user left, often zeros, and passes by luck (an empty query axis's plan left its column
// counts unwritten so; 0x7f makes them huge). Read once per process.
cudaError_t poison(void* ptr, size_t bytes, cudaStream_t stream) {
  static const int byte = [] {
    const char* env = std::getenv("FSA_CUDA_SCRATCH_POISON");
    const long value = env != nullptr ? std::strtol(env, nullptr, 0) : 0;
    return value >= 1 && value <= 255 ? int(value) : 0;
  }();
  return byte != 0 && bytes > 0 ? cudaMemsetAsync(ptr, byte, bytes, stream) : cudaSuccess;
}

}  // namespace

ScratchArena::ScratchArena(void* base, size_t capacity)
    : base_(static_cast<unsigned char*>(base)), capacity_(capacity) {
  t_arena = this;
}

ScratchArena::~ScratchArena() { t_arena = nullptr; }

cudaError_t scratch_malloc(void** ptr, size_t bytes, cudaStream_t stream) {
  if (ScratchArena* arena = t_arena) {
    const size_t at = arena->used_;
    const size_t taken = (bytes + ScratchArena::kAlign - 1) / ScratchArena::kAlign *
                         ScratchArena::kAlign;
    if (arena->carving()) {
      if (taken > arena->capacity_ - at) return cudaErrorMemoryAllocation;
      arena->used_ += taken;
      *ptr = arena->base_ + at;
      return poison(*ptr, bytes, stream);
    }
    arena->used_ += taken;  // measuring: taken from the pool below
  }
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaMallocFromPoolAsync(ptr, bytes, pool_of(device), stream);
  return e == cudaSuccess ? poison(*ptr, bytes, stream) : e;
}

void scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr == nullptr || (t_arena != nullptr && t_arena->carving())) return;
  cudaFreeAsync(ptr, stream);
}

std::shared_ptr<void> scratch_owner(void* ptr, cudaStream_t stream) {
  if (t_arena != nullptr && t_arena->carving()) {
    return std::shared_ptr<void>(ptr, [](void*) {});  // the arena's owner frees it
  }
  return std::shared_ptr<void>(ptr, [stream](void* p) { cudaFreeAsync(p, stream); });
}

void release_scratch() {
  release_plan_graphs();
  std::vector<cudaMemPool_t> created;
  {
    std::lock_guard<std::mutex> lock(pools_mutex);
    created = pools;
  }
  for (cudaMemPool_t pool : created) {
    // Trims what is free after the work queued so far; memory still in use stays reserved.
    if (pool) FSA_CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
  }
}

int64_t scratch_reserved() {
  {
    // No pool yet: 0 without asking the runtime (which fails where there is no driver).
    std::lock_guard<std::mutex> lock(pools_mutex);
    if (pools.empty()) return 0;
  }
  int device = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  {
    std::lock_guard<std::mutex> lock(pools_mutex);
    if (device < int(pools.size())) pool = pools[device];
  }
  if (!pool) return 0;
  uint64_t bytes = 0;
  FSA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &bytes));
  return int64_t(bytes);
}

}  // namespace fsa::detail::cuda
