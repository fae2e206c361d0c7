#pragma once
// Backward kernels (mma.sync m16n8k16; fragment layouts as in forward_kernel.cuh). Two passes,
// each output element written by exactly one CTA, as on the CPU backend:
//
//   rowdot_kernel  rowdot (B, H, Sq) = sum_d dO * O                       one warp per row
//   rowdot_chunks_kernel  the same over 16-byte chunks         8 / 16 / 32 lanes per row
//   dq_kernel      dQ of one query tile over the plan's key blocks;        CTA (m, h, b)
//                  dbias for a bias with a query dim (full or row sums)
//   dkdv_kernel    dK, dV of one key tile over the G query heads and the   CTA (n, hk, b)
//                  transposed lists; column sums of dS for a query-
//                  broadcast bias
//
// Each pass recomputes P and dS from Q, K, V, dO, LSE and rowdot (no (B, H, Sq, Sk) temporary).

#include <climits>

#include "cuda/forward_kernel.cuh"

namespace fsa::detail::cuda {

// Threads per CTA and tile rows of the two passes. dQ: 16 query rows per warp and one warp per
// 16 rows of the plan's query tile. dK/dV: 16 key rows per warp, 4 warps = the plan's 64-key
// tile. Its dK and dV accumulators are 2 x 16 x kOutDim fp32 per warp: at D = 256 the whole rows
// would take 256 registers per thread, so each key tile has kDParts CTAs, one per 128 columns of
// dK and dV, each computing the tile's P and dS over all of D (the scores twice: the price of
// registers that fit).
template <int kHeadDim>
struct BackwardTiles {
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static constexpr int kDqWarps = kBlockM / 16;
  static constexpr int kDkvWarps = kBlockN / 16;
  static constexpr int kOutDim = kHeadDim <= 128 ? kHeadDim : 128;  // dK / dV columns per CTA
  static constexpr int kDParts = kHeadDim / kOutDim;
  static constexpr int kHalfM = 64;  // dK/dV walks a query tile in halves of 64 queries
  static constexpr int kSmemDq = (kBlockM * kHeadDim * 2 + 4 * kBlockN * kHeadDim) * 2;
  static constexpr int kSmemDkv = (2 * kBlockN * kHeadDim + 4 * kHalfM * kHeadDim) * 2 +
                                  2 * 2 * kHalfM * int(sizeof(float));
};

// The preprocess's part of a lean pass's pair (BackwardParams::nonfinite): the flag where a
// row's rowdot is not finite (O or dO holds a NaN / Inf) or its LSE is NaN, and the row's
// lse_log2 (row = (b H + h) Sq + i).
__device__ __forceinline__ void pair_row_stats(const BackwardParams& p, int64_t row, int b, int h,
                                               int i, float rowdot) {
  if (p.nonfinite == nullptr) return;
  const float lse = p.lse[b * p.lse_stride_b + h * p.lse_stride_h + int64_t(i) * p.lse_stride_s];
  p.lse_log2[row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  if (!isfinite(rowdot) || isnan(lse)) atomicOr(p.nonfinite, 1);
}

template <class Elt>
__global__ void rowdot_kernel(const __grid_constant__ BackwardParams p) {
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = int(row % p.seqlen_q), h = int((row / p.seqlen_q) % p.num_heads);
  const int b = int(row / (int64_t(p.seqlen_q) * p.num_heads));
  const void* o = static_cast<const typename Elt::Storage*>(p.out) + b * p.o_stride_b +
                  i * p.o_stride_s + h * p.o_stride_h;
  const void* d = static_cast<const typename Elt::Storage*>(p.dout) + b * p.do_stride_b +
                  i * p.do_stride_s + h * p.do_stride_h;
  float sum = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) sum += Elt::to_float(o, c) * Elt::to_float(d, c);
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const_cast<float*>(p.rowdot)[row] = sum;  // (B, H, Sq), row = (b H + h) Sq + i
    pair_row_stats(p, row, b, h, i, sum);
  }
}

// rowdot over rows of 16-byte chunks (out and dout 16-byte aligned, head_dim % 8 == 0): kLanes
// lanes per row (head_dim <= 8 * kLanes chunks in one pass), each loading a chunk of 8 elements of
// O and dO at once, summed over the row's lanes by shuffles.
template <class Elt, int kLanes>
__global__ void rowdot_chunks_kernel(const __grid_constant__ BackwardParams p) {
  static_assert(kLanes == 8 || kLanes == 16 || kLanes == 32, "a row's lanes share one warp");
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  float sum = 0.0f;
  if (row < rows) {
    const int i = int(row % p.seqlen_q), h = int((row / p.seqlen_q) % p.num_heads);
    const int b = int(row / (int64_t(p.seqlen_q) * p.num_heads));
    const uint4* o = reinterpret_cast<const uint4*>(
        static_cast<const typename Elt::Storage*>(p.out) + b * p.o_stride_b + i * p.o_stride_s +
        h * p.o_stride_h);
    const uint4* d = reinterpret_cast<const uint4*>(
        static_cast<const typename Elt::Storage*>(p.dout) + b * p.do_stride_b +
        i * p.do_stride_s + h * p.do_stride_h);
    for (int c = lane; c < p.head_dim / 8; c += kLanes) {
      const uint4 x = o[c], y = d[c];
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = Elt::unpack(xs[e]), g = Elt::unpack(ys[e]);
        sum = fmaf(a.x, g.x, sum);
        sum = fmaf(a.y, g.y, sum);
      }
    }
  }
  for (int off = kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (row < rows && lane == 0) {
    const_cast<float*>(p.rowdot)[row] = sum;
    const int i = int(row % p.seqlen_q), h = int((row / p.seqlen_q) % p.num_heads);
    pair_row_stats(p, row, int(row / (int64_t(p.seqlen_q) * p.num_heads)), h, i, sum);
  }
}

// One entry of the recomputation: from the raw product x = q.k and dP = dO.v of (query i, key j)
// returns P (natural softmax probability), dS = P (dP - rowdot) and dX (the gradient w.r.t. the
// scaled product: dS, or dS (1 - t^2) under softcap). A dropped entry, an empty row (LSE -inf)
// and a padded row give exact zeros.
template <class Elt, bool kRowTopK>
__device__ inline void entry_grads(const BackwardParams& p, int b, int head, int i, int j,
                                   bool check, float x, float dp, float lse2, float rowdot,
                                   float& prob, float& ds, float& dx) {
  float t = 0.0f, s2;
  if (p.softcap_in != 0.0f) {
    t = softcap_tanh(x * p.softcap_in);
    s2 = t * p.softcap_out;
  } else {
    s2 = x * p.scale_log2;
  }
  bool keep = lse2 != -INFINITY;
  if (keep && check) {  // partial tile or ragged edge: bounds, causality and the mask
    keep = i < p.seqlen_q && j < p.seqlen_k && j < visible_end(p, b, head, i);
    if (keep && p.row_end.key_last != nullptr) keep = i <= p.row_end.key_last_row(b, head)[j];
    if (keep && p.mask) {
      keep = p.mask[b * p.mask_stride[0] + (head / p.mask_head_group) * p.mask_stride[1] +
                    int64_t(i) * p.mask_stride[2] + int64_t(j) * p.mask_stride[3]] != 0;
    }
  }
  if (!keep) {
    prob = ds = dx = 0.0f;
    return;
  }
  if (p.bias) {
    const int64_t off = b * p.bias_stride[0] + (head / p.bias_head_group) * p.bias_stride[1] +
                        int64_t(i) * p.bias_stride[2] + int64_t(j) * p.bias_stride[3];
    const float v = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                   : Elt::to_float(p.bias, off);
    if constexpr (kRowTopK) {
      if (!p.row_topk.keeps(v, j, p.row_topk.at(b, head, i))) {
        prob = ds = dx = 0.0f;
        return;
      }
    }
    s2 += v * kLog2e;
  }
  prob = s2 == -INFINITY ? 0.0f : exp2f(s2 - lse2);  // a -inf bias acts as a mask
  ds = prob * (dp - rowdot);
  dx = p.softcap_in != 0.0f ? ds * (1.0f - t * t) : ds;
}

