// Compacted keys on the device (core/compaction.h): the key lists of a key-only mask, every row's
// bound and their block map (planning), and the gathers and scatters around a compacted call.
//
// Planning, asynchronously on the plan's stream:
//   list_counts_kernel, list_keys_kernel  per (batch, mask head) and 8K-key chunk: the chunk's
//                     kept keys, then a block-wide scan after the chunks before it gives every
//                     kept key its slot (keys ascending), and every key its slot or -1
//   row_end_kernel    one thread per (list, query row): the kept keys it may see under causality
//                     are a prefix of the sorted list; a binary search gives its length
//   then the usual classify / compact / transpose kernels over the slots (plan_kernels.cuh).
// A call: gather_rows_kernel (K and V rows into slots), gather_bias_kernel, the kernels over the
// slots, and for the backward scatter_rows_kernel (dK, dV by key; unless the dK/dV split's
// reduction wrote them by key itself, BackwardParams::scatter) and scatter_dbias_kernel. No
// host synchronization anywhere: list lengths stay on the device, and the kernels walk the block
// map, which ends where the lists end.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "core/compaction.h"
#include "cuda/backward_launch.h"
#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_arch.h"
#include "cuda/device_plan.h"
#include "cuda/list_sort.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"
#include "cuda/tiles.h"
#include "cuda/topk_keys.h"

namespace fsa::detail::cuda {
namespace {

constexpr int kListThreads = 1024;
constexpr int kListItems = 8;  // consecutive keys per thread of the list kernels
constexpr int kListChunk = kListThreads * kListItems;  // keys per CTA of the list kernels

// One mask row of the key lists: row l is (l / list_heads, l % list_heads, 0, :) read through its
// strides (stride_k 0: one flag for the whole row).
struct ListMask {
  const uint8_t* mask;
  int64_t stride_b, stride_h, stride_k;
  int list_heads, seqlen_k;
  // Whether key `first + e` of list l is kept, for this thread's kListItems keys from `first`;
  // returns how many are.
  __device__ int read(int l, int first, bool (&kept)[kListItems]) const {
    const uint8_t* row = mask + (l / list_heads) * stride_b + (l % list_heads) * stride_h;
    int n = 0;
#pragma unroll
    for (int e = 0; e < kListItems; ++e) {
      kept[e] = first + e < seqlen_k && row[int64_t(first + e) * stride_k] != 0;
      n += kept[e];
    }
    return n;
  }
};

// grid (chunks = ceil(Sk / kListChunk), lists), kListThreads threads: chunk_count[l][c] = the kept
// keys of chunk c of list l.
__global__ void __launch_bounds__(kListThreads)
    list_counts_kernel(const __grid_constant__ ListMask m, int32_t* chunk_count) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  bool kept[kListItems];
  int n = m.read(blockIdx.y, int(blockIdx.x) * kListChunk + int(threadIdx.x) * kListItems, kept);
  for (int o = 16; o > 0; o /= 2) n += __shfl_xor_sync(0xffffffffu, n, o);
  if (threadIdx.x % 32 == 0 && n) atomicAdd(&total, n);
  __syncthreads();
  if (threadIdx.x == 0) chunk_count[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

// grid (chunks, lists), kListThreads threads: chunk c of list l gives each of its kept keys its
// slot (keys ascending; the chunks before it, counted by list_counts_kernel, come first) and every
// key its slot or -1. A list holds at most `slots` keys (PlanOptions::max_kept_keys: a promise;
// keys past it are dropped, never written out of bounds); the last chunk writes the count. The
// one-CTA-per-list scan this replaces took 0.03 ms for one list of 32K keys (H200).
__global__ void __launch_bounds__(kListThreads)
    list_keys_kernel(const __grid_constant__ ListMask m, const int32_t* chunk_count, int slots,
                     int32_t* keys, int32_t* count, int32_t* slot) {
  constexpr int kWarps = kListThreads / 32;
  __shared__ int warp_offset[kWarps];
  __shared__ int chunk_base;  // kept keys of the list's chunks before this one
  const int l = blockIdx.y, c = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t* list = keys + int64_t(l) * slots;
  int32_t* slot_of = slot + int64_t(l) * m.seqlen_k;
  if (warp == 0) {
    int before = 0;
    for (int x = lane; x < c; x += 32) before += chunk_count[int64_t(l) * gridDim.x + x];
    for (int o = 16; o > 0; o /= 2) before += __shfl_xor_sync(0xffffffffu, before, o);
    if (lane == 0) chunk_base = before;
  }
  const int first = c * kListChunk + int(threadIdx.x) * kListItems;  // this thread's keys
  bool kept[kListItems];
  const int n = m.read(l, first, kept);
  // Exclusive prefix of n over the CTA: within the warp, then over the warps' totals.
  int inclusive = n;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  if (lane == 31) warp_offset[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int own = warp_offset[lane];  // kWarps == 32
    int sum = own;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, sum, o);
      if (lane >= o) sum += v;
    }
    warp_offset[lane] = sum - own;
  }
  __syncthreads();
  int at = chunk_base + warp_offset[warp] + inclusive - n;
#pragma unroll
  for (int e = 0; e < kListItems; ++e) {
    if (first + e >= m.seqlen_k) break;
    const bool listed = kept[e] && at < slots;
    if (listed) list[at] = first + e;
    slot_of[first + e] = listed ? at : -1;
    at += kept[e];
  }
  if (c == int(gridDim.x) - 1 && threadIdx.x == kListThreads - 1) count[l] = min(at, slots);
}
static_assert(kListThreads == 32 * 32, "the warp totals are scanned by one warp");

// grid (ceil(lists * Sq / 256)), 256 threads: row_end[l][i] = kept keys of list l before row i's
// causal end (bottom-right aligned), i.e. the slots [0, row_end) the row sees.
__global__ void row_end_kernel(const int32_t* keys, const int32_t* count, int64_t lists,
                               int seqlen_q, int seqlen_k, int slots, bool is_causal,
                               int32_t* row_end) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= lists * seqlen_q) return;
  const int64_t l = idx / seqlen_q;
  const int i = int(idx % seqlen_q);
  const int end = is_causal ? min(max(i + seqlen_k - seqlen_q + 1, 0), seqlen_k) : seqlen_k;
  const int32_t* list = keys + l * slots;
  int lo = 0, hi = count[l];  // the first slot whose key is >= end
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (list[mid] < end) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  row_end[idx] = lo;
}

// Slots a kernel may read: whole slot tiles up to a list's end (rows past it are zeroed, so a
// tile's unused slots hold no stale NaN for the tensor cores to multiply by P = 0).
__device__ inline int slots_read(int count, int slots) {
  constexpr int kTile = forward_block_n(128);
  static_assert(forward_block_n(64) == kTile && forward_block_n(256) == kTile, "one slot tile");
  return min((count + kTile - 1) / kTile * kTile, slots);
}

