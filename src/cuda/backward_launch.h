#pragma once
// Launchers of the backward pass, one explicit instantiation per (head dim, dtype) in
// src/cuda/generated/ (written by scripts/generate_kernels.py).

#include <cuda_runtime.h>

#include "core/problem.h"
#include "cuda/params.h"
#include "fsa/plan.h"

namespace fsa::detail::cuda {

struct Bf16;
struct Fp16;

// Runs rowdot, dQ, dK/dV and the dbias reduction on `stream`. The accumulators named by
// params.bias_grad must be allocated (and dbias_accum zeroed) by the caller. Returns whether dK
// and dV went to params.scatter (requested there, and every list's dK/dV work split); otherwise
// they are at params.dk / dv.
template <int kHeadDim, class Elt>
bool launch_backward(const BackwardParams& params, cudaStream_t stream);

// The backend's backward (cuda_backend.h), for a compacted call (p over the slots): with
// scatter.slot set, dK and dV are asked for by key at `scatter`. Returns whether they went there;
// otherwise they are at p.dk / p.dv by slot.
bool backward(const BackwardProblem& p, const Plan& plan, void* stream, const KeyScatter& scatter);

}  // namespace fsa::detail::cuda