// Element passes of the common path (no softcap): each uniform branch is taken once per tile,
// outside a short unrolled loop, rather than inside one large per-element body (which thrashed the
// instruction cache: Nsight Compute showed 62% "no instruction" stalls in the dQ pass). `Index`
// maps fragment element (j, e) to its query and key.

// s *= scale * log2(e): log2-domain logits.
template <int kN>
__device__ inline void scale_pass(float (&s)[kN][4], float scale_log2) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
}

// s += bias * log2(e); indices clamped in range (out-of-range entries are dropped next). A
// query-invariant bias (..., 1, Sk|1) depends on the key alone: where the rows are keys (dK/dV
// pass) each thread reads its two rows' values once; where they are queries (dQ pass) and
// kKeyColumns, each column's value serves both of the thread's rows (half the loads and index
// arithmetic; off where its registers made ptxas spill: the sm80 dQ pass, the sm90 one with a
// dbias duty, whose biases have a query dim anyway).
template <class Elt, bool kKeyColumns = false, int kN, class Index>
__device__ inline void bias_pass(const BackwardParams& p, int b, int head, float (&s)[kN][4],
                                 const Index& ix) {
  const int64_t base = b * p.bias_stride[0] + (head / p.bias_head_group) * p.bias_stride[1];
  if constexpr (!Index::kRowsAreKeys && kKeyColumns) {
    if (p.bias_stride[2] == 0) {
#pragma unroll
      for (int j = 0; j < kN; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t off = base + int64_t(min(ix.key(j, e), p.seqlen_k - 1)) * p.bias_stride[3];
          const float v = (p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                          : Elt::to_float(p.bias, off)) * kLog2e;
          s[j][e] += v;
          s[j][e + 2] += v;
        }
      return;
    }
  }
  if constexpr (Index::kRowsAreKeys) {
    if (p.bias_stride[2] == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t off = base + int64_t(min(ix.row[r], p.seqlen_k - 1)) * p.bias_stride[3];
        const float v = (p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                        : Elt::to_float(p.bias, off)) * kLog2e;
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          s[j][2 * r] += v;
          s[j][2 * r + 1] += v;
        }
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t off = base + int64_t(min(ix.query(j, e), p.seqlen_q - 1)) * p.bias_stride[2] +
                          int64_t(min(ix.key(j, e), p.seqlen_k - 1)) * p.bias_stride[3];
      s[j][e] += (p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                 : Elt::to_float(p.bias, off)) * kLog2e;
    }
}

// x^T in log2 units with a query-invariant bias, where the rows are keys (the sm90 dK/dV passes;
// not staged): s = s * scale + the value of its key row (fragment element (j, e) is key row
// e / 2) in log2 units, one fma per element where scale_pass and bias_pass took a multiply and
// an add. Rows past seqlen_k read the last key's value, as bias_pass does. (Read before the stage
// is waited for, the two values made the passes spill in their loops: 2-4% slower.)
struct KeyRowBias {
  __host__ __device__ static bool applies(const BackwardParams& p) {
    return p.bias != nullptr && !p.bias_staged && p.bias_stride[2] == 0;
  }
  // The thread's two values of head h, in log2 units.
  template <class Elt>
  __device__ static void values(const BackwardParams& p, int b, int h, const int (&key_row)[2],
                                float (&v)[2]) {
    const int64_t base = b * p.bias_stride[0] + (h / p.bias_head_group) * p.bias_stride[1];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t off = base + int64_t(min(key_row[r], p.seqlen_k - 1)) * p.bias_stride[3];
      v[r] = (p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                             : Elt::to_float(p.bias, off)) * kLog2e;
    }
  }
  // kScale = false: s is already in log2 units (softcap's logits, softcap_pass), v is added.
  template <bool kScale, int kN>
  __device__ static void apply(const BackwardParams& p, const float (&v)[2], float (&s)[kN][4]) {
#pragma unroll
    for (int j = 0; j < kN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = kScale ? fmaf(s[j][e], p.scale_log2, v[e / 2]) : s[j][e] + v[e / 2];
      }
  }
  template <class Elt, bool kScale = true, int kN>
  __device__ static void scale_add(const BackwardParams& p, int b, int h,
                                   const int (&key_row)[2], float (&s)[kN][4]) {
    float v[2];
    values<Elt>(p, b, h, key_row, v);
    apply<kScale>(p, v, s);
  }
};

// KeyRowBias with the two values held across steps and read again only when the head changes
// (the lean dK/dV pass): read for every 64-query step, the read's latency and the division by
// the bias's head group took 9% of that pass's stall samples on a block selection (docs/perf.md,
// thirty-third session). The general passes read them per step, as before (their loops
// already spill; held values were not tried there).
struct KeyRowBiasHeld {
  int head = -1;  // the head whose values v holds
  float v[2];
  template <class Elt, bool kScale = true, int kN>
  __device__ void scale_add(const BackwardParams& p, int b, int h, const int (&key_row)[2],
                            float (&s)[kN][4]) {
    if (h != head) {
      head = h;
      KeyRowBias::values<Elt>(p, b, h, key_row, v);
    }
    KeyRowBias::apply<kScale>(p, v, s);
  }
};

// Where the rows are keys: s = -inf outside key row r's interval of queries [lo[r], hi[r]]. One
// compare pair per entry and no branch.
template <int kN, class Index>
__device__ __forceinline__ void keep_query_interval(float (&s)[kN][4], const int (&lo)[2],
                                                    const int (&hi)[2], const Index& ix) {
  static_assert(Index::kRowsAreKeys, "rows are keys");
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = ix.query(j, e);
      s[j][e] = lo[e / 2] <= i && i <= hi[e / 2] ? s[j][e] : -INFINITY;
    }
}

// The queries that key row `key` keeps where causality alone drops entries (the lean dK/dV pass):
// [lo, hi] = [k - (Sk - Sq), Sq - 1] clamped at 0 (visible_end's bottom-right bound, solved for the
// query), [0, Sq - 1] without causality, none for a row past the keys.
template <class Params>
__device__ __forceinline__ void causal_query_interval(const Params& p, int key, int& lo, int& hi) {
  lo = key >= p.seqlen_k ? INT_MAX : p.is_causal ? max(key - (p.seqlen_k - p.seqlen_q), 0) : 0;
  hi = p.seqlen_q - 1;
}

// The queries that key rows `key_row` keep under per-row top-k over compacted keys, where the
// rows are slots (RowEnd::key_first / key_last of head `head`): [key_first, key_last] clamped to
// the queries, none for a row past the slots.
__device__ __forceinline__ void slot_query_interval(const BackwardParams& p, int b, int head,
                                                    const int (&key_row)[2], int (&lo)[2],
                                                    int (&hi)[2]) {
  const int32_t* first = p.row_end.key_first_row(b, head);
  const int32_t* last = p.row_end.key_last_row(b, head);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int k = min(key_row[r], p.seqlen_k - 1);
    lo[r] = key_row[r] < p.seqlen_k ? first[k] : INT_MAX;
    hi[r] = min(last[k], p.seqlen_q - 1);
  }
}

