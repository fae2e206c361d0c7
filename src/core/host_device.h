#pragma once
// Functions compiled for the host and, in CUDA translation units, for the device too: index math
// and predicates that the CPU backend and the CUDA kernels share.

#if defined(__CUDACC__)
#define FSA_HOST_DEVICE __host__ __device__
#else
#define FSA_HOST_DEVICE
#endif

#include <cstdint>

namespace fsa::detail {

// The bits that hold every value below n (0 for n <= 1): radix sort key widths.
FSA_HOST_DEVICE inline int bits_below(int64_t n) {
  int bits = 0;
  while ((int64_t(1) << bits) < n) ++bits;
  return bits;
}

}  // namespace fsa::detail
