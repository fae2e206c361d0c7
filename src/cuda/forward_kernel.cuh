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

#include <climits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/check.h"
#include "cuda/params.h"
#include "cuda/tiles.h"

namespace fsa::detail::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Bf16 {
  using Storage = __nv_bfloat16;
  static constexpr uint32_t kExponents2 = 0x7f807f80u;  // both halves' exponent bits (NaN / Inf)
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float to_float(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  __device__ static float2 unpack(uint32_t x) {  // (low, high) halves of a packed pair
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0,
                                              b1, d[0], d[1], d[2], d[3]);
  }
};

struct Fp16 {
  using Storage = __half;
  static constexpr uint32_t kExponents2 = 0x7c007c00u;
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static float to_float(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  __device__ static float2 unpack(uint32_t x) {
    __half2 v;
    memcpy(&v, &x, 4);
    return __half22float2(v);
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

// L2 eviction policies (createpolicy, sm_80+) for hinted cp.async: a decode's K / V are read once
// (GQA-packed rows of a kv head in one CTA), so they leave L2 first (evict_first) and do not push
// out what the next kernels reuse; the lines a decode evicts are then mostly its own, never written
// back. evict_normal is the unhinted behaviour (FSA_CUDA_KV_EVICT_FIRST=0, A/B measurements).
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

// Brings the line at `gmem` into L2, and its address translation into the TLBs, without waiting.
__device__ __forceinline__ void prefetch_l2(const void* gmem) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gmem));
}

// One 16-byte cp.async (zero-filled when !valid), with an L2 policy when kHinted.
template <bool kHinted>
__device__ __forceinline__ void cp_async_16(uint16_t* smem, const uint16_t* gmem, bool valid,
                                            uint64_t policy) {
  if constexpr (kHinted) {
    const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
                 "l"(gmem), "r"(valid ? 16 : 0), "l"(policy));
  } else {
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem),
        valid);
  }
}

// Asynchronously copies rows [row_begin, row_begin + kRows) of a (S, D) slice with row stride
// `row_stride` into a swizzled tile; rows past `row_limit` and columns past `head_dim` are zero.
// Thread t always copies chunk t % kChunks of rows t / kChunks + k * kRowsPerPass, so its column,
// its source step and (kRowsPerPass a multiple of 8) its swizzle term are loop-invariant.
// kHinted: through L2 `policy` (l2_policy).
template <int kHeadDim, int kRows, int kThreads, bool kHinted = false>
__device__ void load_tile_async(uint16_t* smem, const uint16_t* gmem, int64_t row_stride,
                                int row_begin, int row_limit, int head_dim, uint64_t policy = 0) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kThreads % kChunks == 0, "threads must cover whole rows");
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0, "passes must cover the tile");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const bool col_ok = c * 8 < head_dim;
  const uint16_t* src = gmem + int64_t(row_begin + r0) * row_stride + c * 8;
  const int64_t src_step = int64_t(kRowsPerPass) * row_stride;
#pragma unroll
  for (int k = 0; k < kRows / kRowsPerPass; ++k) {
    const int r = r0 + k * kRowsPerPass;
    const bool valid = col_ok && row_begin + r < row_limit;
    cp_async_16<kHinted>(smem + SmemTile<kHeadDim>::offset(r, c), valid ? src : gmem, valid,
                         policy);
    src += src_step;
  }
}

// As load_tile_async, for K and V tiles of a paged cache (PagedRows): tile row r is at k_off[r]
// and v_off[r] elements from the kv head's origins k_head and v_head (the forward's ring).
template <int kHeadDim, int kRows, int kThreads, bool kHinted = false>
__device__ void load_paged_tiles_async(uint16_t* s_k, uint16_t* s_v, const uint16_t* k_head,
                                       const uint16_t* v_head, const int64_t* k_off,
                                       const int64_t* v_off, int row_begin, int row_limit,
                                       int head_dim, uint64_t policy = 0) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0, "passes must cover the tile");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const bool col_ok = c * 8 < head_dim;
#pragma unroll
  for (int k = 0; k < kRows / kRowsPerPass; ++k) {
    const int r = r0 + k * kRowsPerPass;
    const bool valid = col_ok && row_begin + r < row_limit;
    const uint16_t* ks = k_head + (valid ? k_off[r] + c * 8 : 0);
    const uint16_t* vs = v_head + (valid ? v_off[r] + c * 8 : 0);
    const int at = SmemTile<kHeadDim>::offset(r, c);
    cp_async_16<kHinted>(s_k + at, ks, valid, policy);
    cp_async_16<kHinted>(s_v + at, vs, valid, policy);
  }
}

// NaN / Inf stored in V at a key that a partial tile drops for some of its rows must not reach
// those rows (SPEC: a dropped key contributes nothing), but the tensor cores multiply the dropped
// entry's P = 0 by it (0 x NaN = NaN). So, per partial tile, the V rows holding a non-finite value
// are found in shared memory (a bit per key). The sm90 kernel zeroes them there before P V and
// adds them back, after the tile's rescale, only to the rows that keep them: o(r, d) += P(r, j)
// V(j, d) from global memory (add_nonfinite_keys); the sm80 kernel records them instead (below).
// Rare by nature: the common path pays the scan of the partial tiles' V only.
template <class Elt>
__device__ __forceinline__ bool chunk_nonfinite(uint4 x) {
  constexpr uint32_t m = Elt::kExponents2;
  return (__vcmpeq2(x.x & m, m) | __vcmpeq2(x.y & m, m) | __vcmpeq2(x.z & m, m) |
          __vcmpeq2(x.w & m, m)) != 0;
}

// The sm90 forward's V check ahead of it (launch_forward): sets *flag (zeroed before) when a V
// value the forward may read is NaN / Inf, so that its partial tiles skip the scan when none is
// (ForwardParams::v_nonfinite); the backward's too (BackwardParams::nonfinite). Grid (kv head
// rows' 16-byte chunks / kVScanChunks, kv heads, batch); each thread reads kVScanChunks /
// kVScanThreads chunks, all its loads in flight at once.
constexpr int kVScanThreads = 256;
constexpr int kVScanChunks = 4 * kVScanThreads;
template <class Elt, class Params>
__global__ void __launch_bounds__(kVScanThreads)
    v_nonfinite_kernel(const __grid_constant__ Params p, int32_t* flag) {
  constexpr int kLoads = kVScanChunks / kVScanThreads;
  const int chunks = (p.head_dim + 7) / 8;  // rows are 16-byte chunks (kernel_rows)
  const int64_t head_chunks = int64_t(p.seqlen_k) * chunks;
  const auto* v = static_cast<const uint16_t*>(p.v) + blockIdx.z * p.v_stride_b +
                  blockIdx.y * p.v_stride_h;
  uint4 x[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int64_t at = int64_t(blockIdx.x) * kVScanChunks + u * kVScanThreads + threadIdx.x;
    x[u] = at < head_chunks ? *reinterpret_cast<const uint4*>(v + at / chunks * p.v_stride_s +
                                                             at % chunks * 8)
                            : make_uint4(0, 0, 0, 0);
  }
  bool bad = false;
#pragma unroll
  for (int u = 0; u < kLoads; ++u) bad |= chunk_nonfinite<Elt>(x[u]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flag, 1);
}