// s = -inf where the entry is out of range, causally invisible, masked out or (kRowTopK ==
// p.row_topk.key != null) below its row's top-k threshold. Under per-row top-k the planner lists
// every tile partial, so this pass sees every entry; it reads the query-invariant bias again (L1:
// the tile's few keys) rather than keeping bias_pass's values live.
template <class Elt, bool kRowTopK, int kN, class Index>
__device__ inline void drop_pass(const BackwardParams& p, int b, int head, float (&s)[kN][4],
                                 const Index& ix) {
  const uint8_t* mask =
      p.mask ? p.mask + b * p.mask_stride[0] + (head / p.mask_head_group) * p.mask_stride[1]
             : nullptr;
  const int64_t bias_base =
      kRowTopK ? b * p.bias_stride[0] + (head / p.bias_head_group) * p.bias_stride[1] : 0;
  // Per-row top-k over compacted keys: each slot's last row (RowEnd::key_last).
  const int32_t* key_last =
      p.row_end.key_last != nullptr ? p.row_end.key_last_row(b, head) : nullptr;
  // Where the rows are queries, each thread has two: their visible ends once per tile (on the
  // compacted path each is a load). Where they are keys and the compaction gives each slot's
  // interval of rows [key_first, key_last] (per-row top-k), those two bounds once per tile
  // replace a row-bound load per entry.
  int row_end[2] = {0, 0}, key_rows[2][2] = {{0, 0}, {0, 0}};
  if constexpr (!Index::kRowsAreKeys) {
#pragma unroll
    for (int r = 0; r < 2; ++r) row_end[r] = visible_end(p, b, head, min(ix.row[r], p.seqlen_q - 1));
  } else if (key_last) {
    const int32_t* key_first = p.row_end.key_first_row(b, head);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int k = min(ix.row[r], p.seqlen_k - 1);
      key_rows[r][0] = key_first[k];
      key_rows[r][1] = key_last[k];
    }
  }
  if constexpr (Index::kRowsAreKeys && !kRowTopK) {
    if (key_last != nullptr && mask == nullptr) {
      // Compacted per-row top-k (which has no mask): a key row keeps the queries of its interval.
      // One compare pair per entry, no branch: the general loop below branches per entry, which
      // left the dK/dV pass waiting on branch reconvergence and instruction fetch.
      // (slot_query_interval's bounds, from the values loaded above: calling it here loaded them
      // again, 56 more instructions in the D = 256 dK/dV pass.)
      int lo[2], hi[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        lo[r] = ix.row[r] < p.seqlen_k ? key_rows[r][0] : INT_MAX;
        hi[r] = min(key_rows[r][1], p.seqlen_q - 1);
      }
      keep_query_interval(s, lo, hi, ix);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = ix.query(j, e), k = ix.key(j, e);
      const bool in_range = i < p.seqlen_q && k < p.seqlen_k;
      bool keep;
      if constexpr (Index::kRowsAreKeys) {
        keep = in_range && (key_last ? key_rows[e / 2][0] <= i && i <= key_rows[e / 2][1]
                                     : k < visible_end(p, b, head, i));
      } else {
        keep = in_range && k < row_end[e / 2] && (!key_last || i <= key_last[k]);
      }
      if (keep && mask) {
        keep = mask[int64_t(i) * p.mask_stride[2] + int64_t(k) * p.mask_stride[3]] != 0;
      }
      if constexpr (kRowTopK) {
        if (keep) {
          const int64_t off = bias_base + int64_t(k) * p.bias_stride[3];
          const float v = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[off]
                                         : Elt::to_float(p.bias, off);
          keep = p.row_topk.keeps(v, k, p.row_topk.at(b, head, i));
        }
      }
      if (!keep) s[j][e] = -INFINITY;
    }
}

// From logits s and dP: prob = P, ds = dS = P (dP - rowdot), exact zeros for dropped entries and
// empty rows. `lse2_of` / `rowdot_of` give the entry's query statistics.
template <int kN, class Lse, class Rowdot>
__device__ inline void grad_pass(const float (&s)[kN][4], const float (&dp)[kN][4],
                                 float (&prob)[kN][4], float (&ds)[kN][4], const Lse& lse2_of,
                                 const Rowdot& rowdot_of) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float lse2 = lse2_of(j, e);
      const bool keep = s[j][e] != -INFINITY && lse2 != -INFINITY;
      const float pr = keep ? fast_exp2(s[j][e] - lse2) : 0.0f;
      ds[j][e] = keep ? pr * (dp[j][e] - rowdot_of(j, e)) : 0.0f;
      prob[j][e] = pr;
    }
}

// Query and key of fragment element (j, e) in the dQ pass (rows are queries) ...
struct DqIndex {
  static constexpr bool kRowsAreKeys = false;
  int row[2], col0, t;
  __device__ int query(int, int e) const { return row[e / 2]; }
  __device__ int key(int j, int e) const { return col0 + j * 8 + 2 * t + (e & 1); }
};
// ... and in the dK/dV pass (rows are keys).
struct DkvIndex {
  static constexpr bool kRowsAreKeys = true;
  int row[2], col0, t;
  __device__ int query(int j, int e) const { return col0 + j * 8 + 2 * t + (e & 1); }
  __device__ int key(int, int e) const { return row[e / 2]; }
};

// A dQ warp's two fragment rows row0, row0 + 8: their queries, log2-domain LSE (-inf past Sq:
// nothing of such a row is kept) and rowdot (0 past Sq).
__device__ __forceinline__ void dq_row_stats(const BackwardParams& p, int b, int h, int row0,
                                             int (&i_row)[2], float (&lse2)[2], float (&rdot)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    i_row[r] = row0 + 8 * r;
    const bool valid = i_row[r] < p.seqlen_q;
    const int i = min(i_row[r], p.seqlen_q - 1);
    lse2[r] = valid ? p.lse[b * p.lse_stride_b + h * p.lse_stride_h + int64_t(i) * p.lse_stride_s] *
                          kLog2e
                    : -INFINITY;
    rdot[r] = valid ? p.rowdot[(int64_t(b) * p.num_heads + h) * p.seqlen_q + i] : 0.0f;
  }
}

// The (batch, head) of a dQ CTA: grid (m, H, B) with dq_head_step 1, or an ordered kFullSummed
// launch (see BackwardParams::ordered_dbias). Multiply-adds of launch constants, so that the
// compiler can rematerialize them instead of keeping them live.
struct DqHead {
  int b, h;
};
__device__ __forceinline__ DqHead dq_cta_head(const BackwardParams& p) {
  return {int(blockIdx.z) + p.dq_batch0, int(blockIdx.y) * p.dq_head_step + p.dq_head0};
}

// A dQ CTA's key tiles: the block map's full then partial list of query tile m of head h, batch b.
struct DqTileList {
  int n_full, total;
  const int32_t *full, *partial;
  __device__ DqTileList(const BackwardParams& p, int b, int h, int m) {
    const int64_t row =
        (int64_t(p.map.map_batch == 1 ? 0 : b) * p.map.map_heads + h / p.map.head_group) *
            p.map.m_blocks + m;
    n_full = p.map.full_count[row];
    total = n_full + p.map.partial_count[row];
    full = p.map.full_index + row * p.map.n_blocks;
    partial = p.map.partial_index + row * p.map.n_blocks;
  }
  __device__ int at(int it) const { return it < n_full ? full[it] : partial[it - n_full]; }
};

// Stores a packed pair of 16-bit dS values (keys c, c + 1; c even) of row i into a kFull dbias:
// one 32-bit store where the pair is whole and aligned (dbias_pairs), else key by key.
__device__ __forceinline__ void store_dbias_pair16(const BackwardParams& p, int b, int h, int i,
                                                   int c, uint32_t packed) {
  if (i >= p.seqlen_q || c >= p.seqlen_k) return;
  auto* dbias = static_cast<uint16_t*>(p.dbias);
  const int64_t off = b * p.dbias_stride[0] + h * p.dbias_stride[1] +
                      int64_t(i) * p.dbias_stride[2] + int64_t(c) * p.dbias_stride[3];
  if (p.dbias_pairs && c + 1 < p.seqlen_k) {
    *reinterpret_cast<uint32_t*>(dbias + off) = packed;
    return;
  }
  dbias[off] = uint16_t(packed & 0xffffu);
  if (c + 1 < p.seqlen_k) dbias[off + p.dbias_stride[3]] = uint16_t(packed >> 16);
}

