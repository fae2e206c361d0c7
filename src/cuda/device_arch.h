#pragma once
// Which kernel family serves the current device (host code).

#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/check.h"

namespace fsa::detail::cuda {

// Whether the current device runs this build's Hopper (wgmma) kernels: an sm_90 device and an
// sm_90a image in the build (FSA_CUDA_HAS_SM90A, set by cmake/cuda.cmake when FSA_CUDA_ARCHS
// lists 90a). Otherwise the sm80 kernels serve every device.
inline bool hopper_kernels_available() {
#if defined(FSA_CUDA_HAS_SM90A)
  int device = 0, major = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  FSA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
#else
  return false;
#endif
}

// The current device's SM count (the split rules aim at about two CTAs per SM).
inline int multiprocessor_count() {
  int device = 0, count = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  FSA_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Whether environment variable `name` is set to `value`: the backend's A/B switches
// (FSA_CUDA_FORWARD=sm80, FSA_CUDA_PERSISTENT=0, ...; docs/perf.md). Callers read it once.
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

// Whether the sm90 kernels load tiles by TMA where they can (the forward's K and V, the dK/dV
// passes' Q and dO); FSA_CUDA_TMA=0 keeps cp.async (A/B measurements, docs/perf.md).
inline bool tma_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_TMA", "0");
  return enabled;
}

// Per-row top-k over compacted keys (K / V gathered by slot) runs the sm80 `kernel` at head dims
// whose Hopper kernel does not gather (D = 256: the forward and both backward passes): a choice of
// ours, so the first such call of each kernel says so on stderr (`logged`: once per process, as a
// training loop repeats the call).
inline void log_gathered_on_sm80(std::atomic<bool>& logged, const char* kernel, int head_dim) {
  if (logged.exchange(true)) return;
  std::fprintf(stderr,
               "flash_sparse_attn: per-row top-k over compacted keys at head dim %d runs the sm80 "
               "%s (the Hopper one does not gather keys by slot there). Logged once per "
               "process.\n",
               head_dim, kernel);
}

}  // namespace fsa::detail::cuda
