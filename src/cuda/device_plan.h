#pragma once
// The block map in device memory, owned by a Plan through a shared pointer.

#include <cuda_runtime.h>

#include <memory>

#include "cuda/params.h"

namespace fsa::detail {

struct DeviceBlockMap {
  cuda::BlockMapParams params;             // list pointers into `storage`
  std::shared_ptr<void> storage;           // one allocation for lists, counts and tile classes
  uint8_t* tile_class = nullptr;           // (rows, n_blocks) in `storage`
  unsigned long long* counters = nullptr;  // PlanParams::counters, in `storage`
  cudaStream_t stream = nullptr;           // the stream the plan was built on (and is read on)
  int device = 0;
};

}  // namespace fsa::detail