// The dQ pass's share of a bias gradient with a query dim, for one tile of dS (C layout: fragment
// (j, e) is row i_row[e / 2], key col0 + 8 j + 2 t + (e & 1)): kFull writes each in-range entry
// once, kFullSummed adds it into dbias_accum (fp32 atomics: in an ordered launch no two CTAs share
// an element, so the sums' order is fixed), kRows sums it into row_grad.
template <class Elt, int kNTiles>
__device__ __forceinline__ void dq_pass_dbias(const BackwardParams& p, int b, int h,
                                              const int (&i_row)[2], int col0, int t,
                                              const float (&ds)[kNTiles][4],
                                              float (&row_grad)[2]) {
  // Entries (j, 2 r) and (j, 2 r + 1) are adjacent keys c, c + 1 (c even) of row i_row[r]: one
  // store (or one vector atomic on sm_90) for both where the pair is whole and aligned.
  if (p.bias_grad == BiasGrad::kFull && !p.bias_is_fp32) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        store_dbias_pair16(p, b, h, i_row[r], col0 + j * 8 + 2 * t,
                           Elt::pack(ds[j][2 * r], ds[j][2 * r + 1]));
      }
  } else if (p.bias_grad == BiasGrad::kFull) {
    auto* dbias = static_cast<float*>(p.dbias);
    const int64_t base = b * p.dbias_stride[0] + h * p.dbias_stride[1];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i_row[r], c = col0 + j * 8 + 2 * t;
        if (i >= p.seqlen_q || c >= p.seqlen_k) continue;
        const int64_t off = base + int64_t(i) * p.dbias_stride[2] + int64_t(c) * p.dbias_stride[3];
        const float lo = ds[j][2 * r], hi = ds[j][2 * r + 1];
        if (p.dbias_pairs && c + 1 < p.seqlen_k) {
          *reinterpret_cast<float2*>(dbias + off) = make_float2(lo, hi);
        } else {
          dbias[off] = lo;
          if (c + 1 < p.seqlen_k) dbias[off + p.dbias_stride[3]] = hi;
        }
      }
  } else if (p.bias_grad == BiasGrad::kFullSummed) {
    const int bb = p.dbias_shape[0] == 1 ? 0 : b;
    const int hb = h / (p.num_heads / p.dbias_shape[1]);
    float* acc = p.dbias_accum + (int64_t(bb) * p.dbias_shape[1] + hb) * p.seqlen_q * p.seqlen_k;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float lo = ds[j][2 * r], hi = ds[j][2 * r + 1];
        if (lo == 0.0f && hi == 0.0f) continue;  // dropped or out of range (P = 0)
        const int i = i_row[r], c = col0 + j * 8 + 2 * t;
        float* a = acc + int64_t(i) * p.seqlen_k + c;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (p.seqlen_k % 2 == 0) {  // a 8-byte aligned (c even), c + 1 < Sk
          atomicAdd(reinterpret_cast<float2*>(a), make_float2(lo, hi));
          continue;
        }
#endif
        if (lo != 0.0f) atomicAdd(a, lo);
        if (hi != 0.0f) atomicAdd(a + 1, hi);
      }
  } else if (p.bias_grad == BiasGrad::kRows) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) row_grad[e / 2] += ds[j][e];
  }
}

// The dQ pass's epilogue for a warp's two fragment rows: dQ (accumulated unscaled, read through
// dq_at(d, e) in the C layout) times the softmax scale, and for kRows the quad-reduced row sums.
// The fragment covers columns col0 .. col0 + 8 kDTiles - 1; write_rows = false leaves the row
// sums to another warpgroup (the D = 256 pass, whose two warpgroups split the head dim).
template <class Elt, int kDTiles, class DqAt>
__device__ __forceinline__ void dq_pass_write(const BackwardParams& p, int b, int h,
                                              const int (&i_row)[2], int t,
                                              const float (&row_grad)[2], const DqAt& dq_at,
                                              int col0 = 0, bool write_rows = true) {
  auto* dq_out = static_cast<typename Elt::Storage*>(p.dq) + b * p.dq_stride_b + h * p.dq_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float rg = row_grad[r];
    rg += __shfl_xor_sync(0xffffffffu, rg, 1);
    rg += __shfl_xor_sync(0xffffffffu, rg, 2);
    const int i = i_row[r];
    if (i >= p.seqlen_q) continue;
    if (p.bias_grad == BiasGrad::kRows && t == 0 && write_rows) {
      p.row_accum[(int64_t(b) * p.num_heads + h) * p.seqlen_q + i] = rg;
    }
    auto* row = dq_out + int64_t(i) * p.dq_stride_s;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = col0 + d * 8 + 2 * t;
      const uint32_t packed = Elt::pack(dq_at(d, 2 * r) * p.scale, dq_at(d, 2 * r + 1) * p.scale);
      if (c + 1 < p.head_dim && (reinterpret_cast<uintptr_t>(row + c) & 3) == 0) {
        *reinterpret_cast<uint32_t*>(row + c) = packed;  // both values in one store
        continue;
      }
      if (c < p.head_dim) *reinterpret_cast<uint16_t*>(row + c) = uint16_t(packed & 0xffffu);
      if (c + 1 < p.head_dim) *reinterpret_cast<uint16_t*>(row + c + 1) = uint16_t(packed >> 16);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dQ pass: CTA (query tile m, head h, batch b); warps own 16 query rows each.
// kRowTopK == (p.row_topk.key != null): an instantiation of its own, so that the common path
// keeps its registers (as a runtime branch the test cost the sm90 dQ pass 68 bytes of spills).
template <int kHeadDim, class Elt, bool kRowTopK>
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kDqWarps * 32)
    dq_kernel(const __grid_constant__ BackwardParams p) {
  using Tiles = BackwardTiles<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kThreads = Tiles::kDqWarps * 32;
  constexpr int kNTiles = kBlockN / 8, kDTiles = kHeadDim / 8;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);  // (kBlockM, kHeadDim)
  uint16_t* s_do = s_q + kBlockM * kHeadDim;               // (kBlockM, kHeadDim)
  uint16_t* s_k = s_do + kBlockM * kHeadDim;               // 2 stages (kBlockN, kHeadDim)
  uint16_t* s_v = s_k + 2 * kBlockN * kHeadDim;            // 2 stages

  const int m = p.map.m_blocks - 1 - int(blockIdx.x);  // longest causal rows start first
  const DqHead head = dq_cta_head(p);
  const int b = head.b, h = head.h, hk = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = m * kBlockM;
  const DqTileList list(p, b, h, m);
  const int n_full = list.n_full, total = list.total;

  const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const auto* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  load_tile_async<kHeadDim, kBlockM, kThreads>(
      s_q, static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s,
      row0, p.seqlen_q, p.head_dim);
  load_tile_async<kHeadDim, kBlockM, kThreads>(
      s_do, static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h,
      p.do_stride_s, row0, p.seqlen_q, p.head_dim);
  if (total > 0) {
    const int n0 = list.at(0);
    load_tile_async<kHeadDim, kBlockN, kThreads>(s_k, k, p.k_stride_s, n0 * kBlockN, p.seqlen_k,
                                                 p.head_dim);
    load_tile_async<kHeadDim, kBlockN, kThreads>(s_v, v, p.v_stride_s, n0 * kBlockN, p.seqlen_k,
                                                 p.head_dim);
  }
  cute::cp_async_fence();

  int i_row[2];
  float lse2[2], rdot[2], row_grad[2] = {0.0f, 0.0f};
  dq_row_stats(p, b, h, row0 + warp * 16 + g, i_row, lse2, rdot);
  float dq_rt[1][kDTiles][4];
  auto& dq = dq_rt[0];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;

  for (int it = 0; it < total; ++it) {
    const int n = list.at(it), stage = it & 1;
    if (it + 1 < total) {
      const int nn = list.at(it + 1);
      load_tile_async<kHeadDim, kBlockN, kThreads>(s_k + (stage ^ 1) * kBlockN * kHeadDim, k,
                                                   p.k_stride_s, nn * kBlockN, p.seqlen_k, p.head_dim);
      load_tile_async<kHeadDim, kBlockN, kThreads>(s_v + (stage ^ 1) * kBlockN * kHeadDim, v,
                                                   p.v_stride_s, nn * kBlockN, p.seqlen_k, p.head_dim);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
    } else {
      cute::cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kt = s_k + stage * kBlockN * kHeadDim;
    const uint16_t* vt = s_v + stage * kBlockN * kHeadDim;
    float s_rt[1][kNTiles][4], dp_rt[1][kNTiles][4];  // one 16-row tile per warp
    auto& s = s_rt[0];
    auto& dpt = dp_rt[0];
    warp_gemm_nt<kHeadDim, kBlockN, 1, Elt>(s_rt, s_q, warp * 16, kt);    // x = q . k^T
    warp_gemm_nt<kHeadDim, kBlockN, 1, Elt>(dp_rt, s_do, warp * 16, vt);  // dP = dO . v^T
    // After this block: s = dX (for dQ), dpt = dS (for dbias).
    const bool check = it >= n_full || (n + 1) * kBlockN > p.seqlen_k || row0 + kBlockM > p.seqlen_q;
    if (p.softcap_in == 0.0f) {
      const DqIndex ix{{i_row[0], i_row[1]}, n * kBlockN, t};
      scale_pass(s, p.scale_log2);
      if (p.bias) bias_pass<Elt>(p, b, h, s, ix);
      if (check) drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
      grad_pass(s, dpt, s, dpt, [&](int, int e) { return lse2[e / 2]; },
                [&](int, int e) { return rdot[e / 2]; });  // s = P, dpt = dS
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dpt[j][e];  // dX = dS without softcap
    } else {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, i = i_row[r], c = n * kBlockN + j * 8 + 2 * t + (e & 1);
          float prob, ds, dx;
          entry_grads<Elt, kRowTopK>(p, b, h, i, c, check, s[j][e], dpt[j][e], lse2[r], rdot[r], prob, ds,
                           dx);
          s[j][e] = dx;
          dpt[j][e] = ds;
        }
    }
    dq_pass_dbias<Elt>(p, b, h, i_row, n * kBlockN, t, dpt, row_grad);
    warp_gemm_pv<kHeadDim, kBlockN, 1, Elt>(dq_rt, s_rt, kt);  // dQ += dX . k (scaled at the end)
    __syncthreads();
  }

  dq_pass_write<Elt, kDTiles>(p, b, h, i_row, t, row_grad,
                              [&](int d, int e) { return dq[d][e]; });
}

