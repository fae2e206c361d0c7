// The mask utilities on CUDA tensors (include/fsa/mask.h, SPEC.md section 5), bitwise identical to
// the CPU core (src/cpu/mask_utils.cc), tie rule included. Everything runs on the caller's stream;
// nothing is copied to the host and no (B, H, Sq, Sk) temporary is built.
//
// dynamic_mask, top-k: one CTA per output row.
//   1. The row's order keys (unsigned integers ordered like the filled values, see order_key) are
//      derived from the bias and mask read through their broadcast strides, into shared memory
//      when the row fits (rows of about 100K 16-bit or 50K 32-bit keys on a Hopper SM); longer
//      rows re-derive them from global memory on every pass, so any length works.
//   2. select_row_threshold() finds the k-th largest key by an exact radix select, 8-bit digits
//      from the top (two passes for fp16 / bf16, four for fp32), and which of the keys equal to it
//      are kept: the lowest indices, found by one count per warp segment and one warp's walk.
//   3. Every key is tested against that (threshold, last tie index), fill entries are dropped, and
//      the bool row is written 4 keys per 32-bit store, or staged in shared memory and block
//      smoothed on its way out.
// dynamic_mask, ReLU: the same row CTAs without the selection. block_smooth, expand_mask_2d:
// elementwise kernels. select_blocks: one thread per block score (summed in the CPU's order, so a
// mean is bitwise the CPU's), then select_row_threshold() over each query block's candidates.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/mask_backend.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"