// The V check ahead (v_nonfinite_kernel), the forward's or the backward's: sets *flag where V
// holds a NaN / Inf. The flag's memory must read zero before it.
template <class Elt, class Params>
void launch_v_check(const Params& p, int32_t* flag, cudaStream_t stream) {
  const int64_t head_chunks = int64_t(p.seqlen_k) * ((p.head_dim + 7) / 8);
  const dim3 scan_grid(unsigned((head_chunks + kVScanChunks - 1) / kVScanChunks),
                       unsigned(p.num_kv_heads), unsigned(p.batch));
  if (scan_grid.x > 0) {
    v_nonfinite_kernel<Elt, Params><<<scan_grid, kVScanThreads, 0, stream>>>(p, flag);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
}

// o += P(:, j) V(j, :) for every key j (tile column) of `keys`, from the tile's P (the C fragments
// of a warp's 16 kRT rows, after the softmax step) and the tile's first key row `v_rows` in global
// memory (or, with `slots`, a gathered tile: column j is row slots[j] of v_rows); only entries
// with P != 0 (kept) take part. o_at(rt, d, e) is the output accumulator.
template <int kRT, int kNTiles, int kDTiles, class Elt, class At>
__device__ void add_nonfinite_keys(uint64_t keys, const float (&s)[kRT][kNTiles][4], const At& o_at,
                                   const uint16_t* v_rows, int64_t v_stride_s, int head_dim,
                                   const int32_t* slots = nullptr) {
  const int lane = threadIdx.x % 32, t = lane % 4;
  while (keys != 0) {
    const int j = __ffsll(static_cast<long long>(keys)) - 1;
    keys &= keys - 1;
    const int owner = (lane & ~3) | ((j % 8) / 2);  // the quad lane holding column j
    const uint16_t* vrow = v_rows + int64_t(slots != nullptr ? slots[j] : j) * v_stride_s;
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mine = 0.0f;  // s[rt][j / 8][2 r + j % 2], selected (a runtime index would spill s)
#pragma unroll
        for (int c = 0; c < kNTiles; ++c)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (c * 8 + e == (j & ~6)) mine = s[rt][c][2 * r + e];
          }
        const float pr = __shfl_sync(0xffffffffu, mine, owner);
        if (pr == 0.0f) continue;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = d * 8 + 2 * t + e;
            if (col < head_dim) o_at(rt, d, 2 * r + e) += pr * Elt::to_float(vrow, col);
          }
      }
  }
}

// The sm80 kernel's registers are full (255 at D = 128: the correction above, inlined, took its
// spills from 22 to 154 bytes), so it keeps the finite values of such a row in shared memory
// (clear_nonfinite zeroes only the NaN / Inf elements: P V adds the rest exactly) and records the
// non-finite ones per output element, 2 bits in shared memory (mark_nonfinite_keys), which the
// write turns into the exact result: NaN for a NaN or for both infinities, else the infinity.
template <class Elt>
__device__ __forceinline__ uint4 clear_nonfinite(uint4 x) {
  constexpr uint32_t m = Elt::kExponents2;
  auto clear = [](uint32_t w) { return w & ~__vcmpeq2(w & m, m); };
  return make_uint4(clear(x.x), clear(x.y), clear(x.z), clear(x.w));
}

// Marks, for every key j of `keys` and every row of the warp that keeps it (keeps(rt, r, j): the
// tile's predicate recomputed, no score registers), the non-finite values of V(j, :) in `poison`
// (kHeadDim / 16 words per tile row; code 1 = +inf, 2 = -inf, 3 = NaN, or-ed). The quad's four
// lanes split the columns.
// v_row(j): V's row of the tile's key j.
template <int kRT, int kHeadDim, class Elt, class Keeps, class VRow>
__device__ void mark_nonfinite_keys(uint64_t keys, const Keeps& keeps, int warp_row0,
                                    uint32_t* poison, const VRow& v_row, int head_dim) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  while (keys != 0) {
    const int j = __ffsll(static_cast<long long>(keys)) - 1;
    keys &= keys - 1;
    const uint16_t* vrow = v_row(j);
#pragma unroll 1
    for (int rr = 0; rr < 2 * kRT; ++rr) {
      if (!keeps(rr / 2, rr % 2, j)) continue;
      const int row = warp_row0 + (rr / 2) * 16 + g + 8 * (rr % 2);
#pragma unroll 1
      for (int col = t; col < head_dim; col += 4) {
        const float x = Elt::to_float(vrow, col);
        if (isfinite(x)) continue;
        const uint32_t code = x != x ? 3u : (x > 0.0f ? 1u : 2u);
        atomicOr(&poison[(row * kHeadDim + col) / 16], code << (2 * (col % 16)));
      }
    }
  }
}

// 2^x on the special-function unit. Flush-to-zero is exact here: probabilities below 2^-126 of
// the row's running max contribute nothing to an fp32 sum that contains 1, and exp2(-inf) = 0.
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Softcap's tanh (Params::softcap_in != 0) on the special-function unit: one MUFU.TANH where
// tanhf takes two MUFU and about a dozen FMA-pipe instructions per entry. Its relative error is
// at most about 2^-11 (PTX ISA, tanh.approx.f32), so a capped logit c t is off by at most
// c 2^-11 (docs/numerics.md, "Softcap"); tanh(+-inf) = +-1 and NaN stays NaN, as tanhf. Every
// CUDA kernel caps with it: the backward recomputes the forward's logits, whose LSE it uses.
__device__ __forceinline__ float softcap_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(p), r[0], r[1], r[2],
                                r[3]);
}

// Adds factor x a staged 16-bit bias tile (Params::bias_staged: SmemTile<64>, rows = queries, 64
// keys, filled by load_bias_tile_async) to one warp's 16 x 64 block of mma C fragments s[8][4]
// (rows 16 w + g (+ 8), columns 8 c + 2 t (+ 1)), four ldmatrix per warp. kKeyRows = false: the
// fragment rows are tile rows warp_row0 .. warp_row0 + 15 and its columns the tile's 64 keys (S
// in the forward and the dQ pass). kKeyRows = true: the fragment rows are keys warp_row0 ..
// warp_row0 + 15 and its columns the tile's 64 query rows (S^T in the dK/dV pass), read
// transposed. A fragment of kC < 8 column tiles covers the tile's columns col0 .. col0 + 8 kC - 1
// (col0 a multiple of 16; kKeyRows: the D = 256 dK/dV pass, whose warpgroups take 32 queries
// each).
template <class Elt, bool kKeyRows, int kC>
__device__ __forceinline__ void add_staged_bias(float (&s)[kC][4], const uint16_t* tile,
                                                int warp_row0, float factor, int col0 = 0) {
  static_assert(kC % 2 == 0 && kC <= 8, "16-column ldmatrix blocks of a 64-column tile");
  const int lane = threadIdx.x % 32, sel_a = (lane / 8) & 1, sel_b = lane / 16;
#pragma unroll
  for (int q = 0; q < kC / 2; ++q) {
    // Matrix k of the x4 lands in register k: (fragment rows +0 | +8) x (columns 16 q | 16 q + 8)
    // in the order (0, 0), (+8, 0), (0, +8), (+8, +8); lanes 8 k .. 8 k + 7 address its rows.
    uint32_t r[4];
    if constexpr (!kKeyRows) {
      ldmatrix_x4(r, tile + SmemTile<64>::offset(warp_row0 + lane % 8 + 8 * sel_a,
                                                 col0 / 8 + 2 * q + sel_b));
    } else {
      ldmatrix_x4_trans(r, tile + SmemTile<64>::offset(col0 + 16 * q + lane % 8 + 8 * sel_b,
                                                       warp_row0 / 8 + sel_a));
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 v = Elt::unpack(r[k]);
      s[2 * q + k / 2][2 * (k % 2)] += v.x * factor;
      s[2 * q + k / 2][2 * (k % 2) + 1] += v.y * factor;
    }
  }
}

// A query-invariant bias staged with its key tile (one value per column; fp32 or the 16-bit element
// type, `fp32`) added to a 16-row fragment s (element (j, e) is column 8 j + 2 t + (e & 1)) as one
// fma per element, value * factor + score; 16-bit values are read as pairs, one 32-bit load per
// two columns. (The forward took two 16-bit loads, a multiply per value and an add per element:
// 3.5-5.5% of its time with a per-key bias, docs/perf.md, thirtieth session.)
template <class Elt, int kNTiles>
__device__ __forceinline__ void add_column_bias(float (&s)[kNTiles][4], const void* tile,
                                                bool fp32, int t, float factor) {
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int c = j * 8 + 2 * t;
    const float2 v =
        fp32 ? *reinterpret_cast<const float2*>(static_cast<const float*>(tile) + c)
             : Elt::unpack(
                   *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(tile) + c));
    s[j][0] = fmaf(v.x, factor, s[j][0]);
    s[j][1] = fmaf(v.y, factor, s[j][1]);
    s[j][2] = fmaf(v.x, factor, s[j][2]);
    s[j][3] = fmaf(v.y, factor, s[j][3]);
  }
}

