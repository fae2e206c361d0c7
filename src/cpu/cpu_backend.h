#pragma once
// The CPU backend: the same tiled online-softmax algorithm as the GPU kernels, threads over
// (batch, head, query block) in forward and over key / query blocks in backward, visiting only
// the tiles the plan lists. fp32 accumulation for fp32 / bf16 / fp16 inputs, fp64 for fp64 inputs.

#include "core/problem.h"
#include "fsa/plan.h"

namespace fsa::detail::cpu {

void forward(const ForwardProblem& p, const Plan& plan);
void backward(const BackwardProblem& p, const Plan& plan);

}  // namespace fsa::detail::cpu