namespace fsa::detail::cuda {
namespace {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kMaxRowThreads = 512;  // threads of a row CTA (row_threads())
// Two CTAs of kMaxRowThreads per SM at least: up to 64 registers a thread (ptxas otherwise aims
// at full occupancy, 32-40 registers, and spills in the global-memory variants).
constexpr int kMinRowBlocks = 2;
constexpr int64_t kMaxKeys = int64_t(1) << 30;  // keys per row: int indices with headroom
constexpr int64_t kMaxGrid = 1 << 30;           // CTAs per launch; grid-stride loops cover the rest

// ---- storage formats and order keys -------------------------------------------------------------
//
// The order key of a value is its bit pattern remapped so that unsigned integer order is the
// float order, with every NaN mapped to the largest key (torch.topk ranks NaN above +inf), as the
// CPU's order_key does. fp16 and bf16 keep 16-bit keys of their own bits: widening to fp32 is exact
// and monotone, so these order a row exactly as the CPU's 32-bit keys of the widened values do.
// Keys are equal iff the bits are (NaNs aside): +0.0 and -0.0 are two adjacent keys on both
// devices, which is why a zero fill is matched by two keys (FillKeys).

template <class BitsT, BitsT kInfBits>
struct FloatFormat {
  using Bits = BitsT;  // the storage element, and its order key
  static constexpr Bits kSign = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  static constexpr Bits kInf = kInfBits;  // +inf; larger magnitudes are NaN
};
using Bf16 = FloatFormat<uint16_t, 0x7f80>;
using Fp16 = FloatFormat<uint16_t, 0x7c00>;
using Fp32 = FloatFormat<uint32_t, 0x7f800000u>;
using Fp64 = FloatFormat<uint64_t, 0x7ff0000000000000ull>;

template <class F>
__device__ inline typename F::Bits order_key(typename F::Bits u) {
  using Bits = typename F::Bits;
  if (Bits(u & Bits(~F::kSign)) > F::kInf) return Bits(~Bits(0));  // NaN ranks highest
  return (u & F::kSign) ? Bits(~u) : Bits(u | F::kSign);
}

// value > 0: not +-0, not negative, not NaN.
template <class F>
__device__ inline bool positive(typename F::Bits u) {
  return u != 0 && u <= F::kInf;
}

template <class F>
__device__ inline double to_double(typename F::Bits u);
template <>
__device__ inline double to_double<Bf16>(uint16_t u) {
  return __uint_as_float(uint32_t(u) << 16);
}
template <>
__device__ inline double to_double<Fp16>(uint16_t u) {
  return __half2float(__ushort_as_half(u));
}
template <>
__device__ inline double to_double<Fp32>(uint32_t u) {
  return __uint_as_float(u);
}
template <>
__device__ inline double to_double<Fp64>(uint64_t u) {
  return __longlong_as_double(static_cast<long long>(u));
}

// The fill's keys: entries equal to the fill are never kept; a zero fill matches +0.0 and -0.0.
template <class F>
struct FillKeys {
  typename F::Bits key, alt;  // alt == key unless the fill is a zero
  bool positive;              // fill > 0 (ReLU keeps masked entries then)
};

template <class F>
__device__ inline FillKeys<F> fill_keys(uint64_t fill_bits) {
  using Bits = typename F::Bits;
  const Bits u = Bits(fill_bits);
  const bool zero = Bits(u & Bits(~F::kSign)) == 0;
  return {order_key<F>(u), order_key<F>(zero ? Bits(u ^ F::kSign) : u), positive<F>(u)};
}

// ---- small device helpers -----------------------------------------------------------------------

// N consecutive Ts, for vector loads and stores of aligned groups.
template <class T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// Keys (or values) 4g .. 4g+3 of a row through aligned vector accesses (16 bytes at most each).
template <class T>
__device__ inline void load4(const T* p, T (&v)[4]) {
  if constexpr (sizeof(T) <= 4) {
    const Packed<T, 4> q = *reinterpret_cast<const Packed<T, 4>*>(p);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = q.v[e];
  } else {
    const Packed<T, 2> lo = reinterpret_cast<const Packed<T, 2>*>(p)[0];
    const Packed<T, 2> hi = reinterpret_cast<const Packed<T, 2>*>(p)[1];
    v[0] = lo.v[0], v[1] = lo.v[1], v[2] = hi.v[0], v[3] = hi.v[1];
  }
}

template <class T>
__device__ inline void store4(T* p, const T (&v)[4]) {
  if constexpr (sizeof(T) <= 4) {
    *reinterpret_cast<Packed<T, 4>*>(p) = Packed<T, 4>{{v[0], v[1], v[2], v[3]}};
  } else {
    reinterpret_cast<Packed<T, 2>*>(p)[0] = Packed<T, 2>{{v[0], v[1]}};
    reinterpret_cast<Packed<T, 2>*>(p)[1] = Packed<T, 2>{{v[2], v[3]}};
  }
}

__device__ inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ inline uint32_t warp_sum(uint32_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

__device__ inline uint32_t warp_inclusive_scan(uint32_t v) {
  const int lane = threadIdx.x % 32;
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t lower = __shfl_up_sync(kFullWarp, v, offset);
    if (lane >= offset) v += lower;
  }
  return v;
}

// ---- per-row top-k selection --------------------------------------------------------------------
//
// select_row_threshold(keys, n, k, excluded0, excluded1, scratch) -> {key, last_tie}: the exact
// top k of one row of n order keys, computed by one CTA. Self-contained (it depends on nothing
// below), so that the attention kernels can reuse it for per-row top-k thresholds.
//
// Result: the top k are the indices j with key_j > key, plus those with key_j == key and
// j <= last_tie. Among keys equal to the k-th largest, the lowest indices are kept (the CPU core's
// tie rule). k <= 0 keeps nothing ({all ones, -1}); k >= n keeps everything ({0, n - 1}).
//
// Contract:
//   - every thread of the CTA calls it with the same arguments (blockDim.x a multiple of 32, at
//     most 1024); it synchronizes the CTA and uses `scratch` (shared memory) and nothing else;
//   - keys.load(g, key) sets key[0..3] to the keys of indices 4g .. 4g+3; entries at indices >= n
//     are ignored (and a source must not read memory for them);
//   - excluded0 / excluded1 are keys the caller never keeps (a fill value, -inf). They rank as
//     usual (they take top-k slots) but are counted in registers instead of by shared atomics,
//     since a masked row repeats them thousands of times; when the k-th largest key is one of
//     them, last_tie is n - 1 (not computed: the caller drops those keys anyway). Pass the same
//     key twice for one, or a key absent from the row for none.
// Cost: per 8-bit digit one read of the row (two passes for 16-bit keys, four for 32-bit, eight
// for 64-bit; it stops early once the k-th largest's digit bin is kept whole), and when the
// threshold has more equal keys than the top k takes, one more read and one warp's walk over its
// segment of the row. Three barriers per pass.

constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
// Same-address shared atomics of one warp instruction serialize, and the top digit of a bias row
// (its sign and exponent) takes few values; lane l counts into copy l % kHistCopies, and the
// copies are one bank apart (stride kBins + 1) so that equal digits of different copies do not
// meet in one bank either.
constexpr int kHistCopies = 8;
constexpr int kHistStride = kBins + 1;

struct SelectScratch {
  uint32_t hist[kHistCopies * kHistStride];  // digit counts of the current pass, per copy
  uint32_t total[kBins];                     // their sum over the copies
  uint32_t warp_equal[32];                   // keys equal to the threshold, per warp segment
  uint32_t digit;                            // the bin holding the k-th largest key
  uint32_t above;                            // keys (of the current prefix) in higher bins
  int walk_warp;                             // the warp whose segment holds the last kept tie
  uint32_t walk_need;                        // which equal key of that segment it is (from 1)
  int last_tie;                              // its index
};

template <class Key>
struct RowThreshold {
  Key key;       // the k-th largest key
  int last_tie;  // keys equal to `key` are kept up to this index (inclusive)
};

// Warps own contiguous ranges of groups (4 keys each), so that index order is (warp, group, key):
// what the tie walk relies on.
struct RowSegment {
  int begin, end;  // groups [begin, end) of this warp
};

__device__ inline RowSegment warp_segment(int n) {
  const int groups = (n + 3) / 4, warps = blockDim.x / 32;
  const int per_warp = (groups + warps - 1) / warps;
  const int begin = min(groups, int(threadIdx.x / 32) * per_warp);
  return {begin, min(groups, begin + per_warp)};
}

template <class Key>
__device__ inline uint32_t digit_of(Key key, int shift) {
  return uint32_t(key >> shift) & (kBins - 1);
}

// Warp 0: the bin holding the remaining-th largest key, scanning the bins from the top (lane l
// holds bins 255 - 8l down to 248 - 8l).
__device__ inline void pick_digit(SelectScratch& s, uint32_t remaining) {
  constexpr int kPerLane = kBins / 32;
  const int lane = threadIdx.x % 32;
  uint32_t count[kPerLane], sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    count[i] = s.total[kBins - 1 - kPerLane * lane - i];
    sum += count[i];
  }
  const uint32_t inclusive = warp_inclusive_scan(sum);
  uint32_t above = inclusive - sum;
  if (above < remaining && remaining <= inclusive) {  // exactly one lane
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (above + count[i] >= remaining) {
        s.digit = kBins - 1 - kPerLane * lane - i;
        s.above = above;
        break;
      }
      above += count[i];
    }
  }
}

// Bit e set iff key 4g+e exists and equals `threshold`.
template <class Key>
__device__ inline uint32_t equal_bits(const Key (&key)[4], int g, int n, Key threshold) {
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) bits |= uint32_t(4 * g + e < n && key[e] == threshold) << e;
  return bits;
}

