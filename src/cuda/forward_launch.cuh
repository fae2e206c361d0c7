#pragma once
// Definition of launch_forward, included only by the generated instantiation files.

#include "cuda/check.h"
#include "cuda/forward_kernel.cuh"
#include "cuda/forward_launch.h"

namespace fsa::detail::cuda {

template <int kHeadDim, class Elt>
void launch_forward(const ForwardParams& params, cudaStream_t stream) {
  using Tiles = ForwardTiles<kHeadDim>;
  auto* kernel = &forward_kernel<kHeadDim, Elt>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
  FSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Tiles::kSmemBytes));
  const int heads = params.pack_gqa ? params.num_kv_heads : params.num_heads;
  const dim3 grid(params.map.m_blocks * params.num_splits, heads, params.batch);
  kernel<<<grid, Tiles::kThreads, Tiles::kSmemBytes, stream>>>(params);
  FSA_CUDA_CHECK(cudaGetLastError());
  if (params.num_splits > 1) {
    constexpr int kRowsPerBlock = 4;  // one warp per (b, h, i) row
    const int64_t rows = int64_t(params.batch) * params.num_heads * params.seqlen_q;
    combine_kernel<kHeadDim, Elt><<<unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                                    32 * kRowsPerBlock, 0, stream>>>(params);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace fsa::detail::cuda
