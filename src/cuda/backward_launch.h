#pragma once
// Launchers of the backward pass, one explicit instantiation per (head dim, dtype) in
// src/cuda/generated/ (written by scripts/generate_kernels.py).

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace fsa::detail::cuda {

struct Bf16;
struct Fp16;

// Runs rowdot, dQ, dK/dV and the dbias reduction on `stream`. The accumulators named by
// params.bias_grad must be allocated (and dbias_accum zeroed) by the caller.
template <int kHeadDim, class Elt>
void launch_backward(const BackwardParams& params, cudaStream_t stream);

}  // namespace fsa::detail::cuda