// Swizzled addresses of the ldmatrix operands, mostly precomputed. Every ldmatrix below reads 8
// consecutive rows r0 .. r0 + 7 (r0 a multiple of 8) at logical chunk 2 kk + c, where c in {0, 1}
// depends on the lane. With row & 7 = lane % 8 the physical chunk is (2 kk + c) ^ (lane % 8) =
// (2 kk) ^ x with x = c ^ (lane % 8) < 8, i.e. (2 kk & ~7) + ((2 kk & 7) ^ x): a compile-time part
// and one of four per-lane values. Precomputing the four turns each address into one add plus an
// immediate (the per-instruction swizzle arithmetic made the integer pipe the busiest one).
struct LaneSwizzle {
  int step[4];  // ((2 kk & 7) ^ x) * 8 elements for kk % 4 = 0 .. 3
  __device__ explicit LaneSwizzle(int x) {
#pragma unroll
    for (int k = 0; k < 4; ++k) step[k] = ((2 * k) ^ x) * 8;
  }
  // Offset (elements) of logical chunk pair kk within a row: compile-time kk.
  __device__ int at(int kk) const { return (2 * kk & ~7) * 8 + step[kk & 3]; }
};

// c (16 kRT, kCols) = A[a_row0 .. a_row0 + 16 kRT, :] . B[0 .. kCols, :]^T over kHeadDim, both
// swizzled shared-memory tiles (q . k^T; in the backward also dO . v^T, k . q^T, v . dO^T). Each
// B fragment read from shared memory feeds kRT mma.
template <int kHeadDim, int kCols, int kRT, class Elt>
__device__ inline void warp_gemm_nt(float (&c)[kRT][kCols / 8][4], const uint16_t* sa, int a_row0,
                                    const uint16_t* sb) {
  const int lane = threadIdx.x % 32;
  // A (x4): matrices (rows 0-7 | 8-15) x (chunk 0 | 1): lane -> row lane % 16, chunk lane / 16.
  const uint16_t* a_base = sa + (a_row0 + lane % 16) * kHeadDim;
  const LaneSwizzle a_swz((lane / 16) ^ (lane % 8));
  // B (x4): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  const uint16_t* b_base = sb + ((lane / 16) * 8 + lane % 8) * kHeadDim;
  const LaneSwizzle b_swz(((lane / 8) % 2) ^ (lane % 8));
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) c[rt][j][0] = c[rt][j][1] = c[rt][j][2] = c[rt][j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t a[kRT][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) ldmatrix_x4(a[rt], a_base + rt * 16 * kHeadDim + a_swz.at(kk));
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_base + np * 16 * kHeadDim + b_swz.at(kk));
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
        Elt::mma(c[rt][2 * np], a[rt], b[0], b[1]);
        Elt::mma(c[rt][2 * np + 1], a[rt], b[2], b[3]);
      }
    }
  }
}

// acc (16 kRT, kHeadDim) += P (16 kRT, kCols, in registers: a C fragment is the next product's A
// fragment) . B (kCols, kHeadDim), B read transposed from a swizzled tile (p . v; in the backward
// also dX . k, P^T . dO, dX^T . q). Each B fragment feeds kRT mma. kRowElems: B's row length when
// the product covers only kHeadDim of its columns (the D = 256 dK/dV pass's halves): sb then points
// at the first column, a multiple of 64 (the swizzle permutes chunks within groups of 8).
template <int kHeadDim, int kCols, int kRT, class Elt, int kRowElems = kHeadDim>
__device__ inline void warp_gemm_pv(float (&acc)[kRT][kHeadDim / 8][4],
                                    const float (&p)[kRT][kCols / 8][4], const uint16_t* sb) {
  const int lane = threadIdx.x % 32;
  // B (x4, transposed): matrices (keys 0-7 | 8-15) x (d chunk 0 | 1): lane -> key row
  // ((lane / 8) % 2) * 8 + lane % 8, chunk lane / 16.
  const uint16_t* b_base = sb + (((lane / 8) % 2) * 8 + lane % 8) * kRowElems;
  const LaneSwizzle b_swz((lane / 16) ^ (lane % 8));
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    uint32_t a[kRT][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
      a[rt][0] = Elt::pack(p[rt][2 * kk][0], p[rt][2 * kk][1]);
      a[rt][1] = Elt::pack(p[rt][2 * kk][2], p[rt][2 * kk][3]);
      a[rt][2] = Elt::pack(p[rt][2 * kk + 1][0], p[rt][2 * kk + 1][1]);
      a[rt][3] = Elt::pack(p[rt][2 * kk + 1][2], p[rt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_base + kk * 16 * kRowElems + b_swz.at(dp));
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
        Elt::mma(acc[rt][2 * dp], a[rt], b[0], b[1]);
        Elt::mma(acc[rt][2 * dp + 1], a[rt], b[2], b[3]);
      }
    }
  }
}

// Keys [0, visible_end) are visible to row i of (b, head): bottom-right causality, or on the
// compacted-key path the row's own bound (core/row_end.h), which also holds the mask. Forward and
// backward params alike. A cache's lengths (ForwardParams::cache_seqlens) shift it: key_shift.
template <class Params>
__device__ inline int visible_end(const Params& p, int b, int head, int i) {
  if (p.row_end.data != nullptr) return int(p.row_end.at(b, head, i));
  if (!p.is_causal) return p.seqlen_k;
  return min(max(i + p.seqlen_k - p.seqlen_q + 1, 0), p.seqlen_k);
}

// A cache's lengths, as a shift of visible_end: batch b holds keys [0, L), L its length clamped
// into [0, Sk] (never read on the host), and with shift = Sk - L row i sees keys
// [0, max(visible_end(i) - shift, 0)): L without causality, and with it
// max(i + L - Sq + 1, 0) = max((i + Sk - Sq + 1) - shift, 0) (visible_end's clamp at Sk never
// binds, i < Sq). 0 without lengths. One integer per CTA, so that the kernels' row loops hold no
// pointer for it.
__device__ inline int key_shift(const ForwardParams& p, int b) {
  return p.cache_seqlens == nullptr ? 0 : p.seqlen_k - min(max(p.cache_seqlens[b], 0), p.seqlen_k);
}

// Row r of a CTA tile: the query row and the query head it belongs to.
struct RowMap {
  int row0;      // first flat row of the tile
  int h;         // the CTA's head (unpacked) or kv head (packed)
  bool packed;   // rows are (query, head-in-group) pairs
  int group;
  __device__ void at(int r, int& i, int& head) const {
    const int f = row0 + r;
    if (packed) {
      i = f / group;
      head = h * group + f % group;
    } else {
      i = f;
      head = h;
    }
  }
};

// What one warp needs to process its rows of a CTA tile, shared by the sm80 and the sm90 kernel.
// Both hold a warp's scores and outputs in the mma C layout: fragment (rt, j) of a thread covers
// rows warp_row0 + 16 rt + g (+ 8) and columns 8 j + 2 t (+ 1), g = lane / 4, t = lane % 4.
struct WarpRows {
  const ForwardParams& p;
  RowMap rows;
  int b;
  int warp_row0;  // the warp's first row within the tile
  int g, t;
  int flat_rows;  // rows of the whole problem in the row map's numbering
  bool bias_rows_shared;  // a query-invariant bias with the same head for every row of the tile
  // Logits stay in the units of the scores q . k (no multiply per element) unless softcap (or a
  // scale too small to divide by) needs them in the log2 domain: exp_scale takes them there inside
  // the softmax's exp2 (one fma), bias_factor takes a bias into their units (once per value).
  bool prescaled;
  float exp_scale;
  float bias_factor;

  __device__ WarpRows(const ForwardParams& params, int m, int block_m, int h, int b_, int row0)
      : p(params),
        rows{m * block_m, h, params.pack_gqa, params.group},
        b(b_),
        warp_row0(row0),
        g(threadIdx.x % 32 / 4),
        t(threadIdx.x % 4),
        flat_rows(params.pack_gqa ? params.seqlen_q * params.group : params.seqlen_q),
        bias_rows_shared(params.bias != nullptr && params.bias_stride[2] == 0 &&
                         (!params.pack_gqa || params.bias_head_group % params.group == 0)),
        prescaled(params.softcap_in != 0.0f || !(params.scale_log2 >= 1e-20f)),
        exp_scale(prescaled ? 1.0f : params.scale_log2),
        bias_factor(prescaled ? kLog2e : kLog2e / params.scale_log2) {}