// The index of the need-th key equal to `threshold` in index order (1 <= need <= their count).
template <class Key, class Source>
__device__ __forceinline__ int last_tie_index(const Source& keys, int n, Key threshold,
                                              uint32_t need, SelectScratch& s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const RowSegment seg = warp_segment(n);
  uint32_t equal = 0;
  for (int g = seg.begin + lane; g < seg.end; g += 32) {
    Key key[4];
    keys.load(g, key);
    equal += __popc(equal_bits(key, g, n, threshold));
  }
  equal = warp_sum(equal);
  if (lane == 0) s.warp_equal[warp] = equal;
  __syncthreads();
  if (warp == 0) {
    const uint32_t count = lane < warps ? s.warp_equal[lane] : 0;
    const uint32_t inclusive = warp_inclusive_scan(count);
    if (inclusive - count < need && need <= inclusive) {
      s.walk_warp = lane;
      s.walk_need = need - (inclusive - count);
    }
  }
  __syncthreads();
  if (warp == s.walk_warp) {
    uint32_t left = s.walk_need;
    for (int base = seg.begin; base < seg.end; base += 32) {
      const int g = base + lane;
      uint32_t bits = 0;
      if (g < seg.end) {
        Key key[4];
        keys.load(g, key);
        bits = equal_bits(key, g, n, threshold);
      }
      const uint32_t count = __popc(bits), inclusive = warp_inclusive_scan(count);
      if (inclusive - count < left && left <= inclusive) {
        uint32_t rank = left - (inclusive - count);  // of the lane's equal keys, from 1
        for (int e = 0; e < 4; ++e) {
          if (((bits >> e) & 1u) && --rank == 0) {
            s.last_tie = 4 * g + e;
            break;
          }
        }
      }
      const uint32_t group_total = __shfl_sync(kFullWarp, inclusive, 31);
      if (left <= group_total) break;
      left -= group_total;
    }
  }
  __syncthreads();
  return s.last_tie;
}

template <class Key, class Source>
__device__ __forceinline__ RowThreshold<Key> select_row_threshold(const Source& keys, int n, int k,
                                                                  Key excluded0, Key excluded1,
                                                                  SelectScratch& s) {
  if (k <= 0) return {Key(~Key(0)), -1};
  if (k >= n) return {Key(0), n - 1};
  const int lane = threadIdx.x % 32;
  const RowSegment seg = warp_segment(n);
  uint32_t* hist = s.hist + (lane % kHistCopies) * kHistStride;
  Key prefix = 0, decided = 0;       // the threshold's digits found so far, and which bits they are
  uint32_t remaining = uint32_t(k);  // rank of the threshold among the keys matching the prefix
  for (int shift = int(8 * sizeof(Key)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kHistCopies * kHistStride; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    uint32_t excluded0_count = 0, excluded1_count = 0;
    for (int g = seg.begin + lane; g < seg.end; g += 32) {
      Key key[4];
      keys.load(g, key);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (4 * g + e >= n || Key(key[e] & decided) != prefix) continue;
        if (key[e] == excluded0) {
          ++excluded0_count;
        } else if (key[e] == excluded1) {
          ++excluded1_count;
        } else {
          atomicAdd(&hist[digit_of(key[e], shift)], 1u);
        }
      }
    }
    excluded0_count = warp_sum(excluded0_count);
    excluded1_count = warp_sum(excluded1_count);
    if (lane == 0 && excluded0_count) {
      atomicAdd(&s.hist[digit_of(excluded0, shift)], excluded0_count);
    }
    if (lane == 0 && excluded1_count) {
      atomicAdd(&s.hist[digit_of(excluded1, shift)], excluded1_count);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < kBins; d += blockDim.x) {
      uint32_t sum = 0;
#pragma unroll
      for (int c = 0; c < kHistCopies; ++c) sum += s.hist[c * kHistStride + d];
      s.total[d] = sum;
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_digit(s, remaining);
    __syncthreads();
    const uint32_t digit = s.digit, in_bin = s.total[digit];
    remaining -= s.above;
    prefix = Key(prefix | Key(Key(digit) << shift));
    decided = Key(decided | Key(Key(kBins - 1) << shift));
    // Every key of the bin is kept: the threshold is the bin's lowest possible key.
    if (in_bin == remaining) return {prefix, n - 1};
  }
  // prefix is the k-th largest key; `remaining` of its equal keys are kept (fewer than all).
  if (prefix == excluded0 || prefix == excluded1) return {prefix, n - 1};
  return {prefix, last_tie_index(keys, n, prefix, remaining, s)};
}

// Key sources for select_row_threshold().

// Keys staged in shared memory, (round_up(n, 4),).
template <class Key>
struct SharedKeys {
  const Key* keys;
  __device__ void load(int g, Key (&key)[4]) const { load4(keys + 4 * g, key); }
};

// Keys in global memory, contiguous (n,).
template <class Key>
struct GlobalKeys {
  const Key* keys;
  int n;
  __device__ void load(int g, Key (&key)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) key[e] = 4 * g + e < n ? keys[4 * g + e] : Key(0);
  }
};

// ---- row output and block smoothing -------------------------------------------------------------

// Smoothing block [start, start + len) of a row, by one thread: all True iff strictly more than
// half of it is True. Every flag is read before any is written, so src may be dst.
__device__ inline void smooth_block_by_thread(const uint8_t* src, int64_t src_stride, uint8_t* dst,
                                              int64_t dst_stride, int64_t start, int64_t len) {
  int64_t count = 0;
  for (int64_t j = start; j < start + len; ++j) count += src[j * src_stride] != 0;
  const uint8_t keep = 2 * count > len;
  for (int64_t j = start; j < start + len; ++j) dst[j * dst_stride] = keep;
}

// The same by one warp (long blocks); the warp sum orders every lane's reads before the writes.
__device__ inline void smooth_block_by_warp(const uint8_t* src, int64_t src_stride, uint8_t* dst,
                                            int64_t dst_stride, int64_t start, int64_t len) {
  const int lane = threadIdx.x % 32;
  uint32_t count = 0;
  for (int64_t j = start + lane; j < start + len; j += 32) count += src[j * src_stride] != 0;
  const uint8_t keep = 2 * int64_t(warp_sum(count)) > len;
  for (int64_t j = start + lane; j < start + len; j += 32) dst[j * dst_stride] = keep;
}

// Blocks of up to this many keys are smoothed by one thread, longer ones by a warp.
constexpr int64_t kThreadSmoothMax = 32;

// One row of n flags, smoothed by the whole CTA.
__device__ __forceinline__ void smooth_row(const uint8_t* src, int64_t src_stride, uint8_t* dst,
                                           int64_t dst_stride, int n, int block_size) {
  const int blocks = (n + block_size - 1) / block_size;
  if (block_size <= kThreadSmoothMax) {
    for (int u = threadIdx.x; u < blocks; u += blockDim.x) {
      const int64_t start = int64_t(u) * block_size;
      smooth_block_by_thread(src, src_stride, dst, dst_stride, start,
                             std::min<int64_t>(block_size, n - start));
    }
  } else {
    for (int u = threadIdx.x / 32; u < blocks; u += blockDim.x / 32) {
      const int64_t start = int64_t(u) * block_size;
      smooth_block_by_warp(src, src_stride, dst, dst_stride, start,
                           std::min<int64_t>(block_size, n - start));
    }
  }
}

