#pragma once
// Host-side launch helpers. An eager decode step pays its call's host time per layer, and on the
// H200 machines that host time exceeded the kernels' at (1, 32K) (docs/perf.md, nineteenth
// session), so launches skip what they need not repeat. (cudaLaunchKernelEx measured no cheaper
// than a triple-chevron launch there: 3.43 against 3.46 us with a 640-byte parameter block.)

#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "cuda/check.h"

namespace fsa::detail::cuda {

// Opts `kernel` into `bytes` of dynamic shared memory on the current device (required above
// 48 KiB). The opt-in sticks to the (kernel, device) while cudaFuncSetAttribute costs host time
// on every call (0.25-0.4 us on the H200 machines), so it is made when a (kernel, device) first
// needs more than it was given, then remembered. (A cudaDeviceReset would forget it on the
// device and not here; the library never resets a device, and torch does not support it.)
inline void allow_dynamic_smem(const void* kernel, int bytes) {
  struct Given {
    const void* kernel;
    int device;
    int bytes;
  };
  static std::mutex mutex;
  static std::vector<Given> given;  // a few dozen kernels at most: a linear search
  int device = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  Given* entry = nullptr;
  for (Given& g : given) {
    if (g.kernel == kernel && g.device == device) entry = &g;
  }
  if (entry != nullptr && entry->bytes >= bytes) return;
  FSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (entry != nullptr) {
    entry->bytes = bytes;
  } else {
    given.push_back({kernel, device, bytes});
  }
}

}  // namespace fsa::detail::cuda