struct GatherParams {
  const void* k;  // (B, Sk, Hk, D), 16-bit
  const void* v;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  PagedRows paged;  // a paged cache's table (K and V share it), or none
  void* k_out;  // (B, slots, kv_heads, D) contiguous
  void* v_out;
  const int32_t* keys;
  const int32_t* count;
  CompactGeometry g;
  int head_dim;
  bool bf16;             // else fp16
  int32_t* v_nonfinite;  // set to 1 when a gathered V value is NaN / Inf; or null
};

// Whether a 16-bit value (bf16 or fp16 bits) is NaN or Inf: its exponent is all ones.
__device__ inline bool half_bits_nonfinite(uint32_t bits, bool bf16) {
  const uint32_t exponent = bf16 ? 0x7f80u : 0x7c00u;
  return (bits & exponent) == exponent;
}

// grid (x, kv_heads, B): slot rows of one gathered kv head, kChunk elements per thread (8: one
// 16-byte copy when every row is 16-byte aligned; else 1). Also flags a non-finite V value, so that
// the forward's partial tiles need not check their V tiles (ForwardParams::v_nonfinite).
template <int kChunk>
__global__ void gather_rows_kernel(const __grid_constant__ GatherParams p) {
  using Chunk = std::conditional_t<kChunk == 8, uint4, uint16_t>;
  const int hc = blockIdx.y, b = blockIdx.z;
  const int64_t l = p.g.list_of_kv(b, hc), hk = p.g.source_kv_head(hc);
  const int slots = int(p.g.slots), n = p.count[l];
  const int chunks = p.head_dim / kChunk;
  const int64_t total = int64_t(slots_read(n, slots)) * chunks;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int w = int(idx / chunks), c = int(idx % chunks) * kChunk;
    const int64_t dst = ((b * p.g.slots + w) * p.g.kv_heads + hc) * p.head_dim + c;
    Chunk kc{}, vc{};
    if (w < n) {
      const int64_t key = p.keys[l * slots + w];
      kc = *reinterpret_cast<const Chunk*>(static_cast<const uint16_t*>(p.k) +
                                           p.paged.offset(b, key, p.k_stride_b, p.k_stride_s) +
                                           hk * p.k_stride_h + c);
      vc = *reinterpret_cast<const Chunk*>(static_cast<const uint16_t*>(p.v) +
                                           p.paged.offset(b, key, p.v_stride_b, p.v_stride_s) +
                                           hk * p.v_stride_h + c);
      if (p.v_nonfinite != nullptr) {
        bool bad = false;
        if constexpr (kChunk == 8) {
          const uint32_t words[4] = {vc.x, vc.y, vc.z, vc.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) bad |= half_bits_nonfinite(words[e / 2] >> (16 * (e % 2)), p.bf16);
        } else {
          bad = half_bits_nonfinite(vc, p.bf16);
        }
        if (bad) atomicOr(p.v_nonfinite, 1);
      }
    }
    *reinterpret_cast<Chunk*>(static_cast<uint16_t*>(p.k_out) + dst) = kc;
    *reinterpret_cast<Chunk*>(static_cast<uint16_t*>(p.v_out) + dst) = vc;
  }
}

struct BiasGatherParams {
  const void* bias;   // the caller's, read through its broadcast strides
  bool bias_is_fp32;  // else 16-bit: bf16 or fp16 as the problem's dtype
  bool bf16;
  int64_t read_stride[4];
  int64_t head_group;  // query heads per head of the caller's bias
  float* out;          // (bias_batch, bias_heads, slots)
  const int32_t* keys;
  const int32_t* count;
  CompactGeometry g;
};

__device__ inline float load_bias(const BiasGatherParams& p, int64_t offset) {
  if (p.bias_is_fp32) return static_cast<const float*>(p.bias)[offset];
  const uint16_t bits = static_cast<const uint16_t*>(p.bias)[offset];
  if (p.bf16) return __uint_as_float(uint32_t(bits) << 16);
  return __half2float(__ushort_as_half(bits));
}

// grid (ceil(Sk / 256), bias_heads, bias_batch), 256 threads.
__global__ void gather_bias_kernel(const __grid_constant__ BiasGatherParams p) {
  const int hx = blockIdx.y, bx = blockIdx.z;
  const int64_t l = p.g.list_of_bias(bx, hx), hq = p.g.query_head_of_bias(hx);
  const int slots = int(p.g.slots), n = p.count[l];
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  if (w >= slots_read(n, slots)) return;
  float value = 0.0f;
  if (w < n) {
    const int64_t key = p.keys[l * slots + w];
    value = load_bias(
        p, bx * p.read_stride[0] + (hq / p.head_group) * p.read_stride[1] + key * p.read_stride[3]);
  }
  p.out[(int64_t(bx) * p.g.bias_heads + hx) * slots + w] = value;
}

struct ScatterParams {
  const void* src[2];  // dK, dV slots: (B, slots, kv_heads, D) contiguous, 16-bit
  void* dst[2];        // dK, dV (B, Sk, Hk, D), the caller's strides
  int64_t stride_b[2], stride_s[2], stride_h[2];
  const int32_t* slot;
  CompactGeometry g;
  int head_dim;
  bool bf16;
};

__device__ inline float half_bits_to_float(uint16_t bits, bool bf16) {
  return bf16 ? __uint_as_float(uint32_t(bits) << 16) : __half2float(__ushort_as_half(bits));
}
__device__ inline uint16_t float_to_half_bits(float x, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x));
}

// grid (ceil(Sk * D / kElems / 256), Hk, B), kElems consecutive elements of one row of dK and the
// same of dV per thread (8: one 16-byte load per gathered head and one store, when D, the strides
// and the pointers allow; else 1): key j of kv head hk sums, over the gathered heads that copy hk
// (one, or a query group's), its slot's gradient; 0 for a dropped key. Each element is written
// once: no atomics, the same order every run. dK and dV in one launch share the slot lookups.
template <int kElems>
__global__ void scatter_rows_kernel(const __grid_constant__ ScatterParams p) {
  const int hk = blockIdx.y, b = blockIdx.z;
  const int chunks = p.head_dim / kElems;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.g.seqlen_k * chunks) return;
  const int64_t j = idx / chunks;
  const int d = int(idx - j * chunks) * kElems;
  const int64_t per = p.g.kv_heads / p.g.num_kv_heads;
  float sum[2][kElems] = {};
  for (int64_t hc = hk * per; hc < (hk + 1) * per; ++hc) {
    const int32_t s = p.slot[p.g.list_of_kv(b, hc) * p.g.seqlen_k + j];
    if (s < 0) continue;
    const int64_t offset = ((b * p.g.slots + s) * p.g.kv_heads + hc) * p.head_dim + d;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const auto* src = static_cast<const uint16_t*>(p.src[t]) + offset;
      if constexpr (kElems == 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sum[t][e] += half_bits_to_float(uint16_t(words[e / 2] >> (16 * (e % 2))), p.bf16);
        }
      } else {
        sum[t][0] += half_bits_to_float(src[0], p.bf16);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    auto* dst = static_cast<uint16_t*>(p.dst[t]) + b * p.stride_b[t] + j * p.stride_s[t] +
                hk * p.stride_h[t] + d;
    if constexpr (kElems == 8) {
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        words[w] = uint32_t(float_to_half_bits(sum[t][2 * w], p.bf16)) |
                   uint32_t(float_to_half_bits(sum[t][2 * w + 1], p.bf16)) << 16;
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
      dst[0] = float_to_half_bits(sum[t][0], p.bf16);
    }
  }
}