// Writes one bool row of n keys: keep(g) returns keys 4g .. 4g+3 as bytes 0/1 of a uint32 (bytes
// past n are ignored). With block_size > 1 the flags go through `flags` (shared memory,
// (round_up(n, 4),)) and are smoothed on their way out; otherwise a contiguous, 4-byte aligned
// row takes one 32-bit store per group.
template <class Keep>
__device__ __forceinline__ void write_row(const Keep& keep, int n, uint8_t* out, int64_t out_stride,
                                          int block_size, uint8_t* flags) {
  const int groups = (n + 3) / 4;
  if (block_size > 1) {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
      *reinterpret_cast<uint32_t*>(flags + 4 * g) = keep(g);
    }
    __syncthreads();
    smooth_row(flags, 1, out, out_stride, n, block_size);
    return;
  }
  const bool packed = out_stride == 1 && aligned(out, 4);
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const uint32_t bits = keep(g);
    if (packed && 4 * g + 4 <= n) {
      *reinterpret_cast<uint32_t*>(out + 4 * g) = bits;
      continue;
    }
    for (int e = 0; e < 4 && 4 * g + e < n; ++e) {
      out[int64_t(4 * g + e) * out_stride] = uint8_t((bits >> (8 * e)) & 1u);
    }
  }
}

// ---- dynamic_mask -------------------------------------------------------------------------------

// One dynamic_mask launch over the rows of out (B, H, Sq, Sk). The three leading dims are in launch
// order (row_order()), slowest first; consecutive rows go to consecutive CTAs.
struct RowMaskParams {
  const void* bias;      // attn_bias at (0, 0, 0, 0)
  const uint8_t* mask;   // attn_mask at (0, 0, 0, 0); nullptr: none
  uint8_t* out;          // out at (0, 0, 0, 0)
  int64_t lead[3];       // sizes of the leading dims
  int64_t bias_lead[3];  // their strides in attn_bias (elements; 0 = broadcast)
  int64_t mask_lead[3];  // ... in attn_mask
  int64_t out_lead[3];   // ... in out
  int64_t bias_sk;       // key-dim strides (elements; 0 = broadcast)
  int64_t mask_sk;
  int64_t out_sk;
  int64_t rows;        // lead[0] * lead[1] * lead[2]
  int n;               // keys per row (Sk), <= kMaxKeys
  int k;               // top-k window, in [0, n]
  int block_size;      // > 1: smooth each row in the kernel (shared flags); 1: not here
  uint64_t fill_bits;  // the rounded fill in the bias's dtype, raw bits
};

struct RowRef {
  int64_t bias, mask, out;  // element offsets of the row's key 0
};

__device__ inline RowRef locate_row(const RowMaskParams& p, int64_t row) {
  const int64_t c = row % p.lead[2], ab = row / p.lead[2];
  const int64_t b = ab % p.lead[1], a = ab / p.lead[1];
  return {a * p.bias_lead[0] + b * p.bias_lead[1] + c * p.bias_lead[2],
          a * p.mask_lead[0] + b * p.mask_lead[1] + c * p.mask_lead[2],
          a * p.out_lead[0] + b * p.out_lead[1] + c * p.out_lead[2]};
}

// The order keys of one filled bias row, derived from the bias and mask in global memory.
template <class F>
struct BiasRowKeys {
  using Bits = typename F::Bits;
  const Bits* bias;     // the row's key 0
  int64_t bias_stride;  // along keys
  const uint8_t* mask;  // nullptr: no mask
  int64_t mask_stride;
  int n;
  Bits fill_key;  // the key of a masked entry
  bool packed;    // contiguous, aligned bias and mask rows: a group is one vector load of each

  __device__ Bits key_at(int j) const {
    if (mask && !mask[j * mask_stride]) return fill_key;
    return order_key<F>(bias[j * bias_stride]);
  }

  __device__ void load(int g, Bits (&key)[4]) const {
    const int j0 = 4 * g;
    if (packed && j0 + 4 <= n) {
      Bits value[4];
      load4(bias + j0, value);
      const uint32_t keep = mask ? *reinterpret_cast<const uint32_t*>(mask + j0) : 0x01010101u;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        key[e] = ((keep >> (8 * e)) & 0xffu) ? order_key<F>(value[e]) : fill_key;
      }
      return;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) key[e] = j0 + e < n ? key_at(j0 + e) : Bits(0);
  }
};

template <class F>
__device__ inline BiasRowKeys<F> bias_row_keys(const RowMaskParams& p, const RowRef& r,
                                               typename F::Bits fill_key) {
  using Bits = typename F::Bits;
  const Bits* bias = static_cast<const Bits*>(p.bias) + r.bias;
  const uint8_t* mask = p.mask ? p.mask + r.mask : nullptr;
  const bool packed = p.bias_sk == 1 && aligned(bias, 4 * sizeof(Bits)) &&
                      (!mask || (p.mask_sk == 1 && aligned(mask, 4)));
  return {bias, p.bias_sk, mask, p.mask_sk, p.n, fill_key, packed};
}

// Selects and writes one top-k row from `keys` (shared or derived from global memory).
template <class F, class Source>
__device__ __forceinline__ void write_topk_row(const Source& keys, const RowMaskParams& p,
                                               const RowRef& r, const FillKeys<F>& fill,
                                               uint8_t* flags, SelectScratch& scratch) {
  using Key = typename F::Bits;
  const RowThreshold<Key> t = select_row_threshold(keys, p.n, p.k, fill.key, fill.alt, scratch);
  const auto keep = [&](int g) {
    Key key[4];
    keys.load(g, key);
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool top = key[e] > t.key || (key[e] == t.key && 4 * g + e <= t.last_tie);
      bits |= uint32_t(top && key[e] != fill.key && key[e] != fill.alt) << (8 * e);
    }
    return bits;
  };
  write_row(keep, p.n, p.out + r.out, p.out_sk, p.block_size, flags);
}

