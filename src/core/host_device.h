#pragma once
// Functions compiled for the host and, in CUDA translation units, for the device too: index math
// and predicates that the CPU backend and the CUDA kernels share.

#if defined(__CUDACC__)
#define FSA_HOST_DEVICE __host__ __device__
#else
#define FSA_HOST_DEVICE
#endif