struct DbiasScatterParams {
  const float* src;  // (bias_batch, bias_heads, slots), the compacted call's fp32 gradient
  void* dbias;       // the caller's: (Bb, Hb, 1, Sk | 1), its strides and dtype
  int64_t stride[4];
  int shape[4];
  int dtype;  // 0 fp32, 1 bf16, 2 fp16
  const int32_t* slot;
  const int32_t* count;
  CompactGeometry g;
};

// grid (ceil(Skb / 256), Hb, Bb): each element of the caller's dbias sums the gathered rows that
// share it, at its key's slot (or over every kept slot for a key dim of 1), in a fixed order.
__global__ void scatter_dbias_kernel(const __grid_constant__ DbiasScatterParams p) {
  const int h = blockIdx.y, b = blockIdx.z;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.shape[3]) return;
  const int64_t sk = p.g.seqlen_k;
  float sum = 0.0f;
  for (int64_t bx = 0; bx < p.g.bias_batch; ++bx) {
    if (p.shape[0] != 1 && bx != b) continue;
    for (int64_t hx = 0; hx < p.g.bias_heads; ++hx) {
      if (hx / (p.g.bias_heads / p.shape[1]) != h) continue;
      const int64_t l = p.g.list_of_bias(bx, hx);
      const float* row = p.src + (bx * p.g.bias_heads + hx) * p.g.slots;
      if (p.shape[3] == sk) {
        const int32_t s = p.slot[l * sk + j];
        if (s >= 0) sum += row[s];
      } else {
        for (int w = 0; w < p.count[l]; ++w) sum += row[w];
      }
    }
  }
  const int64_t at = b * p.stride[0] + h * p.stride[1] + j * p.stride[3];
  if (p.dtype == 0) {
    static_cast<float*>(p.dbias)[at] = sum;
  } else {
    static_cast<uint16_t*>(p.dbias)[at] = float_to_half_bits(sum, p.dtype == 1);
  }
}

// Per-row top-k over compacted keys: the thresholds' lists, their keys and the thresholds.
struct TopkListParams {
  TopkKeys keys;
  RowTopK t;
  bool is_causal;
};

// grid (ceil(Sk / 256), lists): kept[l][j] = whether some row of list l keeps key j. A row's
// candidates are the allowed keys of its causal prefix, a set that only grows down the rows, so
// its top-k threshold only tightens (core/row_topk.h): the first row that sees j is the loosest.
__global__ void kept_by_some_row_kernel(const __grid_constant__ TopkListParams p, uint8_t* kept) {
  const TopkKeys& keys = p.keys;
  const int l = blockIdx.y;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= keys.seqlen_k) return;
  // Row i sees keys j <= i + Sk - Sq (bottom-right causality).
  const int first = p.is_causal ? max(j - (keys.seqlen_k - keys.seqlen_q), 0) : 0;
  bool keep = first < keys.seqlen_q && keys.allowed(l, j);
  if (keep) {
    keep = p.t.keeps(keys.value(l, j), j,
                     p.t.at(l / keys.list_heads, (l % keys.list_heads) * keys.head_group, first));
  }
  kept[int64_t(l) * keys.seqlen_k + j] = keep;
}