// grid (min(rows, kMaxGrid)), row_threads(n) threads. Dynamic shared memory: the row's keys
// (round_up(n, 4),) when kKeysShared, then its flags (round_up(n, 4),) bytes when smoothing.
template <class F, bool kKeysShared>
__global__ void __launch_bounds__(kMaxRowThreads, kMinRowBlocks)
    topk_mask_kernel(const __grid_constant__ RowMaskParams p) {
  using Key = typename F::Bits;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ SelectScratch scratch;
  const int groups = (p.n + 3) / 4;
  Key* keys = reinterpret_cast<Key*>(smem);
  uint8_t* flags = smem + (kKeysShared ? size_t(groups) * 4 * sizeof(Key) : 0);
  const FillKeys<F> fill = fill_keys<F>(p.fill_bits);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowRef r = locate_row(p, row);
    const BiasRowKeys<F> source = bias_row_keys<F>(p, r, fill.key);
    if constexpr (kKeysShared) {
      for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        Key key[4];
        source.load(g, key);
        store4(keys + 4 * g, key);
      }
      __syncthreads();
      write_topk_row<F>(SharedKeys<Key>{keys}, p, r, fill, flags, scratch);
    } else {
      write_topk_row<F>(source, p, r, fill, flags, scratch);
    }
    __syncthreads();  // the next row reuses keys, flags and scratch
  }
}

// grid (min(rows, kMaxGrid)), row_threads(n) threads. Dynamic shared memory: the row's flags
// (round_up(n, 4),) bytes when smoothing.
template <class F>
__global__ void __launch_bounds__(kMaxRowThreads, kMinRowBlocks)
    relu_mask_kernel(const __grid_constant__ RowMaskParams p) {
  using Bits = typename F::Bits;
  extern __shared__ __align__(16) unsigned char smem[];
  const bool fill_positive = fill_keys<F>(p.fill_bits).positive;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowRef r = locate_row(p, row);
    const Bits* bias = static_cast<const Bits*>(p.bias) + r.bias;
    const uint8_t* mask = p.mask ? p.mask + r.mask : nullptr;
    const auto keep = [&](int g) {
      uint32_t bits = 0;
      for (int e = 0; e < 4 && 4 * g + e < p.n; ++e) {
        const int64_t j = 4 * g + e;
        const bool masked = mask && !mask[j * p.mask_sk];
        bits |= uint32_t(masked ? fill_positive : positive<F>(bias[j * p.bias_sk])) << (8 * e);
      }
      return bits;
    };
    write_row(keep, p.n, p.out + r.out, p.out_sk, p.block_size, smem);
    __syncthreads();  // the next row reuses the flags
  }
}

// ---- block_smooth, expand_mask_2d ---------------------------------------------------------------

// In-place block smoothing of a bool view: rows are its leading dims (rank < 4 padded in front
// with size-1 dims), each row's n keys fall into units_per_row smoothing blocks.
struct SmoothParams {
  uint8_t* data;
  int64_t lead[3];         // leading dims, slowest first
  int64_t lead_stride[3];  // their strides (elements)
  int64_t n, stride;       // the key dim
  int64_t block_size;
  int64_t units_per_row;  // ceil(n / block_size)
  int64_t units;          // rows * units_per_row
};

// grid-stride over smoothing blocks: one per thread, or (kByWarp) one per warp.
template <bool kByWarp>
__global__ void block_smooth_kernel(const __grid_constant__ SmoothParams p) {
  constexpr int kLanes = kByWarp ? 32 : 1;  // threads per smoothing block
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int64_t step = int64_t(gridDim.x) * blockDim.x / kLanes;
  for (int64_t u = first; u < p.units; u += step) {  // uniform across a warp when kByWarp
    const int64_t row = u / p.units_per_row, start = (u % p.units_per_row) * p.block_size;
    const int64_t c = row % p.lead[2], ab = row / p.lead[2];
    const int64_t b = ab % p.lead[1], a = ab / p.lead[1];
    uint8_t* data = p.data + a * p.lead_stride[0] + b * p.lead_stride[1] + c * p.lead_stride[2];
    const int64_t len = std::min(p.block_size, p.n - start);
    if constexpr (kByWarp) {
      smooth_block_by_warp(data, p.stride, data, p.stride, start, len);
    } else {
      smooth_block_by_thread(data, p.stride, data, p.stride, start, len);
    }
  }
}

// out (B, 1, 1, pad + width): True on keys [0, pad), then the 2-D mask's row.
__global__ void expand_mask_2d_kernel(const uint8_t* src, int64_t src_stride_b,
                                      int64_t src_stride_j, int64_t width, int64_t pad,
                                      uint8_t* out, int64_t out_stride_b, int64_t out_stride_j,
                                      int64_t batch) {
  const int64_t key_len = pad + width, total = batch * key_len;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / key_len, j = i % key_len;
    out[b * out_stride_b + j * out_stride_j] =
        j < pad ? 1 : src[b * src_stride_b + (j - pad) * src_stride_j] != 0;
  }
}

// ---- select_blocks ------------------------------------------------------------------------------

struct BlockScoreParams {
  const void* bias;        // attn_bias at (0, 0, 0, 0), (Bb, Hb, 1 | Sq, Sk)
  int64_t bias_stride[4];  // elements
  int64_t heads;           // Hb
  int64_t score_rows;      // m_blocks when query_rows, else 1
  int64_t n_blocks;
  int64_t units;  // Bb * Hb * score_rows * n_blocks
  int64_t seqlen_q, seqlen_k;
  int block_m, block_n;
  bool query_rows;  // the bias has a query dim (Sq rows), else one row for every query block
  bool mean;        // BlockReduce::kMean, else kMax
  uint64_t* keys;   // (Bb, Hb, score_rows, n_blocks), written: order keys of the block scores
};