// A dK/dV CTA's shares of its key tile's query work (BackwardParams::dkv_splits): 2^log2 shares,
// share s of key row `key` at row s * stride + key of its (which, batch) region of dkv_rows rows;
// key tiles from `tiles` on hold no work (their CTAs exit). b may be the map's batch index (the
// same list). Recomputed where needed rather than held: it costs registers the passes lack.
struct DkvShares {
  int log2, stride, tiles;
};
// The map's list (map batch, map head) that kv head hk of batch b reads.
__device__ inline int map_list_of(const BackwardParams& p, int hk, int b) {
  const int mb = p.map.map_batch == 1 ? 0 : b, mh = hk * p.group / p.map.head_group;
  return mb * p.map.map_heads + mh;
}
// The kept keys of kv head hk's list in batch b (BlockMapParams::kept_count must be set).
__device__ inline int kept_count_of(const BackwardParams& p, int hk, int b) {
  return p.map.kept_count[map_list_of(p, hk, b)];
}
__device__ inline DkvShares dkv_shares_by_count(const BackwardParams& p, int hk, int b) {
  const int count = kept_count_of(p, hk, b);
  const int tiles = (count + p.map.block_n - 1) / p.map.block_n;
  // The host's rule (dkv_split_log2) with the count known, in the host's terms
  // (BackwardParams::dkv_target_tiles): about that many CTAs, at most dkv_max_shares, within the
  // grid's tiles.
  // The fused pass (dq_accum set) runs pairs of tiles: dkv_target_tiles and dkv_grid_tiles count
  // pairs there.
  const int units = p.dq_accum != nullptr ? (tiles + 1) / 2 : tiles;
  int want = p.dkv_max_shares;
  if (units > 0) {
    want = min(want, min((p.dkv_target_tiles + units - 1) / units, p.dkv_grid_tiles / units));
  }
  return {31 - __clz(max(want, 1)), tiles * p.map.block_n, tiles};
}
// The sm90 dK/dV CTA's place in its grid: x (key tile * 2^log2 + share), kv head and batch.
// Grid (x, Hk, B), or (Hk, x, B) when tile-major (BackwardParams::dkv_tile_major).
struct DkvCta {
  int x, hk, b;
};
__device__ __forceinline__ DkvCta dkv_cta(const BackwardParams& p) {
  return p.dkv_tile_major ? DkvCta{int(blockIdx.y), int(blockIdx.x), int(blockIdx.z)}
                          : DkvCta{int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
}
__device__ inline DkvShares dkv_shares(const BackwardParams& p, int hk, int b) {
  if (!p.dkv_by_count) return {p.dkv_split_log2, p.seqlen_k, p.map.n_blocks};
  return dkv_shares_by_count(p, hk, b);
}

// The unit (a key tile; a pair of them in the fused pass) that the sm90 dK/dV CTA of rank `rank`
// in the list of kv head hk and batch b runs: the rank-th of BackwardParams::dkv_order, or the
// rank itself without an order. `units`: the list's length (n_blocks; n_pairs fused).
__device__ __forceinline__ int dkv_unit(const BackwardParams& p, int hk, int b, int rank,
                                        int units) {
  if (p.dkv_order == nullptr) return rank;
  const int mb = p.map.map_batch == 1 ? 0 : b;
  return p.dkv_order[(int64_t(mb) * p.num_kv_heads + hk) * units + rank];
}

// The sm90 dK/dV pass's CTA order (BackwardParams::dkv_order): CTA (map batch mb, kv head hk)
// sorts its units by their work, the entries of the G query heads' lists, longest first, and puts
// the units past a compacted key mask's count (whose CTAs exit) after every other. kPairs: the
// units are the fused pass's pairs of key tiles (work: BackwardParams::pair_count), else key tiles
// (work: the transposed lists' counts). A counting sort over kBins buckets of the work (shifted
// until the longest fits), so units of nearly equal work may come in either order; the order
// changes only when CTAs start, not what they compute.
template <int kThreads, bool kPairs>
__global__ void __launch_bounds__(kThreads)
    dkv_order_kernel(const __grid_constant__ BackwardParams p, int32_t* order) {
  constexpr int kBins = 2048;  // and one more after them: the units past the count
  __shared__ int32_t bins[kBins + 1];
  __shared__ int32_t longest;
  const int hk = int(blockIdx.x), mb = int(blockIdx.y);
  const int n = kPairs ? p.n_pairs : p.map.n_blocks;
  const int keys_per_unit = (kPairs ? 2 : 1) * p.map.block_n;
  const int units_in = p.map.kept_count != nullptr
                           ? (kept_count_of(p, hk, mb) + keys_per_unit - 1) / keys_per_unit
                           : n;
  auto work = [&](int unit) {
    int w = 0;
    for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
      const int64_t at = (int64_t(mb) * p.map.map_heads + h / p.map.head_group) * n + unit;
      w += kPairs ? p.pair_count[at] : p.map.full_count_t[at] + p.map.partial_count_t[at];
    }
    return w;
  };
  for (int i = int(threadIdx.x); i <= kBins; i += kThreads) bins[i] = 0;
  if (threadIdx.x == 0) longest = 0;
  __syncthreads();
  for (int unit = int(threadIdx.x); unit < n; unit += kThreads) atomicMax(&longest, work(unit));
  __syncthreads();
  int shift = 0;
  while ((longest >> shift) >= kBins) ++shift;
  auto bin = [&](int unit) { return unit < units_in ? kBins - 1 - (work(unit) >> shift) : kBins; };
  for (int unit = int(threadIdx.x); unit < n; unit += kThreads) atomicAdd(&bins[bin(unit)], 1);
  __syncthreads();
  if (threadIdx.x < 32) {  // exclusive scan of the buckets: one warp, kPer per lane
    constexpr int kPer = kBins / 32;
    const int lane = int(threadIdx.x);
    int sum = 0;
    for (int i = 0; i < kPer; ++i) sum += bins[lane * kPer + i];
    int before = sum;
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, before, d);
      if (lane >= d) before += up;
    }
    before -= sum;
    for (int i = 0; i < kPer; ++i) {
      const int c = bins[lane * kPer + i];
      bins[lane * kPer + i] = before;
      before += c;
    }
    if (lane == 31) bins[kBins] = before;  // the units past the count come last
  }
  __syncthreads();
  int32_t* out = order + (int64_t(mb) * p.num_kv_heads + hk) * n;
  for (int unit = int(threadIdx.x); unit < n; unit += kThreads) {
    out[atomicAdd(&bins[bin(unit)], 1)] = unit;
  }
}