// grid (ceil(slots / 256), lists): key_last[l][s] = the last row that keeps slot s's key (-1 past
// the list's count). The rows keeping a listed key run from the first that sees it (which keeps
// it: kept_by_some_row_kernel) while the threshold still admits it: a binary search.
__global__ void key_last_kernel(const __grid_constant__ TopkListParams p, const int32_t* keys,
                                const int32_t* count, int slots, int32_t* key_last,
                                int32_t* key_first) {
  const int l = blockIdx.y;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= key_last_stride(slots)) return;
  const int sq = p.keys.seqlen_q, sk = p.keys.seqlen_k;
  int32_t last = -1, first = sq;
  if (s < count[l]) {
    const int j = keys[int64_t(l) * slots + s];
    const int b = l / p.keys.list_heads;
    const int64_t hq = int64_t(l % p.keys.list_heads) * p.keys.head_group;
    const float value = p.keys.value(l, j);
    first = p.is_causal ? max(j - (sk - sq), 0) : 0;  // < Sq: a listed key is kept by some row
    int lo = first, hi = sq - 1;
    while (lo < hi) {  // keeps(lo) holds; the last row where it does
      const int mid = (lo + hi + 1) / 2;
      if (p.t.keeps(value, j, p.t.at(b, hq, mid))) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    last = lo;
  }
  key_last[int64_t(l) * key_last_stride(slots) + s] = last;
  key_first[int64_t(l) * key_last_stride(slots) + s] = first;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid x for a grid-stride loop over `total` items of 256 threads: enough CTAs to fill the GPU.
unsigned stride_grid(int64_t total) {
  return unsigned(std::clamp<int64_t>(ceil_div(total, 256), 1, 1024));
}

bool rows_aligned16(const SeqOperand& op, int64_t head_dim) {
  return head_dim % 8 == 0 && reinterpret_cast<uintptr_t>(op.data) % 16 == 0 &&
         op.stride_b % 8 == 0 && op.stride_s % 8 == 0 && op.stride_h % 8 == 0;
}

// Gathers K, V and the bias of `p` by the lists into `k`, `v` (B, Sk, kv_heads, D) and `bias`.
void gather(const Problem& p, const CompactGeometry& g, const KeyCompaction& c, void* k, void* v,
            float* bias, int32_t* v_nonfinite, cudaStream_t stream) {
  GatherParams gp{};
  gp.k = p.k.data, gp.v = p.v.data;
  gp.k_stride_b = p.k.stride_b, gp.k_stride_s = p.k.stride_s, gp.k_stride_h = p.k.stride_h;
  gp.v_stride_b = p.v.stride_b, gp.v_stride_s = p.v.stride_s, gp.v_stride_h = p.v.stride_h;
  gp.paged = paged_rows(p.k);
  gp.k_out = k, gp.v_out = v;
  gp.keys = c.keys, gp.count = c.count;
  gp.g = g;
  gp.head_dim = int(p.head_dim);
  gp.bf16 = p.dtype == DType::kBFloat16;
  gp.v_nonfinite = v_nonfinite;
  const bool wide = rows_aligned16(p.k, p.head_dim) && rows_aligned16(p.v, p.head_dim);
  const int64_t chunks = g.slots * (wide ? p.head_dim / 8 : p.head_dim);
  const dim3 grid(stride_grid(chunks), unsigned(g.kv_heads), unsigned(g.batch));
  if (wide) {
    gather_rows_kernel<8><<<grid, 256, 0, stream>>>(gp);
  } else {
    gather_rows_kernel<1><<<grid, 256, 0, stream>>>(gp);
  }
  FSA_CUDA_CHECK(cudaGetLastError());
  if (!p.bias) return;
  BiasGatherParams bp{};
  bp.bias = p.bias->data;
  bp.bias_is_fp32 = p.bias->dtype == DType::kFloat32;
  bp.bf16 = p.bias->dtype == DType::kBFloat16;
  for (int d = 0; d < 4; ++d) bp.read_stride[d] = p.bias->read_stride[d];
  bp.head_group = p.bias->head_group;
  bp.out = bias;
  bp.keys = c.keys, bp.count = c.count;
  bp.g = g;
  gather_bias_kernel<<<dim3(unsigned(ceil_div(g.slots, 256)), unsigned(g.bias_heads),
                            unsigned(g.bias_batch)),
                       256, 0, stream>>>(bp);
  FSA_CUDA_CHECK(cudaGetLastError());
}

// dK and dV from their slots (scatter_rows_kernel), in one launch.
void scatter_rows(const CompactGeometry& g, const KeyCompaction& c, const void* dk_slots,
                  const void* dv_slots, const SeqOperand& dk, const SeqOperand& dv,
                  int64_t head_dim, bool bf16, cudaStream_t stream) {
  if (g.seqlen_k == 0) return;
  ScatterParams sp{};
  sp.src[0] = dk_slots, sp.src[1] = dv_slots;
  bool vec = head_dim % 8 == 0;
  const SeqOperand* dst[2] = {&dk, &dv};
  for (int t = 0; t < 2; ++t) {
    sp.dst[t] = dst[t]->data;
    sp.stride_b[t] = dst[t]->stride_b, sp.stride_s[t] = dst[t]->stride_s;
    sp.stride_h[t] = dst[t]->stride_h;
    // 16-byte rows chunks when D, the caller's strides and pointer allow (the slots' rows are
    // contiguous and start 16-byte aligned when D is a multiple of 8).
    vec = vec && reinterpret_cast<uintptr_t>(dst[t]->data) % 16 == 0 &&
          dst[t]->stride_b % 8 == 0 && dst[t]->stride_s % 8 == 0 && dst[t]->stride_h % 8 == 0;
  }
  sp.slot = c.slot;
  sp.g = g;
  sp.head_dim = int(head_dim);
  sp.bf16 = bf16;
  const int64_t elems = vec ? 8 : 1;
  const dim3 grid(unsigned(ceil_div(g.seqlen_k * head_dim / elems, 256)),
                  unsigned(g.num_kv_heads), unsigned(g.batch));
  if (vec) {
    scatter_rows_kernel<8><<<grid, 256, 0, stream>>>(sp);
  } else {
    scatter_rows_kernel<1><<<grid, 256, 0, stream>>>(sp);
  }
  FSA_CUDA_CHECK(cudaGetLastError());
}

void scatter_dbias(const CompactGeometry& g, const KeyCompaction& c, const float* src,
                   const BroadcastOperand& dbias, cudaStream_t stream) {
  DbiasScatterParams dp{};
  dp.src = src;
  dp.dbias = dbias.data;
  for (int d = 0; d < 4; ++d) {
    dp.stride[d] = dbias.stride[d];
    dp.shape[d] = int(dbias.shape[d]);
  }
  dp.dtype = dbias.dtype == DType::kFloat32 ? 0 : dbias.dtype == DType::kBFloat16 ? 1 : 2;
  dp.slot = c.slot, dp.count = c.count;
  dp.g = g;
  if (dbias.shape[0] * dbias.shape[1] * dbias.shape[3] == 0) return;
  scatter_dbias_kernel<<<dim3(unsigned(ceil_div(dbias.shape[3], 256)), unsigned(dbias.shape[1]),
                              unsigned(dbias.shape[0])),
                         256, 0, stream>>>(dp);
  FSA_CUDA_CHECK(cudaGetLastError());
}

// One allocation for a call's gathered operands: K, V (and dK, dV) rows, then fp32 bias rows.
struct CompactBuffers {
  StreamBuffer memory;
  void *k = nullptr, *v = nullptr, *dk = nullptr, *dv = nullptr;
  float *bias = nullptr, *dbias = nullptr;
  int32_t* v_nonfinite = nullptr;  // zeroed; the V gather's flag
  CompactBuffers(const Problem& p, const CompactGeometry& g, bool grads, bool dbias_wanted,
                 cudaStream_t stream)
      : memory(stream) {
    const size_t rows = size_t(g.batch * g.slots * g.kv_heads * p.head_dim) * 2;
    const size_t bias_bytes = size_t(g.bias_batch * g.bias_heads * g.slots) * sizeof(float);
    const size_t row_bytes = (rows + 255) / 256 * 256;
    const size_t flag_at = row_bytes * (grads ? 4 : 2);
    const size_t total = flag_at + 256 + bias_bytes * (dbias_wanted ? 2 : 1);
    FSA_CUDA_CHECK(scratch_malloc(&memory.ptr, total, stream));
    auto* base = static_cast<uint8_t*>(memory.ptr);
    v_nonfinite = reinterpret_cast<int32_t*>(base + flag_at);
    FSA_CUDA_CHECK(cudaMemsetAsync(v_nonfinite, 0, sizeof(int32_t), stream));
    k = base;
    v = base + row_bytes;
    if (grads) {
      dk = base + 2 * row_bytes;
      dv = base + 3 * row_bytes;
    }
    bias = reinterpret_cast<float*>(base + flag_at + 256);
    if (dbias_wanted) dbias = bias + g.bias_batch * g.bias_heads * g.slots;
  }
};

// The block map over a compaction's slots (its lists, row bounds and, for per-row selections,
// key_last set), on the device, into c.plan; gather_window > 0 also builds the gathered lists.
void plan_slots(KeyCompaction& c, const Geometry& geo, bool is_causal, int block_m, int block_n,
                int64_t gather_window, void* stream_ptr) {
  const CompactGeometry& g = c.lists;
  BlockMap extents;
  extents.batch = g.list_batch;
  extents.heads = g.list_heads;
  extents.block_m = block_m;
  extents.block_n = block_n;
  extents.m_blocks = ceil_div(g.seqlen_q, block_m);
  extents.n_blocks = ceil_div(g.slots, block_n);
  const Geometry compact{geo.batch, g.seqlen_q, g.slots, geo.num_heads, g.kv_heads};
  // Not yet shared: the map is completed here before the plan takes it.
  auto device_map = std::const_pointer_cast<DeviceBlockMap>(
      make_device_plan(compact, std::nullopt, std::nullopt, 1, 1, false, extents, row_end_of(c),
                       false, gather_window, stream_ptr));
  // The lists' counts: a key mask's dK/dV pass splits by them, and the split reduction stops there.
  device_map->params.kept_count = c.count;
  int device = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  c.plan = PlanAccess::make(compact, is_causal, false, Device{DeviceType::kCUDA, device},
                            std::make_shared<BlockMap>(extents), std::move(device_map));
}

// ---- masks whose rows are one interval per key (PlanOptions::mask_key_intervals) -------------------

// The mask of list l (the mask's (batch, head) read extents) and the scan's outputs.
struct IntervalScan {
  const uint8_t* mask;
  int64_t stride[4];  // read strides
  int list_heads, seqlen_q, seqlen_k;
  bool is_causal;
  int32_t* first;  // (lists, Sk): the first row keeping key j; 0x7f7f7f7f before the scan
  int32_t* last;   // (lists, Sk): the last; -1 before
  int32_t* rows;   // (lists, Sk): how many rows keep it; 0 before
};
constexpr int kIntervalKeys = 128;   // keys (threads) per CTA of interval_scan_kernel
constexpr int kIntervalRows = 1024;  // rows per CTA

// grid (ceil(Sk / kIntervalKeys), ceil(Sq / kIntervalRows), lists): thread = key, its rows of the
// CTA's chunk in order (a warp reads 32 consecutive mask bytes per row, eight rows in flight),
// merged into the key's first / last / count by atomics.
__global__ void __launch_bounds__(kIntervalKeys) interval_scan_kernel(IntervalScan p) {
  const int l = blockIdx.z, j = int(blockIdx.x) * kIntervalKeys + int(threadIdx.x);
  if (j >= p.seqlen_k) return;
  const int lb = l / p.list_heads, lh = l % p.list_heads;
  const uint8_t* col = p.mask + lb * p.stride[0] + lh * p.stride[1] + j * p.stride[3];
  // Row i sees key j iff j < i + Sk - Sq + 1 (bottom-right causal).
  const int seen_from = p.is_causal ? max(j - (p.seqlen_k - p.seqlen_q), 0) : 0;
  const int r0 = max(int(blockIdx.y) * kIntervalRows, seen_from);
  const int r1 = min(int(blockIdx.y + 1) * kIntervalRows, p.seqlen_q);
  int first = INT_MAX, last = -1, rows = 0;
  constexpr int kUnroll = 8;
  for (int i = r0; i < r1; i += kUnroll) {
    uint8_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = i + u < r1 ? col[int64_t(i + u) * p.stride[2]] : 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v[u] != 0) {
        first = min(first, i + u);
        last = i + u;
        ++rows;
      }
    }
  }
  if (rows == 0) return;
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  atomicMin(p.first + at, first);
  atomicMax(p.last + at, last);
  atomicAdd(p.rows + at, rows);
}