// grid-stride, one thread per block score: the reduction runs sequentially in the CPU's order
// (rows outer, keys inner) in fp64, so a mean is bitwise the CPU's. NaN entries count as -inf, a
// NaN score becomes -inf, and -0.0 becomes +0.0 (the CPU compares scores, where they are equal).
template <class F>
__global__ void block_scores_kernel(const __grid_constant__ BlockScoreParams p) {
  using Bits = typename F::Bits;
  for (int64_t unit = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; unit < p.units;
       unit += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = unit % p.n_blocks, rest = unit / p.n_blocks;
    const int64_t m = rest % p.score_rows, bh = rest / p.score_rows;
    const int64_t h = bh % p.heads, b = bh / p.heads;
    const int64_t r0 = p.query_rows ? m * p.block_m : 0;
    const int64_t r1 = p.query_rows ? std::min(p.seqlen_q, r0 + p.block_m) : 1;
    const int64_t c0 = n * p.block_n, c1 = std::min(p.seqlen_k, c0 + p.block_n);
    const Bits* bias =
        static_cast<const Bits*>(p.bias) + b * p.bias_stride[0] + h * p.bias_stride[1];
    double acc = p.mean ? 0.0 : -INFINITY;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = c0; j < c1; ++j) {
        double x = to_double<F>(bias[r * p.bias_stride[2] + j * p.bias_stride[3]]);
        if (isnan(x)) x = -INFINITY;
        acc = p.mean ? acc + x : (acc < x ? x : acc);  // std::max(acc, x)
      }
    }
    double score = p.mean ? acc / double((r1 - r0) * (c1 - c0)) : acc;
    if (isnan(score)) score = -INFINITY;  // +inf + -inf
    p.keys[unit] = order_key<Fp64>(static_cast<uint64_t>(__double_as_longlong(score + 0.0)));
  }
}

struct BlockSelectParams {
  const uint64_t* keys;  // block_scores_kernel's output
  uint8_t* out;          // (Bo, Ho, m_blocks, n_blocks) at (0, 0, 0, 0)
  int64_t out_stride[4];
  int64_t out_heads, m_blocks;
  int64_t rows;                    // Bo * Ho * m_blocks
  int64_t bias_batch, bias_heads;  // Bb, Hb (1 = broadcast)
  int64_t score_rows;
  int n_blocks;  // <= kMaxKeys
  int64_t seqlen_q, seqlen_k;
  int block_m, block_n;
  int top_k;  // in [0, n_blocks]
  bool query_rows, is_causal;
};

// grid (min(rows, kMaxGrid)), row_threads(n_blocks) threads: one CTA per (batch, head, query
// block). Candidates are the key blocks before the first causally required one; the top_k of
// them by score (ties: lower block index), scores of -inf excluded, plus the required blocks.
__global__ void __launch_bounds__(kMaxRowThreads, kMinRowBlocks)
    select_blocks_kernel(const __grid_constant__ BlockSelectParams p) {
  __shared__ SelectScratch scratch;
  const uint64_t never = order_key<Fp64>(0xfff0000000000000ull);  // the key of -inf
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t m = row % p.m_blocks, bh = row / p.m_blocks;
    const int64_t oh = bh % p.out_heads, ob = bh / p.out_heads;
    const int64_t b = p.bias_batch == 1 ? 0 : ob, h = p.bias_heads == 1 ? 0 : oh;
    const uint64_t* keys =
        p.keys + ((b * p.bias_heads + h) * p.score_rows + (p.query_rows ? m : 0)) * p.n_blocks;
    const int64_t r0 = m * p.block_m, r1 = std::min(p.seqlen_q, r0 + p.block_m);
    int candidates = p.n_blocks, last_required = -1;
    bool empty = false;  // every row of the block sees no key
    if (p.is_causal) {
      const int64_t offset = p.seqlen_k - p.seqlen_q;  // diagonal key of row i: i + offset
      const int64_t diag_last = r1 - 1 + offset;
      empty = diag_last < 0;
      candidates = empty ? 0 : int(std::max<int64_t>(r0 + offset, 0) / p.block_n);
      last_required = empty ? -1 : int(diag_last / p.block_n);
    }
    RowThreshold<uint64_t> t{~0ull, -1};
    if (!empty) {
      t = select_row_threshold(GlobalKeys<uint64_t>{keys, candidates}, candidates, p.top_k, never,
                               never, scratch);
    }
    uint8_t* out = p.out + ob * p.out_stride[0] + oh * p.out_stride[1] + m * p.out_stride[2];
    for (int n = threadIdx.x; n < p.n_blocks; n += blockDim.x) {
      bool keep = n <= last_required;  // a required block (n >= candidates here)
      if (n < candidates) {
        const uint64_t key = keys[n];
        keep = key != never && (key > t.key || (key == t.key && n <= t.last_tie));
      }
      out[n * p.out_stride[3]] = keep;
    }
  }
}

// ---- host: launch geometry and parameters (plain C++) -------------------------------------------

// Threads of a row CTA: about 32 keys per thread (work enough per pass to amortize its three
// barriers and the 256-bin sums), one to 16 warps. Rows of 16K keys and more take 16 warps; a
// short row a single warp, so that many short rows fill the GPU with small CTAs.
int row_threads(int64_t n) {
  const int64_t warps = (n + 32 * 32 - 1) / (32 * 32);
  return int(std::clamp<int64_t>(warps, 1, kMaxRowThreads / 32)) * 32;
}

int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

unsigned grid_for(int64_t units, int threads) {
  return unsigned(std::clamp<int64_t>((units + threads - 1) / threads, 1, kMaxGrid));
}

void check_key_length(int64_t n, const char* arg) {
  if (n > kMaxKeys) {
    throw Error(ErrorKind::kUnsupported, arg,
                "a key length of " + std::to_string(n) + " exceeds the CUDA mask utilities' " +
                    std::to_string(kMaxKeys) + " keys per row");
  }
}