  // Fragment row (rt, r): its query row and head. Recomputed where used (a few integer ops)
  // rather than held in registers, which the accumulators need.
  __device__ void row_of(int rt, int r, int& i, int& head) const {
    rows.at(warp_row0 + rt * 16 + g + 8 * r, i, head);
    i = min(i, p.seqlen_q - 1);  // padded rows read row Sq - 1 and are never written
    head = min(head, p.num_heads - 1);
  }
  __device__ bool row_valid(int rt, int r) const {
    return rows.row0 + warp_row0 + rt * 16 + g + 8 * r < flat_rows;
  }
  template <class Elt>
  __device__ float bias_at(int i, int head, int c) const {  // bias(b, head, i, c), c clamped
    const int64_t off = b * p.bias_stride[0] + (head / p.bias_head_group) * p.bias_stride[1] +
                        int64_t(i) * p.bias_stride[2] +
                        int64_t(min(c, p.seqlen_k - 1)) * p.bias_stride[3];
    return p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off] : Elt::to_float(p.bias, off);
  }

  // Whether fragment row (rt, r) keeps key column c of a partial tile: what logits() decides for
  // it, recomputed from the operands (mask, causality, a -inf bias, the row's top-k threshold).
  // `shift`: key_shift (a cache's lengths), as logits() got it.
  template <class Elt>
  __device__ bool keeps_entry(int rt, int r, int c, int shift = 0) const {
    if (!row_valid(rt, r)) return false;
    int i, head;
    row_of(rt, r, i, head);
    if (c >= p.seqlen_k || c >= visible_end(p, b, head, i) - shift) return false;
    if (p.row_end.key_last != nullptr && i > p.row_end.key_last_row(b, head)[c]) return false;
    if (p.mask && p.mask[b * p.mask_stride[0] + (head / p.mask_head_group) * p.mask_stride[1] +
                         int64_t(i) * p.mask_stride[2] + int64_t(c) * p.mask_stride[3]] == 0) {
      return false;
    }
    if (p.bias) {
      const float v = bias_at<Elt>(i, head, c);
      if (v == -INFINITY) return false;
      if (p.row_topk.key != nullptr && !p.row_topk.keeps(v, c, p.row_topk.at(b, head, i))) {
        return false;
      }
    }
    return true;
  }

  // Scores of key tile col0 .. col0 + 8 kNTiles into logits in the log2 domain: scale (or
  // softcap), bias, then the drops of a partial tile or of the ragged last key block.
  // `bias_tile`, when given, holds this tile's kNTiles * 8 values of a query-invariant bias (in
  // the bias's dtype), already in shared memory; `staged_tile`, when given, the tile's rows x
  // (kNTiles * 8) block of a bias with a query dim (ForwardParams::bias_staged, row = tile row).
  // `last_tile`, when given, holds the tile's RowEnd::key_last values in shared memory, and
  // `row_ends`, when given, the fragment rows' visible ends (else both are read from the params).
  // `slot_tile`, when given, makes the tile a gathered one (BlockMapParams::gather_slots): column
  // c is slot slot_tile[c] (-1: none), with its bias value in bias_tile and its last row in
  // last_tile; col0 is unused. `shift`: key_shift (a cache's lengths; the sm80 kernel), which
  // moves every row's visible end of a partial tile left.
  template <int kRT, int kNTiles, class Elt>
  __device__ __forceinline__ void logits(float (&s)[kRT][kNTiles][4], int col0, bool partial,
                                         const void* bias_tile = nullptr,
                                         const uint16_t* staged_tile = nullptr,
                                         const int32_t* last_tile = nullptr,
                                         const int (*row_ends)[2] = nullptr,
                                         const int32_t* slot_tile = nullptr,
                                         int shift = 0) const {
    constexpr int kBlockN = kNTiles * 8;
    if (p.softcap_in != 0.0f) {  // branch outside the element loop: the cap costs on every path
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[rt][j][e] = softcap_tanh(s[rt][j][e] * p.softcap_in) * p.softcap_out;
          }
    } else if (prescaled) {
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[rt][j][e] *= p.scale_log2;
    }
    if (bias_rows_shared && bias_tile != nullptr && p.row_topk.key == nullptr) {
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
        add_column_bias<Elt>(s[rt], bias_tile, p.bias_is_fp32, t, bias_factor);
      }
    } else if (bias_rows_shared) {
      // A query-invariant bias (..., 1, Sk|1): one value per column, shared by every row. A
      // contiguous key dim on a whole tile is read straight through a pointer; anything else
      // (strides, the ragged last tile) through the general clamped offset.
      float bias_col[kNTiles][2];
      int i0, head0;
      row_of(0, 0, i0, head0);
      if (bias_tile != nullptr) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          const int c = j * 8 + 2 * t;
          if (p.bias_is_fp32) {
            const float2 v = *reinterpret_cast<const float2*>(static_cast<const float*>(bias_tile) + c);
            bias_col[j][0] = v.x;
            bias_col[j][1] = v.y;
          } else {
            bias_col[j][0] = Elt::to_float(bias_tile, c);
            bias_col[j][1] = Elt::to_float(bias_tile, c + 1);
          }
        }
      } else if (p.bias_stride[3] == 1 && col0 + kBlockN <= p.seqlen_k) {
        const int64_t off = b * p.bias_stride[0] + (head0 / p.bias_head_group) * p.bias_stride[1] +
                            col0 + 2 * t;
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          bias_col[j][0] = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off + j * 8]
                                          : Elt::to_float(p.bias, off + j * 8);
          bias_col[j][1] = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off + j * 8 + 1]
                                          : Elt::to_float(p.bias, off + j * 8 + 1);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          const int c = col0 + j * 8 + 2 * t;
          bias_col[j][0] = bias_at<Elt>(0, head0, c);
          bias_col[j][1] = bias_at<Elt>(0, head0, c + 1);
        }
      }
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        const float b0 = bias_col[j][0] * bias_factor, b1 = bias_col[j][1] * bias_factor;
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) {
          s[rt][j][0] += b0;
          s[rt][j][1] += b1;
          s[rt][j][2] += b0;
          s[rt][j][3] += b1;
        }
      }
      if (p.row_topk.key != nullptr) {  // per-row top-k: each row's threshold on these values
        uint32_t col_key[kNTiles][2];  // the values' order keys, shared by the rows
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) col_key[j][e] = order_key(bias_col[j][e]);
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            int i, head;
            row_of(rt, r, i, head);
            const int64_t at = p.row_topk.at(b, head, i);
            const uint32_t threshold = p.row_topk.key[at];
            const int last = p.row_topk.last[at];