// grid (ceil(Sk / 256), lists): flags a key whose rows are not one interval (*broken), and with
// `sort_key` set writes the sort's input: list l above the first row of a kept key (Sq for the
// others, which sort last), shifted by `row_bits`; the key as the value; the list's count.
__global__ void interval_check_kernel(IntervalScan p, uint32_t* broken, uint64_t* sort_key,
                                      int row_bits, int32_t* sort_value, int32_t* count) {
  const int l = blockIdx.y, j = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (j >= p.seqlen_k) return;
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  const int rows = p.rows[at];
  if (rows != 0 && rows != p.last[at] - p.first[at] + 1) atomicOr(broken, 1u);
  if (sort_key == nullptr) return;
  const uint32_t first = rows != 0 ? uint32_t(p.first[at]) : uint32_t(p.seqlen_q);
  sort_key[at] = (uint64_t(l) << row_bits) | first;
  sort_value[at] = j;
  if (rows != 0) atomicAdd(count + l, 1);
}

// grid (ceil(key_last_stride(Sk) / 256), lists): slot s of list l (keys sorted by first row, then
// index) -> keys, slot, key_first, key_last; past the count key_first = Sq, key_last = -1.
__global__ void interval_slots_kernel(IntervalScan p, const int32_t* sorted, const int32_t* count,
                                      int64_t stride, int32_t* keys, int32_t* slot,
                                      int32_t* key_first, int32_t* key_last) {
  const int l = blockIdx.y, s = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (s >= stride) return;
  const int64_t out = l * stride + s;
  if (s >= count[l]) {
    key_first[out] = p.seqlen_q;
    key_last[out] = -1;
    return;
  }
  const int j = sorted[int64_t(l) * p.seqlen_k + s];
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  keys[int64_t(l) * p.seqlen_k + s] = j;
  slot[at] = s;
  key_first[out] = p.first[at];
  key_last[out] = p.last[at];
}

// grid (ceil(Sq / 256), lists): row_end[l][i] = the slots whose first row is <= i (a prefix).
__global__ void interval_row_end_kernel(const int32_t* key_first, const int32_t* count,
                                        int64_t stride, int seqlen_q, int32_t* row_end) {
  const int l = blockIdx.y, i = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (i >= seqlen_q) return;
  const int32_t* first = key_first + l * stride;
  int lo = 0, hi = count[l];  // the first slot whose first row is > i
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (first[mid] <= i) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  row_end[int64_t(l) * seqlen_q + i] = lo;
}

// A scan's extents and its outputs in scratch (first, last, rows: 3 x lists x Sk int32).
IntervalScan scan_outputs(const CompactGeometry& g, bool is_causal, int32_t* scratch) {
  const int64_t n = g.list_batch * g.list_heads * g.seqlen_k;
  IntervalScan p{};
  p.list_heads = int(g.list_heads);
  p.seqlen_q = int(g.seqlen_q);
  p.seqlen_k = int(g.seqlen_k);
  p.is_causal = is_causal;
  p.first = scratch;
  p.last = scratch + n;
  p.rows = scratch + 2 * n;
  return p;
}