// The dK/dV pass's work list: over the G query heads of kv head hk, each head's transposed full
// then partial list of query tiles, each tile in kHalves halves. (In the sm90 kernel the producer
// and the consumer each walk their own copy.) kShares: the pass may split (DkvShares); the sm80
// pass never does.
template <int kHalves, bool kShares>
struct DkvWorkCursor {
  const BackwardParams* p;
  int n, mb, h_end;
  int h, idx, end, half, n_full;
  const int32_t *full, *part;

  // This CTA's share of head h's list: query tiles [idx, end) of full then partial ones. The share
  // is dkv_cta(p).x % 2^log2 (DkvShares; sm90 grid x = key tile * 2^log2 + share; the sm80 pass
  // runs unsplit), recomputed here rather than held: the producer warpgroup has 40 registers.
  __device__ void load_head() {
    const int64_t col = (int64_t(mb) * p->map.map_heads + h / p->map.head_group) * p->map.n_blocks + n;
    n_full = p->map.full_count_t[col];
    const int n_total = n_full + p->map.partial_count_t[col];
    const int log2 = kShares ? dkv_shares(*p, h / p->group, mb).log2 : 0;
    const int split = dkv_cta(*p).x & ((1 << log2) - 1);
    idx = (n_total * split) >> log2;
    end = (n_total * (split + 1)) >> log2;
    full = p->map.full_index_t + col * p->map.m_blocks;
    part = p->map.partial_index_t + col * p->map.m_blocks;
  }
  __device__ void skip_empty_heads() {
    while (idx >= end && h + 1 < h_end) {
      ++h;
      half = 0;
      load_head();
    }
  }
  __device__ DkvWorkCursor(const BackwardParams& params, int n_block, int hk, int b)
      : p(&params), n(n_block), mb(params.map.map_batch == 1 ? 0 : b),
        h_end((hk + 1) * params.group), h(hk * params.group), half(0) {
    load_head();
    skip_empty_heads();
  }
  __device__ bool done() const { return idx >= end; }
  __device__ int m() const { return idx < n_full ? full[idx] : part[idx - n_full]; }
  __device__ bool partial() const { return idx >= n_full; }
  __device__ void advance() {
    if (++half == kHalves) {
      half = 0;
      ++idx;
      skip_empty_heads();
    }
  }
};

// Column sums of dS for BiasGrad::kColumns in a dK/dV pass: a thread's two key rows' partial sums
// over the current head, quad-reduced and written when the head changes and at the end. Every
// head's sums of every key row a CTA runs are written (zeros included, by zero_heads first), so
// col_accum needs no clearing. (No CTA runs the slots past a compacted list's count, under
// per-row top-k's dK/dV groups and a key mask's dkv_by_count: their sums and dK / dV rows hold
// whatever the buffers held, and nothing reads them: the split reduction and the scatters stop at
// the count.)
// kShares as in DkvWorkCursor.
template <bool kShares>
struct ColumnSums {
  float sum[2] = {0.0f, 0.0f};  // per key row r of the thread
  int head = -1;                // the head `sum` belongs to
  // Where the sums go: the CTA's batch, the thread's quad lane and its two key rows (8 apart, or
  // two gathered slots). Passed by value at each call rather than held, which would cost
  // registers.
  struct Rows {
    int b, t, key_row[2];
  };
  // kAdd: add to what is there (two dK/dV warpgroups sharing the keys, after zero_heads) rather
  // than store.
  template <bool kAdd = false>
  __device__ void flush(const BackwardParams& p, Rows at) {
    if (p.bias_grad != BiasGrad::kColumns || head < 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float cg = sum[r];
      cg += __shfl_xor_sync(0xffffffffu, cg, 1);
      cg += __shfl_xor_sync(0xffffffffu, cg, 2);
      const int key = at.key_row[r];
      if (at.t == 0 && key < p.seqlen_k) {
        // One set of sums per dK/dV share (dkv_cta(p).x % 2^log2, as in DkvWorkCursor).
        int row = key;
        if constexpr (kShares) {
          const DkvShares sh = dkv_shares(p, head / p.group, at.b);
          row += (dkv_cta(p).x & ((1 << sh.log2) - 1)) * sh.stride;
        }
        float* dst = p.col_accum + (int64_t(at.b) * p.num_heads + head) * p.dkv_rows + row;
        if constexpr (kAdd) {
          atomicAdd(dst, cg);
        } else {
          *dst = cg;
        }
      }
      sum[r] = 0.0f;
    }
  }
  __device__ void zero_heads(const BackwardParams& p, Rows at, int hk) {
    if (p.bias_grad != BiasGrad::kColumns) return;
    for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
      head = h;
      flush(p, at);
    }
    head = -1;
  }
  // A half's dS^T entries (rows: the thread's two key rows, s[c][e] in row e / 2).
  template <int kC>
  __device__ void add(const float (&ds)[kC][4]) {
#pragma unroll
    for (int c = 0; c < kC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) sum[e / 2] += ds[c][e];
  }
  template <bool kAdd = false>
  __device__ void switch_to(const BackwardParams& p, Rows at, int h) {
    if (h != head) {
      flush<kAdd>(p, at);
      head = h;
    }
  }
};

