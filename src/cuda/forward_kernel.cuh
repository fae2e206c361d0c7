#pragma once
// Forward kernel on tensor cores (mma.sync m16n8k16, sm80 and later; runs on Hopper).
//
// One CTA per (query block, head, batch). Each warp owns 16 query rows; the CTA walks the plan's
// full key blocks (no mask read, no predicate) and then its partial ones (mask tile and causal
// predicate applied), with K/V tiles double-buffered in shared memory by cp.async. Scores, the
// online softmax and the output accumulator stay in registers.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16 x 8, k-major):     b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C (16 x 8, fp32):        c0 c1 (g, 2t..2t+1)   c2 c3 (g+8, 2t..2t+1)
// So a score tile's C fragments of two adjacent 8-column tiles are exactly the A fragment of the
// P . V product: P never leaves registers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/params.h"
#include "cuda/tiles.h"

namespace fsa::detail::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Bf16 {
  using Storage = __nv_bfloat16;
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float to_float(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0,
                                              b1, d[0], d[1], d[2], d[3]);
  }
};

struct Fp16 {
  using Storage = __half;
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float to_float(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cute::SM80_16x8x16_F32F16F16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0,
                                            b1, d[0], d[1], d[2], d[3]);
  }
};

// Shared-memory tile of (rows, kHeadDim) 16-bit elements, stored in 16-byte chunks with the chunk
// index XOR-ed by (row % 8): the 8 rows an ldmatrix reads at one logical chunk land in 8
// different bank groups, and a row's chunks stay within the row.
template <int kHeadDim>
struct SmemTile {
  static constexpr int kChunks = kHeadDim / 8;
  static_assert(kChunks % 8 == 0, "swizzle needs a multiple of 8 chunks per row");
  __device__ static int offset(int row, int chunk) {  // in elements
    return (row * kChunks + (chunk ^ (row & 7))) * 8;
  }
};

// Asynchronously copies rows [row_begin, row_begin + kRows) of a (S, D) slice with row stride
// `row_stride` into a swizzled tile; rows past `row_limit` and columns past `head_dim` are zero.
template <int kHeadDim, int kRows, int kThreads>
__device__ void load_tile_async(uint16_t* smem, const uint16_t* gmem, int64_t row_stride,
                                int row_begin, int row_limit, int head_dim) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int gr = row_begin + r;
    const bool valid = gr < row_limit && c * 8 < head_dim;
    const uint16_t* src = gmem + (valid ? int64_t(gr) * row_stride + c * 8 : 0);
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(smem + SmemTile<kHeadDim>::offset(r, c)), valid);
  }
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}

__device__ inline int visible_end(const ForwardParams& p, int i) {
  if (!p.is_causal) return p.seqlen_k;
  return min(max(i + p.seqlen_k - p.seqlen_q + 1, 0), p.seqlen_k);
}