// The scan over the whole mask into scratch (first, last, rows: 3 x lists x Sk int32).
IntervalScan scan_intervals(const CompactGeometry& g, const BroadcastOperand& mask, bool is_causal,
                            int32_t* scratch, cudaStream_t stream) {
  const int64_t lists = g.list_batch * g.list_heads, n = lists * g.seqlen_k;
  IntervalScan p = scan_outputs(g, is_causal, scratch);
  p.mask = static_cast<const uint8_t*>(mask.data);
  for (int d = 0; d < 4; ++d) p.stride[d] = mask.read_stride[d];
  FSA_CUDA_CHECK(cudaMemsetAsync(p.first, 0x7f, size_t(n) * 4, stream));
  FSA_CUDA_CHECK(cudaMemsetAsync(p.last, 0xff, size_t(n) * 4, stream));
  FSA_CUDA_CHECK(cudaMemsetAsync(p.rows, 0, size_t(n) * 4, stream));
  if (n > 0 && g.seqlen_q > 0) {
    const dim3 grid(unsigned(ceil_div(g.seqlen_k, kIntervalKeys)),
                    unsigned(ceil_div(g.seqlen_q, kIntervalRows)), unsigned(lists));
    interval_scan_kernel<<<grid, kIntervalKeys, 0, stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  return p;
}

void check_interval_extents(const CompactGeometry& g) {
  const int64_t lists = g.list_batch * g.list_heads;
  if (lists > 65535 || g.seqlen_q > INT32_MAX / 2 || lists * g.seqlen_k > INT32_MAX / 4 ||
      ceil_div(g.seqlen_q, kIntervalRows) > 65535) {
    throw Error(ErrorKind::kUnsupported, "attn_mask",
                "mask_key_intervals on CUDA: at most 65535 (batch, head) lists and 2^29 keys "
                "over them");
  }
}

// Packed sequences (PlanOptions::packed): the offsets and the key mask (1, {H|Hk|1}, 1, Sk), if
// any.
struct PackedScan {
  const int32_t* cu_q;
  const int32_t* cu_k;
  int sequences;
  const uint8_t* mask;
  int64_t mask_stride_h, mask_stride_k;
};

// grid (ceil(Sk / 256), lists): key j's sequence (the last whose first key is <= j) and the rows
// of it that see the key: all of them, or with causality those from its bottom-right diagonal on;
// none where the mask drops it or the sequence has no rows. The offsets are clamped into
// [0, Sq] / [0, Sk] and each sequence's into order, so that offsets the host never checked (they
// live on the device) can give wrong rows but no row or key out of range.
__global__ void packed_scan_kernel(IntervalScan p, PackedScan v) {
  const int l = blockIdx.y, j = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (j >= p.seqlen_k) return;
  int lo = 0, hi = v.sequences;  // the first sequence whose first key is > j, among [0, n)
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (v.cu_k[mid] <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int s = lo - 1;
  int first = 0, last = -1;
  if (s >= 0 && (v.mask == nullptr || v.mask[l * v.mask_stride_h + j * v.mask_stride_k] != 0)) {
    const int k0 = min(max(v.cu_k[s], 0), p.seqlen_k);
    const int k1 = min(max(v.cu_k[s + 1], k0), p.seqlen_k);
    const int q0 = min(max(v.cu_q[s], 0), p.seqlen_q);
    const int q1 = min(max(v.cu_q[s + 1], q0), p.seqlen_q);
    if (j >= k0 && j < k1 && q1 > q0) {
      const int diagonal = (j - k0) - ((k1 - k0) - (q1 - q0));
      first = q0 + (p.is_causal ? max(diagonal, 0) : 0);
      last = q1 - 1;
    }
  }
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  const bool kept = first <= last;
  p.first[at] = kept ? first : 0x7f7f7f7f;
  p.last[at] = kept ? last : -1;
  p.rows[at] = kept ? last - first + 1 : 0;
}

// The compaction of keys whose rows are one interval each, from a scan of them (`scan` fills
// an IntervalScan's first / last / rows in the 3 x lists x Sk int32 it is given): slots by first
// row, then by index, key_first / key_last per slot, row bounds, and the map over the slots
// (gather_window > 0: with each query tile's gathered slots).
template <class Scan>
std::shared_ptr<const KeyCompaction> interval_compaction(const Geometry& geo,
                                                         const CompactGeometry& g, bool is_causal,
                                                         int block_m, int block_n,
                                                         int64_t gather_window, const Scan& scan,
                                                         void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  check_interval_extents(g);
  const int64_t lists = g.list_batch * g.list_heads, sq = g.seqlen_q, sk = g.seqlen_k;
  const int64_t slots = g.slots, stride = key_last_stride(slots), n = lists * sk;

  // The plan's lists: keys (lists, slots), slot (lists, Sk), count (lists), row_end (lists, Sq),
  // key_last and key_first (lists, stride each); one allocation.
  auto at = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t keys_bytes = at(size_t(lists * slots) * 4), slot_bytes = at(size_t(n) * 4);
  const size_t count_bytes = at(size_t(lists) * 4), row_bytes = at(size_t(lists * sq) * 4);
  const size_t last_bytes = at(size_t(lists * stride) * 4);
  void* raw = nullptr;
  FSA_CUDA_CHECK(scratch_malloc(
      &raw, std::max<size_t>(keys_bytes + slot_bytes + count_bytes + row_bytes + 2 * last_bytes, 1),
      stream));
  std::shared_ptr<void> storage = scratch_owner(raw, stream);
  auto* base = static_cast<uint8_t*>(raw);
  auto* keys = reinterpret_cast<int32_t*>(base);
  auto* slot = reinterpret_cast<int32_t*>(base + keys_bytes);
  auto* count = reinterpret_cast<int32_t*>(base + keys_bytes + slot_bytes);
  auto* row_end = reinterpret_cast<int32_t*>(base + keys_bytes + slot_bytes + count_bytes);
  auto* key_last =
      reinterpret_cast<int32_t*>(base + keys_bytes + slot_bytes + count_bytes + row_bytes);
  auto* key_first = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(key_last) + last_bytes);
  FSA_CUDA_CHECK(cudaMemsetAsync(slot, 0xff, size_t(n) * 4, stream));
  FSA_CUDA_CHECK(cudaMemsetAsync(count, 0, size_t(lists) * 4, stream));

  // Scratch: the scan (3 n int32), the sort's keys in / out (2 n uint64) and values in / out (2 n
  // int32), the broken flag (unread here: the caller promised intervals); 4 bytes of padding.
  const int row_bits = bits_below(sq + 1);  // keys are first rows <= Sq
  StreamBuffer scratch(stream), sort_temp(stream);
  FSA_CUDA_CHECK(scratch_malloc(&scratch.ptr, size_t(n) * (3 * 4 + 2 * 8 + 2 * 4) + 8, stream));
  auto* scanned = static_cast<int32_t*>(scratch.ptr);
  auto* key_in = reinterpret_cast<uint64_t*>(scanned + 3 * n + (n & 1));  // 8-byte aligned
  auto* key_out = key_in + n;
  auto* value_in = reinterpret_cast<int32_t*>(key_out + n);
  auto* value_out = value_in + n;
  auto* broken = reinterpret_cast<uint32_t*>(value_out + n);
  const IntervalScan p = scan(scanned);
  if (n > 0) {
    const dim3 per_key(unsigned(ceil_div(sk, 256)), unsigned(lists));
    interval_check_kernel<<<per_key, 256, 0, stream>>>(p, broken, key_in, row_bits, value_in,
                                                      count);
    FSA_CUDA_CHECK(cudaGetLastError());
    // Radix sort is stable: keys with the same first row keep ascending indices.
    sort_pairs(key_in, key_out, value_in, value_out, n, 0, row_bits + bits_below(lists),
               sort_temp, stream);
    interval_slots_kernel<<<dim3(unsigned(ceil_div(stride, 256)), unsigned(lists)), 256, 0,
                            stream>>>(p, value_out, count, stride, keys, slot, key_first,
                                      key_last);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  if (lists * sq > 0) {
    interval_row_end_kernel<<<dim3(unsigned(ceil_div(sq, 256)), unsigned(lists)), 256, 0,
                              stream>>>(key_first, count, stride, int(sq), row_end);
    FSA_CUDA_CHECK(cudaGetLastError());
  }

  auto c = std::make_shared<KeyCompaction>();
  c->lists = g;
  c->keys = keys, c->count = count, c->slot = slot, c->row_end = row_end;
  c->key_last = key_last;
  c->key_first = key_first;
  c->storage = std::move(storage);
  plan_slots(*c, geo, is_causal, block_m, block_n, gather_window, stream_ptr);
  return c;
}

// topk: per-row top-k (the mask lists the keys some row keeps, at most topk_window per row):
// KeyCompaction::key_last too, and the map follows it, with each query tile's gathered slots.
std::shared_ptr<KeyCompaction> build_compaction(const Geometry& geo, const BroadcastOperand& mask,
                                                bool is_causal, int block_m, int block_n,
                                                int64_t max_kept_keys, const TopkListParams* topk,
                                                int64_t topk_window, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const CompactGeometry g = compact_lists_geometry(geo, mask, max_kept_keys);
  const int64_t lists = g.list_batch * g.list_heads, sq = g.seqlen_q, sk = g.seqlen_k;
  // Lists are a grid dimension of the planning kernels (and of the plan: make_device_plan).
  if (lists > 65535 || sk > INT32_MAX / 2 || sq > INT32_MAX) {
    throw Error(ErrorKind::kUnsupported, "attn_mask",
                "too many key lists (batch x mask heads, at most 65535) or keys for compacted "
                "keys on CUDA");
  }

  // keys: (lists, slots); slot: (lists, Sk); count: (lists); row_end: (lists, Sq); one allocation.
  const int64_t slots = g.slots;
  const size_t keys_bytes = size_t(lists * slots) * 4, slot_bytes = size_t(lists * sk) * 4;
  const size_t count_bytes = size_t(lists) * 4, row_bytes = size_t(lists * sq) * 4;
  auto at = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t lists_bytes = at(keys_bytes) + at(slot_bytes) + at(count_bytes) + at(row_bytes);
  void* raw = nullptr;
  const size_t last_bytes = topk ? 2 * size_t(lists * key_last_stride(slots)) * 4 : 0;
  FSA_CUDA_CHECK(scratch_malloc(&raw, std::max<size_t>(lists_bytes + last_bytes, 1), stream));
  std::shared_ptr<void> storage = scratch_owner(raw, stream);
  auto* base = static_cast<uint8_t*>(raw);
  auto* keys = reinterpret_cast<int32_t*>(base);
  auto* slot = reinterpret_cast<int32_t*>(base + at(keys_bytes));
  auto* count = reinterpret_cast<int32_t*>(base + at(keys_bytes) + at(slot_bytes));
  auto* row_end =
      reinterpret_cast<int32_t*>(base + at(keys_bytes) + at(slot_bytes) + at(count_bytes));
  if (lists > 0) {
    const ListMask m{static_cast<const uint8_t*>(mask.data), mask.read_stride[0],
                     mask.read_stride[1], mask.read_stride[3], int(g.list_heads), int(sk)};
    const int64_t chunks = ceil_div(sk, kListChunk);
    if (chunks == 0) {
      FSA_CUDA_CHECK(cudaMemsetAsync(count, 0, size_t(lists) * 4, stream));
    } else {
      StreamBuffer chunk_count(stream);
      FSA_CUDA_CHECK(scratch_malloc(&chunk_count.ptr, size_t(lists * chunks) * 4, stream));
      const dim3 grid{unsigned(chunks), unsigned(lists)};
      list_counts_kernel<<<grid, kListThreads, 0, stream>>>(
          m, static_cast<int32_t*>(chunk_count.ptr));
      FSA_CUDA_CHECK(cudaGetLastError());
      list_keys_kernel<<<grid, kListThreads, 0, stream>>>(
          m, static_cast<const int32_t*>(chunk_count.ptr), int(slots), keys, count, slot);
      FSA_CUDA_CHECK(cudaGetLastError());
    }
  }
  if (lists * sq > 0) {
    row_end_kernel<<<unsigned(ceil_div(lists * sq, 256)), 256, 0, stream>>>(
        keys, count, lists, int(sq), int(sk), int(slots), is_causal, row_end);
    FSA_CUDA_CHECK(cudaGetLastError());
  }

  auto c = std::make_shared<KeyCompaction>();
  c->lists = g;
  c->keys = keys, c->count = count, c->slot = slot, c->row_end = row_end;
  if (topk) {
    auto* key_last = reinterpret_cast<int32_t*>(base + lists_bytes);
    if (lists * slots > 0) {
      key_last_kernel<<<dim3(unsigned(ceil_div(key_last_stride(slots), 256)), unsigned(lists)), 256,
                        0, stream>>>(
          *topk, keys, count, int(slots), key_last, key_last + lists * key_last_stride(slots));
      FSA_CUDA_CHECK(cudaGetLastError());
    }
    c->key_last = key_last;
    c->key_first = key_last + lists * key_last_stride(slots);
  }
  c->storage = std::move(storage);
  plan_slots(*c, geo, is_causal, block_m, block_n, topk ? topk_window : 0, stream_ptr);
  return c;
}

}  // namespace

std::shared_ptr<const KeyCompaction> make_device_compaction(const Geometry& geo,
                                                            const BroadcastOperand& mask,
                                                            bool is_causal, int block_m,
                                                            int block_n, int64_t max_kept_keys,
                                                            void* stream) {
  return build_compaction(geo, mask, is_causal, block_m, block_n, max_kept_keys, nullptr, 0,
                          stream);
}

bool mask_key_intervals(const Geometry& geo, const BroadcastOperand& mask, bool is_causal,
                        void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const CompactGeometry g = compact_lists_geometry(geo, mask, 0);
  check_interval_extents(g);
  const int64_t lists = g.list_batch * g.list_heads, n = lists * g.seqlen_k;
  StreamBuffer scratch(stream);
  FSA_CUDA_CHECK(scratch_malloc(&scratch.ptr, size_t(3 * n + 1) * 4, stream));
  auto* base = static_cast<int32_t*>(scratch.ptr);
  auto* broken = reinterpret_cast<uint32_t*>(base + 3 * n);
  FSA_CUDA_CHECK(cudaMemsetAsync(broken, 0, 4, stream));
  const IntervalScan p = scan_intervals(g, mask, is_causal, base, stream);
  if (n > 0) {
    interval_check_kernel<<<dim3(unsigned(ceil_div(g.seqlen_k, 256)), unsigned(lists)), 256, 0,
                            stream>>>(p, broken, nullptr, 0, nullptr, nullptr);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  uint32_t host = 0;
  FSA_CUDA_CHECK(cudaMemcpyAsync(&host, broken, 4, cudaMemcpyDeviceToHost, stream));
  FSA_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host == 0;
}

std::shared_ptr<const KeyCompaction> make_device_interval_compaction(const Geometry& geo,
                                                                     const BroadcastOperand& mask,
                                                                     bool is_causal, int block_m,
                                                                     int block_n,
                                                                     void* stream_ptr) {
  const CompactGeometry g = compact_lists_geometry(geo, mask, 0);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  // No bound on the slots a row keeps: each query tile's gathered list may hold every slot.
  return interval_compaction(geo, g, is_causal, block_m, block_n, g.slots,
                             [&](int32_t* scratch) {
                               return scan_intervals(g, mask, is_causal, scratch, stream);
                             },
                             stream_ptr);
}

std::shared_ptr<const KeyCompaction> make_device_packed_compaction(
    const Geometry& geo, const PlanOptions::PackedSequences& packed,
    const std::optional<BroadcastOperand>& mask, bool is_causal, int block_m, int block_n,
    void* stream_ptr) {
  const CompactGeometry g = packed_lists_geometry(geo, mask);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  // No gathered lists: a sequence's slots are consecutive, so the map over the slot axis visits
  // each sequence's own (causal) square of tiles, whose K / V rows load as they lie.
  return interval_compaction(
      geo, g, is_causal, block_m, block_n, 0,
      [&](int32_t* scratch) {
        const IntervalScan p = scan_outputs(g, is_causal, scratch);
        PackedScan v{packed.cu_seqlens_q, packed.cu_seqlens_k, int(packed.sequences), nullptr, 0,
                     0};
        if (mask) {
          v.mask = static_cast<const uint8_t*>(mask->data);
          v.mask_stride_h = mask->read_stride[1];
          v.mask_stride_k = mask->read_stride[3];
        }
        if (g.list_batch * g.list_heads * g.seqlen_k > 0) {
          packed_scan_kernel<<<dim3(unsigned(ceil_div(g.seqlen_k, 256)),
                                    unsigned(g.list_batch * g.list_heads)),
                               256, 0, stream>>>(p, v);
          FSA_CUDA_CHECK(cudaGetLastError());
        }
        return p;
      },
      stream_ptr);
}

std::shared_ptr<const KeyCompaction> make_device_topk_compaction(
    const Geometry& geo, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, const RowTopK& t, int64_t topk, int block_m, int block_n, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const TopkLists extents = topk_lists(bias, mask);
  const int64_t batch = extents.batch, heads = extents.heads;
  const int64_t lists = batch * heads, sk = geo.seqlen_k;
  const TopkListParams tp{make_topk_keys(geo, bias, mask, heads), t, is_causal};

  // The keys some row keeps, as a (batch, heads, 1, Sk) mask for the lists' builder.
  StreamBuffer kept(stream);
  FSA_CUDA_CHECK(scratch_malloc(&kept.ptr, size_t(std::max<int64_t>(lists * sk, 1)), stream));
  if (lists * sk > 0) {
    kept_by_some_row_kernel<<<dim3(unsigned(ceil_div(sk, 256)), unsigned(lists)), 256, 0,
                              stream>>>(tp, static_cast<uint8_t*>(kept.ptr));
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  return build_compaction(geo, key_flags(kept.ptr, batch, heads, geo), is_causal, block_m,
                          block_n, 0, &tp, topk, stream_ptr);
}

void compacted_forward(const ForwardProblem& p, const KeyCompaction& c, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) return;
  const CompactGeometry g = compact_geometry(p, c);
  CompactBuffers buffers(p, g, false, false, stream);
  gather(p, g, c, buffers.k, buffers.v, buffers.bias, buffers.v_nonfinite, stream);
  ForwardProblem cp = p;
  lower_compacted(p, g, c, buffers.k, buffers.v, buffers.bias, cp);
  cp.v_nonfinite = buffers.v_nonfinite;
  forward(cp, c.plan, stream_ptr);
}

void compacted_backward(const BackwardProblem& p, const KeyCompaction& c, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch == 0 || p.num_heads == 0) return;
  const CompactGeometry g = compact_geometry(p, c);
  CompactBuffers buffers(p, g, true, p.dbias.has_value(), stream);
  gather(p, g, c, buffers.k, buffers.v, buffers.bias, nullptr, stream);
  BackwardProblem cp = p;
  lower_compacted(p, g, c, buffers.k, buffers.v, buffers.bias, cp);
  compacted_grads(g, buffers.dk, buffers.dv, buffers.dbias, cp);
  // With one gathered kv head per kv head, the dK/dV split's reduction may write the caller's
  // dK and dV by key itself (BackwardParams::scatter); else scatter_rows copies the slots' rows.
  // FSA_CUDA_DKV_SCATTER=0 keeps scatter_rows (A/B measurements, docs/perf.md).
  static const bool fused_scatter = !env_is("FSA_CUDA_DKV_SCATTER", "0");
  KeyScatter scatter;
  if (fused_scatter && g.kv_heads == g.num_kv_heads && g.seqlen_k <= INT32_MAX) {
    scatter.slot = c.slot;
    scatter.keys = int(g.seqlen_k);
    scatter.list_stride_b = g.list_batch == 1 ? 0 : int(g.list_heads);
    scatter.head_group = int(g.kv_heads / g.list_heads);
    scatter.dk = p.dk.data, scatter.dv = p.dv.data;
    scatter.dk_stride_b = p.dk.stride_b, scatter.dk_stride_s = p.dk.stride_s;
    scatter.dk_stride_h = p.dk.stride_h;
    scatter.dv_stride_b = p.dv.stride_b, scatter.dv_stride_s = p.dv.stride_s;
    scatter.dv_stride_h = p.dv.stride_h;
  }
  if (!backward(cp, c.plan, stream_ptr, scatter)) {
    const bool bf16 = p.dtype == DType::kBFloat16;
    scatter_rows(g, c, buffers.dk, buffers.dv, p.dk, p.dv, p.head_dim, bf16, stream);
  }
  if (p.dbias) scatter_dbias(g, c, buffers.dbias, *p.dbias, stream);
}

}  // namespace fsa::detail::cuda