// ------------------------------------------------------------------------------------------------
// dK/dV pass: CTA (key tile n, kv head hk, batch b); warps own 16 key rows each; the query tiles
// of the transposed lists are walked in halves of 64 queries (the columns here).
template <int kHeadDim, class Elt, bool kRowTopK>  // kRowTopK: as dq_kernel's
__global__ void __launch_bounds__(BackwardTiles<kHeadDim>::kDkvWarps * 32)
    dkdv_kernel(const __grid_constant__ BackwardParams p) {
  using Tiles = BackwardTiles<kHeadDim>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kHalf = Tiles::kHalfM;
  constexpr int kThreads = Tiles::kDkvWarps * 32;
  constexpr int kOutDim = Tiles::kOutDim;
  constexpr int kCTiles = kHalf / 8, kDTiles = kOutDim / 8;
  constexpr int kHalves = kBlockM / kHalf;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint16_t* s_k = reinterpret_cast<uint16_t*>(smem_raw);  // (kBlockN, kHeadDim)
  uint16_t* s_v = s_k + kBlockN * kHeadDim;                // (kBlockN, kHeadDim)
  uint16_t* s_q = s_v + kBlockN * kHeadDim;                // 2 stages (kHalf, kHeadDim)
  uint16_t* s_do = s_q + 2 * kHalf * kHeadDim;             // 2 stages (kHalf, kHeadDim)
  float* s_lse2 = reinterpret_cast<float*>(s_do + 2 * kHalf * kHeadDim);  // 2 stages (kHalf)
  float* s_rdot = s_lse2 + 2 * kHalf;                                       // 2 stages (kHalf)

  // Grid x: key tile n, times its kDParts column parts (dK / dV columns col0 .. col0 + kOutDim).
  const int n = int(blockIdx.x) / Tiles::kDParts, hk = blockIdx.y, b = blockIdx.z;
  const int col0 = int(blockIdx.x) % Tiles::kDParts * kOutDim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int key0 = n * kBlockN;
  const auto* kg = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const auto* vg = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  load_tile_async<kHeadDim, kBlockN, kThreads>(s_k, kg, p.k_stride_s, key0, p.seqlen_k, p.head_dim);
  load_tile_async<kHeadDim, kBlockN, kThreads>(s_v, vg, p.v_stride_s, key0, p.seqlen_k, p.head_dim);

  // Loads the Q / dO half tile `half` of query tile m for head h into `stage`, with its LSE (log2
  // units; -inf past Sq so those columns drop) and rowdot.
  auto load_half = [&](int h, int m, int half, int stage) {
    const int q0 = m * kBlockM + half * kHalf;
    load_tile_async<kHeadDim, kHalf, kThreads>(
        s_q + stage * kHalf * kHeadDim,
        static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s, q0,
        p.seqlen_q, p.head_dim);
    load_tile_async<kHeadDim, kHalf, kThreads>(
        s_do + stage * kHalf * kHeadDim,
        static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h,
        p.do_stride_s, q0, p.seqlen_q, p.head_dim);
    for (int c = threadIdx.x; c < kHalf; c += kThreads) {
      const int i = q0 + c;
      const bool valid = i < p.seqlen_q;
      s_lse2[stage * kHalf + c] =
          valid ? p.lse[b * p.lse_stride_b + h * p.lse_stride_h + int64_t(i) * p.lse_stride_s] * kLog2e
                : -INFINITY;
      s_rdot[stage * kHalf + c] =
          valid ? p.rowdot[(int64_t(b) * p.num_heads + h) * p.seqlen_q + i] : 0.0f;
    }
  };

  // The work list, walked one item ahead of the compute (its loads are prefetched).
  struct Work {
    int h, m, half;
    bool partial;
  };
  DkvWorkCursor<kHalves, false> cursor(p, n, hk, b);  // (a part's CTA walks its tile's list)
  auto current = [&]() { return Work{cursor.h, cursor.m(), cursor.half, cursor.partial()}; };
  bool have_next = !cursor.done();
  Work next{};
  if (have_next) {
    next = current();
    load_half(next.h, next.m, next.half, 0);
  }
  cute::cp_async_fence();

  float dk_rt[1][kDTiles][4], dv_rt[1][kDTiles][4];
  auto& dk = dk_rt[0];
  auto& dv = dv_rt[0];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
    dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.0f;
    dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.0f;
  }
  const int key_row[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  ColumnSums<false> col;
  const ColumnSums<false>::Rows col_rows{b, t, {key_row[0], key_row[1]}};
  col.zero_heads(p, col_rows, hk);

  for (int it = 0; have_next; ++it) {
    const Work w = next;
    const int stage = it & 1;
    cursor.advance();
    have_next = !cursor.done();
    if (have_next) {
      next = current();
      load_half(next.h, next.m, next.half, stage ^ 1);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();
    } else {
      cute::cp_async_wait<0>();
    }
    __syncthreads();
    col.switch_to(p, col_rows, w.h);
    const uint16_t* qt = s_q + stage * kHalf * kHeadDim;
    const uint16_t* dot = s_do + stage * kHalf * kHeadDim;
    const float* lse2 = s_lse2 + stage * kHalf;
    const float* rdot = s_rdot + stage * kHalf;
    float s_rt[1][kCTiles][4], dp_rt[1][kCTiles][4];  // one 16-key tile per warp
    auto& s = s_rt[0];
    auto& dpt = dp_rt[0];
    warp_gemm_nt<kHeadDim, kHalf, 1, Elt>(s_rt, s_k, warp * 16, qt);    // x^T = k . q^T
    warp_gemm_nt<kHeadDim, kHalf, 1, Elt>(dp_rt, s_v, warp * 16, dot);  // dP^T = v . dO^T
    const int q0 = w.m * kBlockM + w.half * kHalf;
    const bool check = w.partial || key0 + kBlockN > p.seqlen_k || q0 + kHalf > p.seqlen_q;
    // After this block: s = P (for dV), dpt = dX (for dK); col.sum holds the sums of dS.
    if (p.softcap_in == 0.0f) {
      const DkvIndex ix{{key_row[0], key_row[1]}, q0, t};
      scale_pass(s, p.scale_log2);
      if (p.bias) bias_pass<Elt>(p, b, w.h, s, ix);
      if (check) drop_pass<Elt, kRowTopK>(p, b, w.h, s, ix);
      grad_pass(s, dpt, s, dpt, [&](int j, int e) { return lse2[j * 8 + 2 * t + (e & 1)]; },
                [&](int j, int e) { return rdot[j * 8 + 2 * t + (e & 1)]; });
      if (p.bias_grad == BiasGrad::kColumns) {
#pragma unroll
        for (int j = 0; j < kCTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) col.sum[e / 2] += dpt[j][e];  // dS = dX without softcap
      }
    } else {
#pragma unroll
      for (int j = 0; j < kCTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, cl = j * 8 + 2 * t + (e & 1);
          float prob, ds, dx;
          entry_grads<Elt, kRowTopK>(p, b, w.h, q0 + cl, key_row[r], check, s[j][e], dpt[j][e], lse2[cl],
                           rdot[cl], prob, ds, dx);
          s[j][e] = prob;
          dpt[j][e] = dx;
          col.sum[r] += ds;
        }
    }
    // dV += P^T . dO, dK += dX^T . q (scaled at the end), over this CTA's columns.
    warp_gemm_pv<kOutDim, kHalf, 1, Elt, kHeadDim>(dv_rt, s_rt, dot + col0);
    warp_gemm_pv<kOutDim, kHalf, 1, Elt, kHeadDim>(dk_rt, dp_rt, qt + col0);
    __syncthreads();
  }
  col.flush(p, col_rows);  // (every column part stores the same sums: the same dS)

  auto* dk_out = static_cast<typename Elt::Storage*>(p.dk) + b * p.dk_stride_b + hk * p.dk_stride_h;
  auto* dv_out = static_cast<typename Elt::Storage*>(p.dv) + b * p.dv_stride_b + hk * p.dv_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_row[r];
    if (key >= p.seqlen_k) continue;
    auto* krow = dk_out + int64_t(key) * p.dk_stride_s;
    auto* vrow = dv_out + int64_t(key) * p.dv_stride_s;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = col0 + d * 8 + 2 * t;
      const uint32_t kp = Elt::pack(dk[d][2 * r] * p.scale, dk[d][2 * r + 1] * p.scale);
      const uint32_t vp = Elt::pack(dv[d][2 * r], dv[d][2 * r + 1]);
      if (c < p.head_dim) {
        *reinterpret_cast<uint16_t*>(krow + c) = uint16_t(kp & 0xffffu);
        *reinterpret_cast<uint16_t*>(vrow + c) = uint16_t(vp & 0xffffu);
      }
      if (c + 1 < p.head_dim) {
        *reinterpret_cast<uint16_t*>(krow + c + 1) = uint16_t(kp >> 16);
        *reinterpret_cast<uint16_t*>(vrow + c + 1) = uint16_t(vp >> 16);
      }
    }
  }
}

// Visits every dbias element as f(b, h, i, j, e) in the caller's shape (e: its row-major index).
// Grid (dbias rows (b, h, i), blocks of dbias_keys_per_block(rows) keys): the row's index
// arithmetic (64-bit divisions) is done once per block, and a few long rows (a key bias
// (B, H, 1, Sk)) spread over many blocks of one key per thread: with 2048 keys per block a
// (1, 2, 1, 2048) column reduction ran on 2 CTAs for 54 us (H200).
inline int dbias_keys_per_block(int64_t rows) { return rows >= 4096 ? 2048 : 256; }
template <class F>
__device__ __forceinline__ void for_each_dbias_entry(const BackwardParams& p, F&& f) {
  const int64_t r = blockIdx.x;
  const int i = int(r % p.dbias_shape[2]);
  const int h = int((r / p.dbias_shape[2]) % p.dbias_shape[1]);
  const int b = int(r / (int64_t(p.dbias_shape[2]) * p.dbias_shape[1]));
  const int per_block = (p.dbias_shape[3] + int(gridDim.y) - 1) / int(gridDim.y);
  const int j_end = min(int(blockIdx.y + 1) * per_block, p.dbias_shape[3]);
  for (int j = int(blockIdx.y) * per_block + threadIdx.x; j < j_end; j += blockDim.x) {
    f(b, h, i, j, r * p.dbias_shape[3] + j);
  }
}