template <int kHeadDim, class Elt>
__global__ void __launch_bounds__(ForwardTiles<kHeadDim>::kThreads)
    forward_kernel(const __grid_constant__ ForwardParams p) {
  using Tiles = ForwardTiles<kHeadDim>;
  using Smem = SmemTile<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kNTiles = kBlockN / 8;   // 8-column score tiles per warp row block
  constexpr int kDTiles = kHeadDim / 8;  // 8-column output tiles

  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);  // (kBlockM, kHeadDim)
  uint16_t* s_k = s_q + Tiles::kSmemQ;                     // 2 stages of (kBlockN, kHeadDim)
  uint16_t* s_v = s_k + 2 * Tiles::kSmemKV;                // 2 stages of (kBlockN, kHeadDim)

  const int m = p.map.m_blocks - 1 - int(blockIdx.x);  // longest causal rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = m * kBlockM;

  // This CTA's block lists.
  const int64_t list_row =
      (int64_t(p.map.map_batch == 1 ? 0 : b) * p.map.map_heads + h / p.map.head_group) *
          p.map.m_blocks + m;
  const int n_full = p.map.full_count[list_row];
  const int total = n_full + p.map.partial_count[list_row];
  const int32_t* full_list = p.map.full_index + list_row * p.map.n_blocks;
  const int32_t* partial_list = p.map.partial_index + list_row * p.map.n_blocks;
  auto block_at = [&](int it) { return it < n_full ? full_list[it] : partial_list[it - n_full]; };

  const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const auto* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;

  load_tile_async<kHeadDim, kBlockM, kThreads>(s_q, q, p.q_stride_s, row0, p.seqlen_q, p.head_dim);
  if (total > 0) {
    const int n = block_at(0);
    load_tile_async<kHeadDim, kBlockN, kThreads>(s_k, k, p.k_stride_s, n * kBlockN, p.seqlen_k,
                                                 p.head_dim);
    load_tile_async<kHeadDim, kBlockN, kThreads>(s_v, v, p.v_stride_s, n * kBlockN, p.seqlen_k,
                                                 p.head_dim);
  }
  cute::cp_async_fence();

  float o[kDTiles][4];  // (16 rows, kHeadDim) output accumulator of this warp, C layout
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  // Online softmax state of the thread's two rows (g and g + 8), log2 domain. row_sum is this
  // thread's partial sum over its columns; the quad's sums are added once at the end.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  const int i_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};

  for (int it = 0; it < total; ++it) {
    const int n = block_at(it);
    const bool partial = it >= n_full;
    const int stage = it & 1;
    if (it + 1 < total) {  // prefetch the next K/V tile into the other stage
      const int nn = block_at(it + 1);
      load_tile_async<kHeadDim, kBlockN, kThreads>(s_k + (stage ^ 1) * Tiles::kSmemKV, k,
                                                   p.k_stride_s, nn * kBlockN, p.seqlen_k,
                                                   p.head_dim);
      load_tile_async<kHeadDim, kBlockN, kThreads>(s_v + (stage ^ 1) * Tiles::kSmemKV, v,
                                                   p.v_stride_s, nn * kBlockN, p.seqlen_k,
                                                   p.head_dim);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
    } else {
      cute::cp_async_wait<0>();
    }
    __syncthreads();

    // s (16, kBlockN) = q (16, kHeadDim) . k^T
    const uint16_t* kt = s_k + stage * Tiles::kSmemKV;
    float s[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, s_q + Smem::offset(warp * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        const int mi = lane / 8;
        uint32_t bk[4];
        ldmatrix_x4(bk, kt + Smem::offset(np * 16 + (mi / 2) * 8 + lane % 8, kk * 2 + mi % 2));
        Elt::mma(s[2 * np], a, bk[0], bk[1]);
        Elt::mma(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Logits in the log2 domain: scale (or softcap), bias, then the drops of a partial tile or
    // of the ragged last key block.
    const int col0 = n * kBlockN;
    const bool ragged = col0 + kBlockN > p.seqlen_k;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e];
        x = p.softcap_in != 0.0f ? tanhf(x * p.softcap_in) * p.softcap_out : x * p.scale_log2;
        s[j][e] = x;
      }
    }
    if (p.bias) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = min(i_row[e / 2], p.seqlen_q - 1);
          const int c = min(col0 + j * 8 + 2 * t + (e & 1), p.seqlen_k - 1);
          const int64_t off = b * p.bias_stride[0] + (h / p.bias_head_group) * p.bias_stride[1] +
                              int64_t(i) * p.bias_stride[2] + int64_t(c) * p.bias_stride[3];
          const float bias = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                            : Elt::to_float(p.bias, off);
          s[j][e] += bias * kLog2e;
        }
      }
    }
    if (partial || ragged) {
      const int end[2] = {partial ? visible_end(p, i_row[0]) : p.seqlen_k,
                          partial ? visible_end(p, i_row[1]) : p.seqlen_k};
      const uint8_t* mask = partial ? p.mask : nullptr;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = col0 + j * 8 + 2 * t + (e & 1);
          bool keep = c < end[e / 2];
          if (keep && mask) {
            const int i = min(i_row[e / 2], p.seqlen_q - 1);
            keep = mask[b * p.mask_stride[0] + (h / p.mask_head_group) * p.mask_stride[1] +
                        int64_t(i) * p.mask_stride[2] + int64_t(c) * p.mask_stride[3]] != 0;
          }
          if (!keep) s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax. The -inf guard: while a row has kept nothing its max is -inf and we shift
    // by 0 instead, so dropped entries give exp2(-inf) = 0, never exp2(NaN).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      const float correction = row_max[r] == -INFINITY ? 0.0f : exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      const float shift = new_max == -INFINITY ? 0.0f : new_max;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - shift);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - shift);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        o[d][2 * r] *= correction;
        o[d][2 * r + 1] *= correction;
      }
    }

    // o (16, kHeadDim) += p (16, kBlockN) . v (kBlockN, kHeadDim); v read transposed.
    const uint16_t* vt = s_v + stage * Tiles::kSmemKV;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Elt::pack(s[2 * kk][0], s[2 * kk][1]),
                             Elt::pack(s[2 * kk][2], s[2 * kk][3]),
                             Elt::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Elt::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        const int mi = lane / 8;
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, vt + Smem::offset(kk * 16 + (mi % 2) * 8 + lane % 8, dp * 2 + mi / 2));
        Elt::mma(o[2 * dp], a, bv[0], bv[1]);
        Elt::mma(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Normalize and write. A row that kept nothing has sum 0: O = 0 exactly and LSE = -inf.
  auto* out = static_cast<typename Elt::Storage*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = i_row[r];
    if (i >= p.seqlen_q) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : (sum != sum ? sum : 0.0f);
    auto* orow = out + int64_t(i) * p.o_stride_s;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = d * 8 + 2 * t;
      const float lo = o[d][2 * r] * inv, hi = o[d][2 * r + 1] * inv;
      if (c + 1 < p.head_dim) {
        *reinterpret_cast<uint32_t*>(orow + c) = Elt::pack(lo, hi);
      } else if (c < p.head_dim) {
        const uint32_t packed = Elt::pack(lo, hi);
        *reinterpret_cast<uint16_t*>(orow + c) = uint16_t(packed & 0xffffu);
      }
    }
    if (p.lse && t == 0) {
      const float lse = sum > 0.0f ? (row_max[r] + log2f(sum)) * kLn2
                                   : (sum != sum ? sum : -INFINITY);
      p.lse[b * p.lse_stride_b + h * p.lse_stride_h + int64_t(i) * p.lse_stride_s] = lse;
    }
  }
}

}  // namespace fsa::detail::cuda