// The leading dims (B, H, Sq) in launch order, slowest first. Consecutive CTAs take consecutive
// rows, so the dim along which the largest input is broadcast goes innermost: the CTAs that share
// its rows then run together and read them from L2. (E.g. a (1, 1, Sq, Sk) causal mask with a
// (1, H, 1, Sk) bias: heads innermost, each mask row read from memory once instead of H times.)
std::array<int, 3> row_order(const DynamicMaskLayout& g, bool has_mask, size_t bias_bytes) {
  const auto footprint = [&](const std::array<int64_t, 4>& stride) {
    double elements = 1;
    for (size_t d = 0; d < 4; ++d) elements *= stride[d] == 0 ? 1.0 : double(g.shape[d]);
    return elements;
  };
  const double bias_size = footprint(g.bias_stride) * double(bias_bytes);
  const double mask_size = has_mask ? footprint(g.mask_stride) : 0.0;
  std::array<double, 3> shared{};  // bytes of input that the rows along each dim share
  for (size_t d = 0; d < 3; ++d) {
    if (g.shape[d] == 1) continue;
    if (g.bias_stride[d] == 0) shared[d] += bias_size;
    if (has_mask && g.mask_stride[d] == 0) shared[d] += mask_size;
  }
  std::array<int, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return shared[size_t(x)] < shared[size_t(y)]; });
  return order;
}

RowMaskParams row_mask_params(const DynamicMaskArgs& a, const DynamicMaskLayout& g) {
  RowMaskParams p{};
  const bool has_mask = a.attn_mask.has_value();
  p.bias = a.attn_bias.data;
  p.mask = has_mask ? static_cast<const uint8_t*>(a.attn_mask->data) : nullptr;
  p.out = static_cast<uint8_t*>(a.out.data);
  const std::array<int, 3> order = row_order(g, has_mask, dtype_size(a.attn_bias.dtype));
  for (int i = 0; i < 3; ++i) {
    const size_t d = size_t(order[size_t(i)]);
    p.lead[i] = g.shape[d];
    p.bias_lead[i] = g.bias_stride[d];
    p.mask_lead[i] = g.mask_stride[d];
    p.out_lead[i] = a.out.stride[d];
  }
  p.bias_sk = g.bias_stride[3];
  p.mask_sk = g.mask_stride[3];
  p.out_sk = a.out.stride[3];
  p.rows = g.shape[0] * g.shape[1] * g.shape[2];
  p.n = int(g.shape[3]);
  p.k = int(g.window);
  p.block_size = int(std::min(a.block_size, g.shape[3]));  // a longer block is one block
  p.fill_bits = g.fill_bits;
  return p;
}

// A bool view of rank 1..4 (key dim last) as rows of smoothing blocks.
SmoothParams smooth_params(const TensorView& mask, int64_t block_size) {
  SmoothParams p{};
  p.data = static_cast<uint8_t*>(mask.data);
  const int lead_dims = mask.rank - 1;
  for (int i = 0; i < 3; ++i) {
    const int d = i - (3 - lead_dims);  // the view's dim in slot i; < 0: a padding dim
    p.lead[i] = d < 0 ? 1 : mask.shape[size_t(d)];
    p.lead_stride[i] = d < 0 ? 0 : mask.stride[size_t(d)];
  }
  p.n = mask.shape[size_t(lead_dims)];
  p.stride = mask.stride[size_t(lead_dims)];
  p.block_size = std::min(block_size, p.n);
  p.units_per_row = (p.n + p.block_size - 1) / p.block_size;
  p.units = p.lead[0] * p.lead[1] * p.lead[2] * p.units_per_row;
  return p;
}

// The block scores of a select_blocks() call, into `keys` (s.units of them).
BlockScoreParams block_score_params(const BlockSelectArgs& a, uint64_t* keys) {
  const TensorView& bias = a.attn_bias;
  BlockScoreParams s{};
  s.bias = bias.data;
  for (size_t d = 0; d < 4; ++d) s.bias_stride[d] = bias.stride[d];
  s.heads = bias.shape[1];
  s.query_rows = bias.shape[2] != 1;
  s.n_blocks = (bias.shape[3] + a.block_n - 1) / a.block_n;
  s.score_rows = s.query_rows ? (a.seqlen_q + a.block_m - 1) / a.block_m : 1;
  s.units = bias.shape[0] * bias.shape[1] * s.score_rows * s.n_blocks;
  s.seqlen_q = a.seqlen_q;
  s.seqlen_k = bias.shape[3];
  s.block_m = a.block_m;
  s.block_n = a.block_n;
  s.mean = a.reduce == BlockReduce::kMean;
  s.keys = keys;
  return s;
}

// The selection of a select_blocks() call from the scores `s` has computed.
BlockSelectParams block_select_params(const BlockSelectArgs& a, const BlockScoreParams& s) {
  BlockSelectParams p{};
  p.keys = s.keys;
  p.out = static_cast<uint8_t*>(a.out.data);
  for (size_t d = 0; d < 4; ++d) p.out_stride[d] = a.out.stride[d];
  p.out_heads = a.out.shape[1];
  p.m_blocks = a.out.shape[2];
  p.rows = a.out.shape[0] * a.out.shape[1] * a.out.shape[2];
  p.bias_batch = a.attn_bias.shape[0];
  p.bias_heads = a.attn_bias.shape[1];
  p.score_rows = s.score_rows;
  p.n_blocks = int(s.n_blocks);
  p.seqlen_q = a.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.block_m = a.block_m;
  p.block_n = a.block_n;
  p.top_k = int(std::min(a.top_k, s.n_blocks));
  p.query_rows = s.query_rows;
  p.is_causal = a.is_causal;
  return p;
}

// ---- host: launches -----------------------------------------------------------------------------

// The dynamic shared memory `kernel` may use on the current device: the opt-in limit less its
// static shared memory, raised once per (kernel, device) so that every launch may ask for it.
size_t dynamic_smem_limit(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> limits;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = limits.find({kernel, device});
  if (found != limits.end()) return found->second;
  int optin = 0;
  FSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};
  FSA_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const size_t limit = size_t(optin) - attributes.sharedSizeBytes;
  FSA_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
  limits.emplace(std::make_pair(kernel, device), limit);
  return limit;
}

void check_launch() { FSA_CUDA_CHECK(cudaGetLastError()); }

template <class Kernel>
void launch_rows(Kernel kernel, const RowMaskParams& p, size_t smem, cudaStream_t stream) {
  kernel<<<unsigned(std::min(p.rows, kMaxGrid)), row_threads(p.n), smem, stream>>>(p);
  check_launch();
}