__device__ __forceinline__ int64_t dbias_offset(const BackwardParams& p, int b, int h, int i,
                                                int j) {
  return b * p.dbias_stride[0] + h * p.dbias_stride[1] + int64_t(i) * p.dbias_stride[2] +
         int64_t(j) * p.dbias_stride[3];
}

// Zeroes dbias through its strides (kFull: entries of skipped tiles must read 0).
template <class Elt>
__global__ void zero_dbias_kernel(const __grid_constant__ BackwardParams p) {
  for_each_dbias_entry(p, [&](int b, int h, int i, int j, int64_t) {
    const int64_t off = dbias_offset(p, b, h, i, j);
    if (p.bias_is_fp32) static_cast<float*>(p.dbias)[off] = 0.0f;
    else static_cast<uint16_t*>(p.dbias)[off] = 0;
  });
}

// dK and dV from the dK/dV pass's split shares (BackwardParams::dkv_partial), summed in split
// order. Grid (key blocks, kv heads, batch): a CTA's shares and count are those of one list, read
// once; each thread sums four consecutive columns of one key's dK and dV row over every share (the
// loads issued together) and stores each as one 8-byte write where the output allows. Lists
// without shares (their rows written by the pass itself, one share under dkv_by_count) and rows
// past a compaction's count (BlockMapParams::kept_count: nothing reads them) are left as they are.
// With BackwardParams::scatter (every list split) the grid's first dimension runs over the
// caller's keys instead: each key's slot row is summed into the caller's dK and dV, a dropped
// key's row zeroed.
// (Summing every slot row took 0.36 ms for per-row top-k at (1, 16384, 32, 8, 128) window 2048,
// where 38% of the slots hold keys; one thread per element with 64-bit index arithmetic took
// 0.094 ms for a key mask's two shares at that shape, this kernel 0.062 ms, H200.)
template <class Elt, int kKernelDim>
__global__ void dkv_reduce_kernel(const __grid_constant__ BackwardParams p) {
  constexpr int kQuads = kKernelDim / 4;
  constexpr int kMaxShares = 8;  // dkv_max_shares and FSA_CUDA_DKV_SPLIT_LOG2 stay within it
  const int hk = int(blockIdx.y), b = int(blockIdx.z);
  const DkvShares sh = dkv_shares(p, hk, b);
  if (sh.log2 == 0) return;
  const KeyScatter& sc = p.scatter;
  const int keys = sc.slot != nullptr        ? sc.keys
                   : p.map.kept_count != nullptr ? min(p.seqlen_k, kept_count_of(p, hk, b))
                                             : p.seqlen_k;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int out_key = int(e / kQuads), d = int(e % kQuads) * 4;
  if (out_key >= keys || d >= p.head_dim) return;
  // The slot row summed (-1: a dropped key, zeros) and where it goes.
  const int key = sc.slot != nullptr
                      ? sc.slot[int64_t(b * sc.list_stride_b + hk / sc.head_group) * sc.keys +
                                out_key]
                      : out_key;
  auto row = [&](void* base, int64_t stride_b, int64_t stride_s, int64_t stride_h, int at) {
    return reinterpret_cast<uint16_t*>(static_cast<typename Elt::Storage*>(base) + b * stride_b +
                                       at * stride_s + hk * stride_h + d);
  };
  uint16_t* dk = sc.slot != nullptr
                     ? row(sc.dk, sc.dk_stride_b, sc.dk_stride_s, sc.dk_stride_h, out_key)
                     : row(p.dk, p.dk_stride_b, p.dk_stride_s, p.dk_stride_h, key);
  uint16_t* dv = sc.slot != nullptr
                     ? row(sc.dv, sc.dv_stride_b, sc.dv_stride_s, sc.dv_stride_h, out_key)
                     : row(p.dv, p.dv_stride_b, p.dv_stride_s, p.dv_stride_h, key);
  // The four columns from d: one 8-byte store where whole and aligned, else column by column.
  auto store4 = [&](uint16_t* out, const float (&x)[4]) {
    const uint32_t w[2] = {Elt::pack(x[0], x[1]), Elt::pack(x[2], x[3])};
    if (d + 4 <= p.head_dim && reinterpret_cast<uintptr_t>(out) % 8 == 0) {
      *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
      return;
    }
    for (int c = 0; c < 4 && d + c < p.head_dim; ++c) out[c] = uint16_t(w[c / 2] >> (16 * (c % 2)));
  };
  if (key < 0) {
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    store4(dk, zero);
    store4(dv, zero);
    return;
  }
  const int64_t per = int64_t(p.batch) * p.dkv_rows * p.num_kv_heads * kKernelDim;  // dK, then dV
  const int64_t step = int64_t(sh.stride) * p.num_kv_heads * kKernelDim;            // one share
  const float* src =
      p.dkv_partial + ((int64_t(b) * p.dkv_rows + key) * p.num_kv_heads + hk) * kKernelDim + d;
  float4 x[kMaxShares], y[kMaxShares];
#pragma unroll
  for (int s = 0; s < kMaxShares; ++s) {
    if (s < (1 << sh.log2)) {
      x[s] = *reinterpret_cast<const float4*>(src + s * step);
      y[s] = *reinterpret_cast<const float4*>(src + per + s * step);
    }
  }
  float k4[4] = {0.0f, 0.0f, 0.0f, 0.0f}, v4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < kMaxShares; ++s) {
    if (s < (1 << sh.log2)) {
      k4[0] += x[s].x, k4[1] += x[s].y, k4[2] += x[s].z, k4[3] += x[s].w;
      v4[0] += y[s].x, v4[1] += y[s].y, v4[2] += y[s].z, v4[3] += y[s].w;
    }
  }
  store4(dk, k4);
  store4(dv, v4);
}

// dbias (caller's shape, bias dtype) from the fp32 accumulators: sums over the dims the caller
// passed as 1, in a fixed order. One lane per dbias element.
template <class Elt>
__global__ void dbias_reduce_kernel(const __grid_constant__ BackwardParams p) {
  for_each_dbias_entry(p, [&](int bb, int hb, int ib, int jb, int64_t e) {
    float sum = 0.0f;
    if (p.bias_grad == BiasGrad::kFullSummed) {
      sum = p.dbias_accum[e];
    } else {
      const int heads_per = p.num_heads / p.dbias_shape[1];
      const bool rows = p.bias_grad == BiasGrad::kRows;
      const int len = rows ? p.seqlen_q : p.seqlen_k;
      const bool full_dim = rows ? p.dbias_shape[2] == p.seqlen_q : p.dbias_shape[3] == p.seqlen_k;
      const int b0 = p.dbias_shape[0] == 1 ? 0 : bb, b1 = p.dbias_shape[0] == 1 ? p.batch : bb + 1;
      for (int b = b0; b < b1; ++b) {
        for (int h = hb * heads_per; h < (hb + 1) * heads_per; ++h) {
          // Row sums: (B, H, Sq). Column sums: one per dK/dV share, in the shares' rows
          // (BackwardParams::dkv_rows); rows past the key tiles that hold work were not written.
          const DkvShares sh =
              rows ? DkvShares{0, len, 0} : dkv_shares(p, h / p.group, b);
          const int written = rows ? len : min(len, sh.tiles * p.map.block_n);
          const float* acc = rows ? p.row_accum + (int64_t(b) * p.num_heads + h) * len
                                  : p.col_accum + (int64_t(b) * p.num_heads + h) * p.dkv_rows;
          for (int s = 0; s < (1 << sh.log2); ++s) {
            const float* a = acc + s * sh.stride;
            if (full_dim) {
              const int x = rows ? ib : jb;
              if (x < written) sum += a[x];
            } else {
              for (int x = 0; x < written; ++x) sum += a[x];
            }
          }
        }
      }
    }
    const int64_t off = dbias_offset(p, bb, hb, ib, jb);
    if (p.bias_is_fp32) static_cast<float*>(p.dbias)[off] = sum;
    else reinterpret_cast<uint16_t*>(p.dbias)[off] = uint16_t(Elt::pack(sum, 0.0f) & 0xffffu);
  });
}

}  // namespace fsa::detail::cuda