#pragma unroll
            for (int j = 0; j < kNTiles; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                if (!p.row_topk.keeps_key(col_key[j][e], col0 + j * 8 + 2 * t + e, threshold,
                                          last)) {
                  s[rt][j][2 * r + e] = -INFINITY;
                }
              }
          }
      }
    } else if (kNTiles == 8 && staged_tile != nullptr) {
      if constexpr (kNTiles == 8) {  // staged bias tiles are 64 keys wide (the sm90 kernel's)
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) {
          add_staged_bias<Elt, false>(s[rt], staged_tile, warp_row0 + rt * 16, bias_factor);
        }
      }
    } else if (p.bias) {
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int i, head;
          row_of(rt, r, i, head);
          const int64_t at = p.row_topk.key != nullptr ? p.row_topk.at(b, head, i) : 0;
#pragma unroll
          for (int j = 0; j < kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = col0 + j * 8 + 2 * t + e;
              const float v = bias_at<Elt>(i, head, c);
              s[rt][j][2 * r + e] += v * bias_factor;
              if (p.row_topk.key != nullptr && !p.row_topk.keeps(v, c, at)) {
                s[rt][j][2 * r + e] = -INFINITY;
              }
            }
        }
    }
    if (partial || (slot_tile == nullptr && col0 + kBlockN > p.seqlen_k)) {
      const uint8_t* mask = partial ? p.mask : nullptr;
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int i, head;
          row_of(rt, r, i, head);
          const int end = !partial ? p.seqlen_k
                          : row_ends  ? row_ends[rt][r]
                                      : visible_end(p, b, head, i) - shift;
          const uint8_t* mrow =
              mask ? mask + b * p.mask_stride[0] + (head / p.mask_head_group) * p.mask_stride[1] +
                         int64_t(i) * p.mask_stride[2]
                   : nullptr;
          // Per-row top-k over compacted keys: slot c is kept up to its last row (c < end bounds
          // a global read: row ends never pass the list).
          const bool by_last = partial && p.row_end.key_last != nullptr;
          const int32_t* last = by_last && last_tile == nullptr
                                    ? p.row_end.key_last_row(b, head) + col0
                                    : last_tile;
#pragma unroll
          for (int j = 0; j < kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = col0 + j * 8 + 2 * t + e;
              // A gathered tile's padding slot -1 is above every end as unsigned.
              const bool keep =
                  slot_tile != nullptr
                      ? uint32_t(slot_tile[c - col0]) < uint32_t(end) && i <= last[c - col0]
                      : c < end && (!mrow || mrow[int64_t(c) * p.mask_stride[3]] != 0) &&
                            (!by_last || i <= last[c - col0]);
              if (!keep) s[rt][j][2 * r + e] = -INFINITY;
            }
        }
    }
  }

  // Normalizes and writes the warp's rows: the output, or this split's partial output and LSE. A
  // row that kept nothing has sum 0: O = 0 exactly and LSE = -inf.
  template <int kHeadDim, int kRT, class Elt>
  // poison: the sm80 kernel's marks of non-finite V values (mark_nonfinite_keys), or null.
  __device__ __forceinline__ void write(const float (&o_acc)[kRT][kHeadDim / 8][4],
                                        const float (&row_max)[kRT][2],
                                        const float (&row_sum)[kRT][2], int split,
                                        const uint32_t* poison = nullptr) const {
    constexpr int kDTiles = kHeadDim / 8;
    float o[kRT][kDTiles][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
      for (int d = 0; d < kDTiles; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          o[rt][d][e] = o_acc[rt][d][e];
          if (poison != nullptr) {
            const int row = warp_row0 + rt * 16 + g + 8 * (e / 2), col = d * 8 + 2 * t + e % 2;
            const uint32_t code = (poison[(row * kHeadDim + col) / 16] >> (2 * (col % 16))) & 3u;
            if (code != 0) o[rt][d][e] = code == 3u ? NAN : (code == 1u ? INFINITY : -INFINITY);
          }
        }
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = row_sum[rt][r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (!row_valid(rt, r)) continue;
        int i, head;
        row_of(rt, r, i, head);
        const float inv = sum > 0.0f ? 1.0f / sum : (sum != sum ? sum : 0.0f);
        const float lse = sum > 0.0f ? (row_max[rt][r] + log2f(sum)) * kLn2
                                     : (sum != sum ? sum : -INFINITY);
        if (p.num_splits > 1) {
          const int64_t row =
              ((int64_t(split) * p.batch + b) * p.num_heads + head) * p.seqlen_q + i;
          float* orow = p.o_partial + row * kHeadDim;
#pragma unroll
          for (int d = 0; d < kDTiles; ++d) {
            *reinterpret_cast<float2*>(orow + d * 8 + 2 * t) =
                make_float2(o[rt][d][2 * r] * inv, o[rt][d][2 * r + 1] * inv);
          }
          if (t == 0) p.lse_partial[row] = lse;
          continue;
        }
        auto* orow = static_cast<typename Elt::Storage*>(p.out) + b * p.o_stride_b +
                     int64_t(i) * p.o_stride_s + head * p.o_stride_h;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          const int c = d * 8 + 2 * t;
          const uint32_t packed = Elt::pack(o[rt][d][2 * r] * inv, o[rt][d][2 * r + 1] * inv);
          if (c + 1 < p.head_dim && (reinterpret_cast<uintptr_t>(orow + c) & 3) == 0) {
            *reinterpret_cast<uint32_t*>(orow + c) = packed;
          } else {  // odd strides or the last odd column: element stores
            if (c < p.head_dim) *reinterpret_cast<uint16_t*>(orow + c) = uint16_t(packed & 0xffffu);
            if (c + 1 < p.head_dim) {
              *reinterpret_cast<uint16_t*>(orow + c + 1) = uint16_t(packed >> 16);
            }
          }
        }
        if (p.lse && t == 0) {
          p.lse[b * p.lse_stride_b + head * p.lse_stride_h + int64_t(i) * p.lse_stride_s] = lse;
        }
      }
  }
};

// One online-softmax step of a warp's rows over a tile of logits (log2 domain after multiplying
// by exp_scale, a positive factor): probabilities replace the logits in s, row max (log2 domain)
// and partial row sums advance, and `correction` receives the factor the output accumulator must
// be scaled by before this tile's P . V is added. The -inf guard: while a row has kept nothing its
// max is -inf and we shift by 0 instead, so dropped entries give exp2(-inf) = 0, never
// exp2(NaN). Max and sum are reduced as trees: a chain of dependent adds would leave the warp
// waiting on each one.
// part[j] = op(part[j], part[j + kWidth]) for j < kWidth, then the next level down to one value
// in part[0]: the levels unrolled at compile time. (A loop over the levels, `for (w = n / 2; w >
// 0; w /= 2)`, stayed rolled at 16 n-tiles and put the array in local memory.)
template <int kWidth, int kN, class Op>
__device__ __forceinline__ void tree_reduce(float (&part)[kN], Op op) {
  if constexpr (kWidth > 0) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) part[j] = op(part[j], part[j + kWidth]);
    tree_reduce<kWidth / 2>(part, op);
  }
}

template <int kRT, int kNTiles>
__device__ __forceinline__ void softmax_step(float (&s)[kRT][kNTiles][4], float exp_scale,
                                             float (&row_max)[kRT][2], float (&row_sum)[kRT][2],
                                             float (&correction)[kRT][2]) {
  static_assert((kNTiles & (kNTiles - 1)) == 0, "tree reductions over a power of two");
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float part[kNTiles];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) part[j] = fmaxf(s[rt][j][2 * r], s[rt][j][2 * r + 1]);
      tree_reduce<kNTiles / 2>(part, [](float a, float b) { return fmaxf(a, b); });
      float tile_max = part[0];
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[rt][r], tile_max * exp_scale);
      correction[rt][r] = row_max[rt][r] == -INFINITY ? 0.0f : fast_exp2(row_max[rt][r] - new_max);
      row_max[rt][r] = new_max;
      const float shift = new_max == -INFINITY ? 0.0f : new_max;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        s[rt][j][2 * r] = fast_exp2(fmaf(s[rt][j][2 * r], exp_scale, -shift));
        s[rt][j][2 * r + 1] = fast_exp2(fmaf(s[rt][j][2 * r + 1], exp_scale, -shift));
        part[j] = s[rt][j][2 * r] + s[rt][j][2 * r + 1];
      }
      tree_reduce<kNTiles / 2>(part, [](float a, float b) { return a + b; });
      row_sum[rt][r] = row_sum[rt][r] * correction[rt][r] + part[0];
    }
}

// Scales fragment row (rt, r) of an accumulator by correction[rt][r], addressed through
// at(rt, d, e) (the C layout). Only when some row of the warp moved its max (after the first tiles
// that is rare); the vote keeps the branch uniform.
template <int kRT, int kDTiles, class At>
__device__ __forceinline__ void rescale_rows(const At& at, const float (&correction)[kRT][2]) {
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (__any_sync(0xffffffffu, correction[rt][r] != 1.0f)) {
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          at(rt, d, 2 * r) *= correction[rt][r];
          at(rt, d, 2 * r + 1) *= correction[rt][r];
        }
      }
    }
}

// This CTA's share of its block lists: full key blocks first, then partial ones.
// Row of the map's lists for (batch b, map head h_map, query block m).
__device__ __forceinline__ int64_t map_row(const ForwardParams& p, int b, int h_map, int m) {
  return (int64_t(p.map.map_batch == 1 ? 0 : b) * p.map.map_heads + h_map) * p.map.m_blocks + m;
}
// Iterations [begin, end) of split `split` of a list of `listed` entries.
__device__ __forceinline__ void split_range(int listed, int num_splits, int split, int& begin,
                                            int& end) {
  const int per_split = (listed + num_splits - 1) / num_splits;
  begin = min(listed, split * per_split);
  end = min(listed, begin + per_split);
}

