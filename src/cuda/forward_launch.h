#pragma once
// Launchers of the forward kernel, one explicit instantiation per (head dim, dtype) in
// src/cuda/generated/ (written by scripts/generate_kernels.py).

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace fsa::detail::cuda {

struct Bf16;
struct Fp16;

template <int kHeadDim, class Elt>
void launch_forward(const ForwardParams& params, cudaStream_t stream);

}  // namespace fsa::detail::cuda
