#pragma once
// The block map in device memory, owned by a Plan through a shared pointer.

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace fsa::detail {

struct DeviceBlockMap {
  cuda::BlockMapParams params;             // list pointers into `storage`
  void* storage = nullptr;                 // one allocation for lists, counts and tile classes
  uint8_t* tile_class = nullptr;           // (rows, n_blocks) in `storage`
  unsigned long long* counters = nullptr;  // PlanParams::counters, in `storage`
  cudaStream_t stream = nullptr;           // the stream the plan was built (and is freed) on
  int device = 0;

  DeviceBlockMap() = default;
  DeviceBlockMap(const DeviceBlockMap&) = delete;
  DeviceBlockMap& operator=(const DeviceBlockMap&) = delete;
  ~DeviceBlockMap() {
    if (storage) cudaFreeAsync(storage, stream);  // ordered after the plan's last use there
  }
};

}  // namespace fsa::detail