// How many of the first `n_a` entries of ascending list `a` (and of `n_b` of list `b`) are below
// `bound`, found by one warp with 32 probes per list and step: about log32(n) dependent loads.
// Every lane returns both counts.
__device__ inline void warp_count_below(const int32_t* a, int n_a, const int32_t* b, int n_b,
                                        int bound, int& below_a, int& below_b) {
  const int lane = threadIdx.x % 32;
  // The answer of each list lies in [lo, hi]; each step probes lo + l * step, l = 0 .. 31, and the
  // probes below the bound (a prefix: the list ascends) narrow it to one step's width.
  int lo_a = 0, hi_a = n_a, lo_b = 0, hi_b = n_b;
  while (lo_a < hi_a || lo_b < hi_b) {
    const int step_a = (hi_a - lo_a + 31) / 32, step_b = (hi_b - lo_b + 31) / 32;
    const int at_a = lo_a + lane * step_a, at_b = lo_b + lane * step_b;
    const bool in_a = lo_a < hi_a && at_a < hi_a, in_b = lo_b < hi_b && at_b < hi_b;
    const int k_a = __popc(__ballot_sync(0xffffffffu, in_a && a[at_a] < bound));
    const int k_b = __popc(__ballot_sync(0xffffffffu, in_b && b[at_b] < bound));
    if (lo_a < hi_a) {
      const int next = k_a == 0 ? lo_a : lo_a + (k_a - 1) * step_a + 1;
      hi_a = k_a == 0 ? lo_a : min(lo_a + k_a * step_a, hi_a);
      lo_a = next;
    }
    if (lo_b < hi_b) {
      const int next = k_b == 0 ? lo_b : lo_b + (k_b - 1) * step_b + 1;
      hi_b = k_b == 0 ? lo_b : min(lo_b + k_b * step_b, hi_b);
      lo_b = next;
    }
  }
  below_a = lo_a;
  below_b = lo_b;
}

// This CTA's share of a map row's lists: its full key blocks first, then its partial ones. With a
// cache's lengths (ForwardParams::cache_seqlens) the CTA's rows see keys [0, keys_hi) at most:
// blocks from keys_hi on are left out before the row is split (every warp finds the cut itself,
// no barrier).
struct BlockList {
  const int32_t* full;
  const int32_t* partial;
  int n_full;
  int begin, end;  // iterations [begin, end) of this split
  __device__ BlockList(const ForwardParams& p, int b, int h_map, int m, int split,
                       int keys_hi = INT_MAX) {
    const int64_t row = map_row(p, b, h_map, m);
    n_full = p.map.full_count[row];
    int n_partial = p.map.partial_count[row];
    if (keys_hi < p.seqlen_k) {
      warp_count_below(p.map.full_index + row * p.map.n_blocks, n_full,
                       p.map.partial_index + row * p.map.n_blocks, n_partial,
                       (keys_hi + p.map.block_n - 1) / p.map.block_n, n_full, n_partial);
    }
    split_range(n_full + n_partial, p.num_splits, split, begin, end);
    full = p.map.full_index + row * p.map.n_blocks;
    partial = p.map.partial_index + row * p.map.n_blocks;
  }
  __device__ int at(int it) const { return it < n_full ? full[it] : partial[it - n_full]; }
};