// Runs the row kernel that fits; returns whether it smoothed the rows (p.block_size > 1 only).
template <class F>
bool launch_dynamic_mask(MaskKind kind, RowMaskParams p, int device, cudaStream_t stream) {
  using Key = typename F::Bits;
  const size_t flag_bytes = size_t(round_up4(p.n));
  const bool smooth = p.block_size > 1;
  if (kind == MaskKind::kReLU) {
    const auto kernel = relu_mask_kernel<F>;
    const bool fused =
        smooth && flag_bytes <= dynamic_smem_limit(reinterpret_cast<const void*>(kernel), device);
    if (!fused) p.block_size = 1;
    launch_rows(kernel, p, fused ? flag_bytes : 0, stream);
    return fused;
  }
  const size_t key_bytes = flag_bytes * sizeof(Key);
  const auto shared_keys = topk_mask_kernel<F, true>;
  const size_t limit = dynamic_smem_limit(reinterpret_cast<const void*>(shared_keys), device);
  if (key_bytes <= limit) {
    const bool fused = smooth && key_bytes + flag_bytes <= limit;
    if (!fused) p.block_size = 1;
    launch_rows(shared_keys, p, key_bytes + (fused ? flag_bytes : 0), stream);
    return fused;
  }
  const auto global_keys = topk_mask_kernel<F, false>;
  const bool fused =
      smooth &&
      flag_bytes <= dynamic_smem_limit(reinterpret_cast<const void*>(global_keys), device);
  if (!fused) p.block_size = 1;
  launch_rows(global_keys, p, fused ? flag_bytes : 0, stream);
  return fused;
}

void launch_block_smooth(const TensorView& mask, int64_t block_size, cudaStream_t stream) {
  const SmoothParams p = smooth_params(mask, block_size);
  constexpr int kThreads = 256;
  if (p.block_size <= kThreadSmoothMax) {
    block_smooth_kernel<false><<<grid_for(p.units, kThreads), kThreads, 0, stream>>>(p);
  } else {
    block_smooth_kernel<true><<<grid_for(p.units * 32, kThreads), kThreads, 0, stream>>>(p);
  }
  check_launch();
}

template <class F>
void launch_select_blocks(const BlockSelectArgs& a, cudaStream_t stream) {
  BlockScoreParams s = block_score_params(a, nullptr);
  StreamBuffer keys(stream);
  FSA_CUDA_CHECK(scratch_malloc(&keys.ptr, std::max<size_t>(size_t(s.units) * sizeof(uint64_t), 1),
                                stream));
  s.keys = static_cast<uint64_t*>(keys.ptr);
  constexpr int kScoreThreads = 128;
  block_scores_kernel<F><<<grid_for(s.units, kScoreThreads), kScoreThreads, 0, stream>>>(s);
  check_launch();
  const BlockSelectParams p = block_select_params(a, s);
  select_blocks_kernel<<<unsigned(std::min(p.rows, kMaxGrid)), row_threads(p.n_blocks), 0,
                         stream>>>(p);
  check_launch();
}

}  // namespace

// ---- entry points (mask_backend.h) --------------------------------------------------------------

void dynamic_mask(const DynamicMaskArgs& args, const DynamicMaskLayout& layout) {
  check_key_length(layout.shape[3], "attention_bias");
  const CurrentDevice scope(args.attn_bias.device.index);
  const auto stream = static_cast<cudaStream_t>(args.stream);
  const int device = args.attn_bias.device.index;
  const RowMaskParams p = row_mask_params(args, layout);
  bool smoothed = false;
  switch (args.attn_bias.dtype) {
    case DType::kBFloat16:
      smoothed = launch_dynamic_mask<Bf16>(args.kind, p, device, stream);
      break;
    case DType::kFloat16:
      smoothed = launch_dynamic_mask<Fp16>(args.kind, p, device, stream);
      break;
    case DType::kFloat32:
      smoothed = launch_dynamic_mask<Fp32>(args.kind, p, device, stream);
      break;
    case DType::kFloat64:
      smoothed = launch_dynamic_mask<Fp64>(args.kind, p, device, stream);
      break;
    case DType::kBool:
      break;  // rejected by the validation
  }
  // Rows too long for their flags in shared memory are smoothed in place by a second kernel.
  if (p.block_size > 1 && !smoothed) launch_block_smooth(args.out, p.block_size, stream);
}

void block_smooth(const TensorView& mask, int64_t block_size, void* stream) {
  const CurrentDevice scope(mask.device.index);
  launch_block_smooth(mask, block_size, static_cast<cudaStream_t>(stream));
}

void expand_mask_2d(const TensorView& mask_2d, int64_t pad, const TensorView& out, void* stream) {
  const CurrentDevice scope(mask_2d.device.index);
  const int64_t batch = out.shape[0], width = mask_2d.shape[1];
  constexpr int kThreads = 256;
  expand_mask_2d_kernel<<<grid_for(batch * (pad + width), kThreads), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(mask_2d.data), mask_2d.stride[0], mask_2d.stride[1], width, pad,
      static_cast<uint8_t*>(out.data), out.stride[0], out.stride[3], batch);
  check_launch();
}

void select_blocks(const BlockSelectArgs& args) {
  const int64_t n_blocks = (args.attn_bias.shape[3] + args.block_n - 1) / args.block_n;
  check_key_length(n_blocks, "attention_bias");
  const CurrentDevice scope(args.attn_bias.device.index);
  const auto stream = static_cast<cudaStream_t>(args.stream);
  switch (args.attn_bias.dtype) {
    case DType::kBFloat16:
      launch_select_blocks<Bf16>(args, stream);
      break;
    case DType::kFloat16:
      launch_select_blocks<Fp16>(args, stream);
      break;
    case DType::kFloat32:
      launch_select_blocks<Fp32>(args, stream);
      break;
    case DType::kFloat64:
      launch_select_blocks<Fp64>(args, stream);
      break;
    case DType::kBool:
      break;  // rejected by the validation
  }
}

}  // namespace fsa::detail::cuda
