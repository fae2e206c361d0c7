#pragma once
// Definition of launch_backward, included only by the generated instantiation files.

#include <algorithm>

#include "cuda/backward_kernel.cuh"
#include "cuda/backward_launch.h"
#include "cuda/check.h"

namespace fsa::detail::cuda {

template <int kHeadDim, class Elt>
void launch_backward(const BackwardParams& p, cudaStream_t stream) {
  using Tiles = BackwardTiles<kHeadDim>;
  const int64_t elements = int64_t(p.dbias_shape[0]) * p.dbias_shape[1] * p.dbias_shape[2] *
                           p.dbias_shape[3];
  const unsigned grid_1d = unsigned(std::min<int64_t>((elements + 255) / 256, 65535));
  if (p.bias_grad == BiasGrad::kFull && elements > 0) {
    zero_dbias_kernel<Elt><<<grid_1d, 256, 0, stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  if (rows > 0) {
    rowdot_kernel<Elt><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  if (p.map.m_blocks > 0) {
    auto* dq = &dq_kernel<kHeadDim, Elt>;
    FSA_CUDA_CHECK(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tiles::kSmemDq));
    dq<<<dim3(p.map.m_blocks, p.num_heads, p.batch), Tiles::kDqWarps * 32, Tiles::kSmemDq,
         stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  if (p.map.n_blocks > 0) {
    auto* dkdv = &dkdv_kernel<kHeadDim, Elt>;
    FSA_CUDA_CHECK(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tiles::kSmemDkv));
    dkdv<<<dim3(p.map.n_blocks, p.num_kv_heads, p.batch), Tiles::kDkvWarps * 32, Tiles::kSmemDkv,
           stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  const bool reduce = p.bias_grad == BiasGrad::kFullSummed || p.bias_grad == BiasGrad::kRows ||
                      p.bias_grad == BiasGrad::kColumns;
  if (reduce && elements > 0) {
    dbias_reduce_kernel<Elt><<<grid_1d, 256, 0, stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace fsa::detail::cuda