// Programmatic dependent launch (sm_90): a forward lets the combine that follows it (launched with
// the programmatic-serialization attribute, launch_combine) be scheduled as soon as every forward
// CTA has started, and the combine waits until the whole forward grid has finished and its writes
// are visible. The launch of the combine so overlaps the forward's tail instead of following it.
// Both are no-ops below sm_90 and in a kernel launched without the attribute.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// kStages: K / V tiles in flight (ForwardTiles); the loop keeps kStages - 1 tiles loading while
// it computes one. kSplitKeys (decode, forward_split_keys): the warps share the tile's 16 rows
// and each takes a quarter of every key tile with its own online softmax; the warps' states are
// merged at the end (an exact merge: m = max m_w, l = sum l_w 2^(m_w - m), the same for O).
template <int kHeadDim, class Elt, int kStages = kForwardStages, bool kSplitKeys = false>
__global__ void __launch_bounds__(ForwardTiles<kHeadDim, kStages, kSplitKeys>::kThreads,
                                  ForwardTiles<kHeadDim, kStages, kSplitKeys>::kCtasPerSm)
    forward_kernel(const __grid_constant__ ForwardParams p) {
  using Tiles = ForwardTiles<kHeadDim, kStages, kSplitKeys>;
  using Smem = SmemTile<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kRT = Tiles::kRowTiles;      // 16-row mma tiles per warp
  constexpr int kWarpKeys = Tiles::kWarpKeys;  // keys of a tile per warp
  constexpr int kNTiles = kWarpKeys / 8;     // 8-column score tiles
  constexpr int kDTiles = kHeadDim / 8;  // 8-column output tiles
  constexpr int kChunks = kHeadDim / 8;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);  // (kBlockM, kHeadDim)
  uint16_t* s_k = s_q + Tiles::kSmemQ;                     // kStages of (kBlockN, kHeadDim)
  uint16_t* s_v = s_k + kStages * Tiles::kSmemKV;          // kStages of (kBlockN, kHeadDim)
  auto* s_nonfinite = reinterpret_cast<unsigned long long*>(smem_raw + Tiles::kNonfiniteOffset);
  auto* s_poison = reinterpret_cast<uint32_t*>(smem_raw + Tiles::kPoisonOffset);
  if (threadIdx.x == 0) *s_nonfinite = 0;  // ordered before use by the loop's first barrier
  bool poisoned = false;                   // s_poison holds marks (cleared at the first)
  allow_dependent_launch();

  const int split = int(blockIdx.x) % p.num_splits;
  const int m = p.map.m_blocks - 1 - int(blockIdx.x) / p.num_splits;  // long causal rows first
  const int h = blockIdx.y, b = blockIdx.z;  // h: query head, or kv head when packed
  const int hk = p.pack_gqa ? h : h / p.group;
  const int warp = threadIdx.x / 32;
  // The map's query tiles are forward_block_m rows (a split-key CTA has one: m = 0).
  const WarpRows wr(p, m, forward_block_m(kHeadDim), h, b, kSplitKeys ? 0 : warp * 16 * kRT);
  const int shift = key_shift(p, b);
  // A cache's lengths: the keys the CTA's last row sees bound its blocks (BlockList), and blocks
  // past the keys its first row sees drop entries like partial ones.
  int keys_lo = INT_MAX, keys_hi = INT_MAX;
  if (p.cache_seqlens != nullptr) {
    const int flat0 = wr.rows.row0;
    const int flat1 = min(flat0 + forward_block_m(kHeadDim), wr.flat_rows) - 1;
    const int i0 = p.pack_gqa ? flat0 / p.group : flat0, i1 = p.pack_gqa ? flat1 / p.group : flat1;
    keys_lo = max(visible_end(p, b, 0, min(i0, p.seqlen_q - 1)) - shift, 0);
    keys_hi = max(visible_end(p, b, 0, min(i1, p.seqlen_q - 1)) - shift, 0);
  }
  // Q rows (through the row map), zero past the last row and past head_dim; issued before the
  // plan's reads (and a paged table's), which the first K / V loads wait on.
  {
    const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride_b;
    for (int idx = threadIdx.x; idx < kBlockM * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      int i, head;
      wr.rows.at(r, i, head);
      const bool valid = wr.rows.row0 + r < wr.flat_rows && c * 8 < p.head_dim;
      const uint16_t* src = q + (valid ? int64_t(i) * p.q_stride_s + head * p.q_stride_h + c * 8 : 0);
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(src),
          *reinterpret_cast<cute::uint128_t*>(s_q + Smem::offset(r, c)), valid);
    }
  }
  const BlockList list(p, b, (p.pack_gqa ? h * p.group : h) / p.map.head_group, m, split,
                       keys_hi);

  // K / V rows of (b, hk): strided from k / v, or through a paged cache's table (origins of head
  // hk; v_row serves the rare re-reads of mark_nonfinite_keys).
  const bool paged = p.paged.table != nullptr;
  const auto* k_head = static_cast<const uint16_t*>(p.k) + hk * p.k_stride_h;
  const auto* v_head = static_cast<const uint16_t*>(p.v) + hk * p.v_stride_h;
  const auto* k = k_head + (paged ? 0 : b * p.k_stride_b);
  const auto* v = v_head + (paged ? 0 : b * p.v_stride_b);
  auto v_row = [&](int j) { return v_head + p.paged.offset(b, j, p.v_stride_b, p.v_stride_s); };

  // A paged cache: the K and V offsets of each key of a tile sit in a ring slot (the tile's stage)
  // before the tile is loaded, so its loads never wait on the table. Tile X (the X-th of the CTA's
  // list) has its pages read from the table at the end of iteration X - kStages - 1 (into
  // page_pending, one thread per key), its offsets stored at the end of iteration X - kStages,
  // and used when X is prefetched, at the top of iteration X - kStages + 1. The first
  // kStages + 1 tiles are read here. A key past Sk reads no entry.
  auto* s_koff = reinterpret_cast<int64_t*>(smem_raw + Tiles::kPagesOffset);
  int64_t* s_voff = s_koff + kStages * kBlockN;
  auto page_of = [&](int n_block) -> int32_t {
    const int j = n_block * kBlockN + int(threadIdx.x);
    return j < p.seqlen_k ? p.paged.table[b * p.paged.max_pages + j / p.paged.page_size] : 0;
  };
  auto in_page_of = [&](int n_block) {
    return (n_block * kBlockN + int(threadIdx.x)) % p.paged.page_size;
  };
  auto store_offsets = [&](int slot, int32_t page, int in_page) {
    const int64_t clamped = min(max(page, 0), p.paged.num_pages - 1);
    s_koff[slot * kBlockN + threadIdx.x] = clamped * p.k_stride_b + in_page * p.k_stride_s;
    s_voff[slot * kBlockN + threadIdx.x] = clamped * p.v_stride_b + in_page * p.v_stride_s;
  };
  const int listed = list.end - list.begin;
  int32_t page_pending = 0;
  int in_page_pending = 0;
  if (paged) {
    if (threadIdx.x < kBlockN) {
#pragma unroll
      for (int st = 0; st < kStages; ++st) {
        if (st < listed) {
          const int n_block = list.at(list.begin + st);
          store_offsets(st, page_of(n_block), in_page_of(n_block));
        }
      }
      if (kStages < listed) {
        const int n_block = list.at(list.begin + kStages);
        page_pending = page_of(n_block);
        in_page_pending = in_page_of(n_block);
      }
    } else if (kSplitKeys && p.touch_table) {
      // The other threads touch the table entries of the later tiles (ForwardParams::touch_table).
      for (int t = kStages + 1 + int(threadIdx.x) - kBlockN; t < listed; t += kThreads - kBlockN) {
        prefetch_l2(p.paged.table + b * p.paged.max_pages +
                    list.at(list.begin + t) * kBlockN / p.paged.page_size);
      }
    }
    __syncthreads();
  }

  // Tile n_block of K and V into a stage (through the ring's offsets when paged); a decode's
  // (kSplitKeys) through L2 policy kv_policy (l2_policy, ForwardParams::kv_evict_first).
  const uint64_t kv_policy = kSplitKeys ? l2_policy(p.kv_evict_first) : 0;
  auto load_stage = [&](int stage, int n_block) {
    uint16_t *sk = s_k + stage * Tiles::kSmemKV, *sv = s_v + stage * Tiles::kSmemKV;
    if (paged) {
      load_paged_tiles_async<kHeadDim, kBlockN, kThreads, kSplitKeys>(
          sk, sv, k_head, v_head, s_koff + stage * kBlockN, s_voff + stage * kBlockN,
          n_block * kBlockN, p.seqlen_k, p.head_dim, kv_policy);
    } else {
      load_tile_async<kHeadDim, kBlockN, kThreads, kSplitKeys>(
          sk, k, p.k_stride_s, n_block * kBlockN, p.seqlen_k, p.head_dim, kv_policy);
      load_tile_async<kHeadDim, kBlockN, kThreads, kSplitKeys>(
          sv, v, p.v_stride_s, n_block * kBlockN, p.seqlen_k, p.head_dim, kv_policy);
    }
  };
  // The first kStages - 1 tiles, one commit group each (empty past the list's end, so that the
  // loop's wait counts stay uniform).
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (list.begin + st < list.end) load_stage(st, list.at(list.begin + st));
    cute::cp_async_fence();  // Q rides in the first group
  }

  float o[kRT][kDTiles][4];  // (16 kRT rows, kHeadDim) output accumulator, C layout
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) o[rt][d][0] = o[rt][d][1] = o[rt][d][2] = o[rt][d][3] = 0.0f;
  // Online softmax state, log2 domain. row_sum is this thread's partial sum over its columns;
  // the quad's partial sums are added once at the end.
  float row_max[kRT][2], row_sum[kRT][2];
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt) {
    row_max[rt][0] = row_max[rt][1] = -INFINITY;
    row_sum[rt][0] = row_sum[rt][1] = 0.0f;
  }
  // A warp whose rows are all padding (GQA-packed decode: a few real rows in the tile) only
  // loads and waits at the barriers; its scores would never be written.
  const bool warp_idle = wr.rows.row0 + wr.warp_row0 >= wr.flat_rows;
  // This warp's keys of a tile: all, or (split keys) its quarter.
  const int warp_key0 = kSplitKeys ? warp * kWarpKeys : 0;

  // The block index of the tile kStages - 1 ahead is read one iteration before its prefetch, so
  // the prefetch never waits on a global load; the current tile's index was read kStages - 1
  // iterations ago (a cached read now).
  const int ahead = list.begin + kStages - 1;
  int n_ahead = ahead < list.end ? list.at(ahead) : 0;
  for (int it = list.begin; it < list.end; ++it) {
    const int stage = (it - list.begin) % kStages;
    const int n = list.at(it);
    const int n_next_ahead = it + kStages < list.end ? list.at(it + kStages) : 0;
    const int n_page_ahead = paged && it + kStages + 1 < list.end ? list.at(it + kStages + 1) : 0;
    if (it + kStages - 1 < list.end) load_stage((stage + kStages - 1) % kStages, n_ahead);
    cute::cp_async_fence();
    cute::cp_async_wait<kStages - 1>();  // this tile's group (and Q's) has landed
    __syncthreads();

    // A partial tile's NaN / Inf in V: zeroed here, recorded for the rows that keep them after the
    // softmax step, applied by the write (mark_nonfinite_keys).
    const bool partial = it >= list.n_full || (n + 1) * kBlockN > keys_lo;
    uint64_t nonfinite = 0;
    if (partial) {
      uint16_t* sv = s_v + stage * Tiles::kSmemKV;
      uint64_t mine = 0;
#pragma unroll 1
      for (int idx = threadIdx.x; idx < kBlockN * kChunks; idx += kThreads) {
        auto* chunk = reinterpret_cast<uint4*>(sv + Smem::offset(idx / kChunks, idx % kChunks));
        const uint4 x = *chunk, y = clear_nonfinite<Elt>(x);
        if (x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w) {
          *chunk = y;
          mine |= 1ull << (idx / kChunks);
        }
      }
      if (mine) atomicOr(s_nonfinite, static_cast<unsigned long long>(mine));
      __syncthreads();
      nonfinite = *s_nonfinite;
      if (nonfinite != 0 && !poisoned) {  // uniform over the CTA: the first such tile
        for (int w = threadIdx.x; w < kBlockM * kHeadDim / 16; w += kThreads) s_poison[w] = 0;
        poisoned = true;
        __syncthreads();
      }
    }

    if (!warp_idle) {
      // s (16 kRT, kWarpKeys) = q (16 kRT, kHeadDim) . k^T over this warp's keys (16-row
      // offsets keep the tiles' swizzle: it depends on row % 8 only)
      float s[kRT][kNTiles][4];
      warp_gemm_nt<kHeadDim, kWarpKeys, kRT, Elt>(
          s, s_q, wr.warp_row0, s_k + stage * Tiles::kSmemKV + warp_key0 * kHeadDim);
      wr.logits<kRT, kNTiles, Elt>(s, n * kBlockN + warp_key0, partial, nullptr, nullptr, nullptr,
                                   nullptr, nullptr, shift);
      float correction[kRT][2];
      softmax_step(s, wr.exp_scale, row_max, row_sum, correction);
      rescale_rows<kRT, kDTiles>([&](int rt, int d, int e) -> float& { return o[rt][d][e]; },
                                 correction);
      // o (16 kRT, kHeadDim) += p (16 kRT, kWarpKeys) . v (kWarpKeys, kHeadDim)
      warp_gemm_pv<kHeadDim, kWarpKeys, kRT, Elt>(
          o, s, s_v + stage * Tiles::kSmemKV + warp_key0 * kHeadDim);
      // This warp's keys with a non-finite V value, after P V, where the scores are dead.
      const uint64_t mine = kWarpKeys == 64 ? nonfinite
                            : nonfinite & (((1ull << kWarpKeys) - 1) << warp_key0);
      if (mine != 0) {
        const int col0 = n * kBlockN;
        mark_nonfinite_keys<kRT, kHeadDim, Elt>(
            mine, [&](int rt, int r, int j) { return wr.keeps_entry<Elt>(rt, r, col0 + j, shift); },
            wr.warp_row0, s_poison, [&](int j) { return v_row(col0 + j); }, p.head_dim);
      }
    }
    if (paged && threadIdx.x < kBlockN) {  // the ring (above): this stage's slot is free now
      const int r = it - list.begin;
      if (r + kStages < listed) store_offsets(stage, page_pending, in_page_pending);
      if (r + kStages + 1 < listed) {
        page_pending = page_of(n_page_ahead);
        in_page_pending = in_page_of(n_page_ahead);
      }
    }
    __syncthreads();  // this stage is refilled by a later iteration's prefetch
    if (partial && threadIdx.x == 0) *s_nonfinite = 0;  // every thread read it before the barrier
    n_ahead = n_next_ahead;
  }
  cute::cp_async_wait<0>();  // no copy outlives the CTA (the trailing groups are empty)
  if constexpr (kSplitKeys) {
    // The warps' states through the K stages (every warp is past the loop and every copy has
    // landed after the barrier): per lane its O fragment, then each row's max and sum (the sum
    // over the quad's columns). Warp 0 merges them and writes.
    static_assert(kRT == 1, "split keys: one row tile");
    __syncthreads();
    const int lane = threadIdx.x % 32;
    constexpr int kPer = Tiles::kMergeFloats;
    float* merge = reinterpret_cast<float*>(s_k);
    float* mine = merge + (warp * 32 + lane) * kPer;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) mine[d * 4 + e] = o[0][d][e];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[0][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      mine[kDTiles * 4 + r] = row_max[0][r];
      mine[kDTiles * 4 + 2 + r] = sum;
    }
    __syncthreads();
    if (warp != 0) return;
    float scale[Tiles::kWarps][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float top = -INFINITY;
#pragma unroll
      for (int w = 0; w < Tiles::kWarps; ++w) {
        top = fmaxf(top, merge[(w * 32 + lane) * kPer + kDTiles * 4 + r]);
      }
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < Tiles::kWarps; ++w) {
        const float* theirs = merge + (w * 32 + lane) * kPer + kDTiles * 4;
        // A warp that kept nothing of the row (max -inf) weighs 0; so do all when none did.
        scale[w][r] = theirs[r] == -INFINITY ? 0.0f : fast_exp2(theirs[r] - top);
        total += theirs[2 + r] * scale[w][r];
      }
      row_max[0][r] = top;
      // write() adds the quad's four partial sums: the total goes in one of them.
      row_sum[0][r] = lane % 4 == 0 ? total : 0.0f;
    }
