#pragma once
// CUDA error checks for host code: a failed runtime call becomes an fsa::Error naming the call.

#include <cuda_runtime.h>

#include <string>

#include "fsa/error.h"

namespace fsa::detail::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Error(ErrorKind::kUnsupported, "", std::string("CUDA error in ") + what + ": " +
                                                 cudaGetErrorString(status));
  }
}

}  // namespace fsa::detail::cuda

#define FSA_CUDA_CHECK(call) ::fsa::detail::cuda::check_cuda((call), #call)
