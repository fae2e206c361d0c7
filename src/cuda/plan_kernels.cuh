#pragma once
// Device planning: one pass over the mask classifies every tile of the block map as skipped,
// partial or full, then each row (and, in a second kernel, each column) of the map is compacted
// into a list with warp ballots. Tiles outside the causal band or the block selection are never
// read; a query-invariant mask (..., 1, Sk) reads one key row per tile instead of a whole tile.

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace fsa::detail::cuda {

constexpr int kPlanThreads = 256;

__device__ inline int plan_visible_end(const PlanParams& p, int i) {
  if (!p.is_causal) return p.seqlen_k;
  return min(max(i + p.seqlen_k - p.seqlen_q + 1, 0), p.seqlen_k);
}

__device__ inline long long block_sum(long long v, long long* scratch) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  long long total = 0;
  for (int w = 0; w < kPlanThreads / 32; ++w) total += scratch[w];
  return total;
}

// grid (m_blocks, map_heads, map_batch): one CTA classifies and compacts one row of the map.
__global__ void __launch_bounds__(kPlanThreads) classify_kernel(const __grid_constant__ PlanParams p) {
  __shared__ long long scratch[kPlanThreads / 32];
  extern __shared__ uint8_t row_class[];  // (n_blocks)
  const BlockMapParams& map = p.map;
  const int m = blockIdx.x, mh = blockIdx.y, mb = blockIdx.z;
  const int hq = mh * map.head_group;  // a query head of this map head
  const int64_t row = (int64_t(mb) * map.map_heads + mh) * map.m_blocks + m;
  const int r0 = m * map.block_m;
  const int rows = min(map.block_m, p.seqlen_q - r0);
  const int first_end = plan_visible_end(p, r0), last_end = plan_visible_end(p, r0 + rows - 1);
  const uint8_t* mask = p.mask ? p.mask + mb * p.mask_stride[0] +
                                     (hq / p.mask_head_group) * p.mask_stride[1]
                               : nullptr;
  const bool row_invariant = !mask || p.mask_stride[2] == 0;
  long long kept_total = 0;

  for (int n = 0; n < map.n_blocks; ++n) {
    const int c0 = n * map.block_n;
    const int cols = min(map.block_n, p.seqlen_k - c0);
    bool selected = c0 < last_end;
    if (selected && p.selection) {
      selected = p.selection[mb * p.sel_stride[0] + (hq / p.sel_head_group) * p.sel_stride[1] +
                             int64_t(m / p.sel_ratio_m) * p.sel_stride[2] +
                             int64_t(n / p.sel_ratio_n) * p.sel_stride[3]] != 0;
    }
    long long kept = 0;
    if (selected) {
      long long local = 0;
      if (row_invariant && c0 + cols <= first_end) {
        // Every row sees the whole tile and all rows share one key row.
        for (int c = threadIdx.x; c < cols; c += kPlanThreads) {
          local += mask ? (mask[int64_t(c0 + c) * p.mask_stride[3]] != 0) : 1;
        }
        kept = block_sum(local, scratch) * rows;
      } else {
        for (int idx = threadIdx.x; idx < rows * cols; idx += kPlanThreads) {
          const int i = r0 + idx / cols, j = c0 + idx % cols;
          if (j >= plan_visible_end(p, i)) continue;
          local += mask ? (mask[int64_t(i) * p.mask_stride[2] + int64_t(j) * p.mask_stride[3]] != 0)
                        : 1;
        }
        kept = block_sum(local, scratch);
      }
    }
    if (threadIdx.x == 0) {
      const uint8_t cls = kept == 0 ? 0 : (kept == (long long)rows * cols ? 2 : 1);
      row_class[n] = cls;
      p.tile_class[row * map.n_blocks + n] = cls;
    }
    kept_total += kept;
  }
  __syncthreads();

  // Compact the row into the full and partial lists (warp 0, 32 tiles per ballot).
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const unsigned lower = (1u << lane) - 1u;
    int n_full = 0, n_partial = 0;
    int32_t* full = const_cast<int32_t*>(map.full_index) + row * map.n_blocks;
    int32_t* partial = const_cast<int32_t*>(map.partial_index) + row * map.n_blocks;
    for (int base = 0; base < map.n_blocks; base += 32) {
      const int n = base + lane;
      const uint8_t cls = n < map.n_blocks ? row_class[n] : 0;
      const unsigned is_full = __ballot_sync(0xffffffffu, cls == 2);
      const unsigned is_partial = __ballot_sync(0xffffffffu, cls == 1);
      if (cls == 2) full[n_full + __popc(is_full & lower)] = n;
      if (cls == 1) partial[n_partial + __popc(is_partial & lower)] = n;
      n_full += __popc(is_full);
      n_partial += __popc(is_partial);
    }
    if (lane == 0) {
      const_cast<int32_t*>(map.full_count)[row] = n_full;
      const_cast<int32_t*>(map.partial_count)[row] = n_partial;
      atomicAdd(p.counters, (unsigned long long)kept_total);
      atomicAdd(p.counters + 1, (unsigned long long)(n_full + n_partial));
    }
  }
}

// grid (n_blocks, map_heads, map_batch), one warp: the transposed lists of one key block.
__global__ void transpose_kernel(const __grid_constant__ PlanParams p) {
  const BlockMapParams& map = p.map;
  const int n = blockIdx.x, mh = blockIdx.y, mb = blockIdx.z;
  const int lane = threadIdx.x;
  const unsigned lower = (1u << lane) - 1u;
  const int64_t outer = int64_t(mb) * map.map_heads + mh;
  const int64_t col = outer * map.n_blocks + n;
  int32_t* full = const_cast<int32_t*>(map.full_index_t) + col * map.m_blocks;
  int32_t* partial = const_cast<int32_t*>(map.partial_index_t) + col * map.m_blocks;
  int n_full = 0, n_partial = 0;
  for (int base = 0; base < map.m_blocks; base += 32) {
    const int m = base + lane;
    const uint8_t cls =
        m < map.m_blocks ? p.tile_class[(outer * map.m_blocks + m) * map.n_blocks + n] : 0;
    const unsigned is_full = __ballot_sync(0xffffffffu, cls == 2);
    const unsigned is_partial = __ballot_sync(0xffffffffu, cls == 1);
    if (cls == 2) full[n_full + __popc(is_full & lower)] = m;
    if (cls == 1) partial[n_partial + __popc(is_partial & lower)] = m;
    n_full += __popc(is_full);
    n_partial += __popc(is_partial);
  }
  if (lane == 0) {
    const_cast<int32_t*>(map.full_count_t)[col] = n_full;
    const_cast<int32_t*>(map.partial_count_t)[col] = n_partial;
  }
}

}  // namespace fsa::detail::cuda