#pragma unroll
    for (int d = 0; d < kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < Tiles::kWarps; ++w) {
          acc += merge[(w * 32 + lane) * kPer + d * 4 + e] * scale[w][e / 2];
        }
        o[0][d][e] = acc;
      }
    wr.write<kHeadDim, kRT, Elt>(o, row_max, row_sum, split, poisoned ? s_poison : nullptr);
  } else {
    if (poisoned) __syncthreads();  // every warp's marks
    wr.write<kHeadDim, kRT, Elt>(o, row_max, row_sum, split, poisoned ? s_poison : nullptr);
  }
}

// Merges the splits of one (b, h, i) row: LSE = log sum_s exp(LSE_s), O = sum_s exp(LSE_s - LSE)
// O_s. Exact for empty splits (LSE_s = -inf weighs 0) and empty rows (all -inf: O = 0,
// LSE = -inf); a NaN LSE reaches the row. One CTA of kCombineThreads per row, so that every load
// is in flight at once (a warp walking the splits one after another waited on each: 12 us of a
// 512K-key decode's 130): each warp reads all the splits' LSEs (a lane per split), then groups of
// kHeadDim / 4 threads take every kGroups-th split, four columns per thread, and shared memory
// adds the groups' sums.
constexpr int kCombineThreads = 256;

template <int kHeadDim, class Elt>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(
    const __grid_constant__ ForwardParams p) {
  wait_for_prerequisite_grid();  // the forward's partial outputs (a no-op without the attribute)
  constexpr int kGroupThreads = kHeadDim / 4;
  constexpr int kGroups = kCombineThreads / kGroupThreads;
  __shared__ float4 s_acc[kGroups][kGroupThreads];
  __shared__ float s_total[kCombineThreads / 32];
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int splits = p.num_splits;
  const int group = threadIdx.x / kGroupThreads, col = threadIdx.x % kGroupThreads * 4;
  // This thread's first kEarly partial outputs are loaded before the LSEs are reduced (their
  // weights need the reduction; the loads do not), so the two reads overlap.
  constexpr int kEarly = 4;
  auto o_at = [&](int s) {
    return reinterpret_cast<const float4*>(p.o_partial + (s * rows + row) * kHeadDim + col);
  };
  float4 early[kEarly];
#pragma unroll
  for (int e = 0; e < kEarly; ++e) {
    const int s = group + e * kGroups;
    early[e] = s < splits ? *o_at(s) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  float lse_max = -INFINITY;
  for (int s = lane; s < splits; s += 32) lse_max = fmaxf(lse_max, p.lse_partial[s * rows + row]);
#pragma unroll
  for (int w = 16; w > 0; w /= 2) {
    lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, w));
  }
  // Every warp's total is the same sum; warp 0's is kept.
  float total = 0.0f;
  if (lse_max != -INFINITY) {
    for (int s = lane; s < splits; s += 32) {
      total += exp2f((p.lse_partial[s * rows + row] - lse_max) * kLog2e);
    }
  }
#pragma unroll
  for (int w = 16; w > 0; w /= 2) total += __shfl_xor_sync(0xffffffffu, total, w);
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (lse_max != -INFINITY) {
    for (int e = 0, s = group; s < splits; ++e, s += kGroups) {
      const float w = exp2f((p.lse_partial[s * rows + row] - lse_max) * kLog2e);
      if (w == 0.0f) continue;  // a split that weighs 0 adds nothing, even a non-finite output
      float4 x;
      if (e < kEarly) {
#pragma unroll
        for (int i = 0; i < kEarly; ++i) {  // registers, not a local-memory array: unrolled picks
          if (i == e) x = early[i];
        }
      } else {
        x = *o_at(s);
      }
      acc.x += w * x.x, acc.y += w * x.y, acc.z += w * x.z, acc.w += w * x.w;
    }
  }
  s_acc[group][threadIdx.x % kGroupThreads] = acc;
  if (lane == 0) s_total[warp] = total;
  __syncthreads();
  if (threadIdx.x >= kGroupThreads) return;
  total = s_total[0];
  for (int g = 1; g < kGroups; ++g) {
    const float4 x = s_acc[g][threadIdx.x];
    acc.x += x.x, acc.y += x.y, acc.z += x.z, acc.w += x.w;
  }
  const int i = int(row % p.seqlen_q);
  const int head = int((row / p.seqlen_q) % p.num_heads);
  const int b = int(row / (int64_t(p.seqlen_q) * p.num_heads));
  auto* out = static_cast<typename Elt::Storage*>(p.out) + b * p.o_stride_b +
              int64_t(i) * p.o_stride_s + head * p.o_stride_h;
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const float o[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
#pragma unroll
  for (int c0 = 0; c0 < 4; c0 += 2) {
    const int c = col + c0;
    const uint32_t packed = Elt::pack(o[c0], o[c0 + 1]);
    if (c + 1 < p.head_dim && (reinterpret_cast<uintptr_t>(out + c) & 3) == 0) {
      *reinterpret_cast<uint32_t*>(out + c) = packed;
    } else {  // odd strides or the last odd column: element stores
      if (c < p.head_dim) *reinterpret_cast<uint16_t*>(out + c) = uint16_t(packed & 0xffffu);
      if (c + 1 < p.head_dim) *reinterpret_cast<uint16_t*>(out + c + 1) = uint16_t(packed >> 16);
    }
  }
  if (p.lse && threadIdx.x == 0) {
    p.lse[b * p.lse_stride_b + head * p.lse_stride_h + int64_t(i) * p.lse_stride_s] =
        total > 0.0f ? lse_max + logf(total) : (total != total ? total : -INFINITY);
  }
}

}  // namespace fsa::detail::cuda
