// Per-row top-k thresholds on the device (core/row_topk.h), for a query-invariant bias with a
// key-only mask (or none), under causality or not.
//
// Every row of a list (batch, head) chooses among a prefix of the same keys: keys [0, e_i) with
// e_i non-decreasing in i (all of them without causality). So the keys are ranked once per list
// (a stable sort of their order keys, descending: rank order is create_mask's order, ties to the
// lower index), and row i's threshold is the rank of the topk-th best key of its prefix. Rows are
// swept in chunks: a CTA sets the ranks of its first row's prefix in a shared-memory bitmap, finds
// the topk-th set bit with a block-wide popcount scan, then one thread walks the chunk's rows,
// adding each newly visible key; a key that beats the threshold moves it to the previous set bit.
// The walk touches shared memory only (the chunk's new ranks are loaded first, its thresholds
// written out after): a global load per row made it a chain of latencies, 0.09-0.11 ms (H200).
// Cost: one sort of B * H * Sk keys and O(Sk / 32 + chunk) per chunk; no Sq x Sk work.

#include <cuda_fp16.h>

#include <algorithm>
#include <limits>
#include <string>

#include "core/thresholds.h"
#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/list_sort.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"
#include "cuda/topk_keys.h"

namespace fsa::detail::cuda {
namespace {

constexpr int kSweepThreads = 256;
constexpr int kSweepRows = 64;  // rows per sweep CTA: the sequential walk stays short
// Largest Sk whose rank bitmap fits the sweep's shared memory (128 KiB).
constexpr int64_t kMaxSweepKeys = int64_t(128) << 13;

// grid (ceil(Sk / 256), lists): each key's sort key, list l above the bitwise complement of its
// order key (an ascending sort then ranks descending order keys; a key the mask drops has order key
// 0, below every real key, so it sorts last and is never inserted), and its index.
__global__ void order_keys_kernel(const __grid_constant__ TopkKeys p, uint64_t* keys,
                                 int32_t* index) {
  const int l = blockIdx.y;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.seqlen_k) return;
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  const uint32_t key = p.allowed(l, j) ? order_key(p.value(l, j)) : 0u;
  keys[at] = (uint64_t(l) << 32) | uint32_t(~key);
  index[at] = j;
}

// rank[l][perm[l][r]] = r, or -1 for a key the mask drops; and perm[l][r] = INT32_MAX for a
// dropped key's rank (after its index is read here), so that the sweep's bitmap of a prefix,
// ranks whose key index lies below the prefix's end, never holds one.
__global__ void rank_kernel(const uint64_t* sorted, int32_t* perm, int seqlen_k, int32_t* rank) {
  const int l = blockIdx.y;
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= seqlen_k) return;
  const int64_t at = int64_t(l) * seqlen_k + r;
  const bool dropped = uint32_t(sorted[at]) == 0xffffffffu;
  rank[int64_t(l) * seqlen_k + perm[at]] = dropped ? -1 : r;
  if (dropped) perm[at] = std::numeric_limits<int32_t>::max();
}

struct SweepParams {
  const uint64_t* sorted_keys;  // (lists, Sk) the sort's keys: ~order key in the low half
  const int32_t* perm;          // (lists, Sk) key index of each rank (INT32_MAX: dropped)
  const int32_t* rank;          // (lists, Sk) rank of each key index, -1 if dropped
  int seqlen_q, seqlen_k;
  int topk;
  bool is_causal;
  uint32_t* out_key;  // (lists, Sq)
  int32_t* out_last;
};

__device__ inline int visible(const SweepParams& p, int i) {
  if (!p.is_causal) return p.seqlen_k;
  return min(max(i + p.seqlen_k - p.seqlen_q + 1, 0), p.seqlen_k);
}

// The highest set bit of the bitmap below bit `below` (there is one: the caller knows the count).
__device__ inline int previous_set_bit(const uint32_t* bits, int below) {
  const int top = below - 1;  // the highest candidate
  int word = top / 32;
  uint32_t w = bits[word] & (0xffffffffu >> (31 - top % 32));
  while (w == 0) w = bits[--word];
  return word * 32 + 31 - __clz(w);
}

// grid (ceil(Sq / kSweepRows), lists), kSweepThreads threads, Sk / 8 bytes of shared memory.
__global__ void __launch_bounds__(kSweepThreads)
    sweep_kernel(const __grid_constant__ SweepParams p) {
  extern __shared__ uint32_t bits[];  // (Sk / 32) words: ranks of the keys inserted so far
  __shared__ int scan[kSweepThreads];
  __shared__ int found;  // the rank of the first row's topk-th best key, or -1
  // The ranks of the keys the chunk's rows uncover, in key order (-1: dropped); under causality
  // row i0 + x sees x more keys than row i0 (bottom-right aligned), so at most kSweepRows - 1.
  __shared__ int added[kSweepRows];
  __shared__ int row_threshold[kSweepRows];  // each row's threshold rank, -1: it keeps all
  const int l = blockIdx.y, i0 = blockIdx.x * kSweepRows;
  const int i1 = min(i0 + kSweepRows, p.seqlen_q);
  const int words = (p.seqlen_k + 31) / 32;
  const uint64_t* sorted = p.sorted_keys + int64_t(l) * p.seqlen_k;
  const int32_t* perm = p.perm + int64_t(l) * p.seqlen_k;
  const int32_t* rank = p.rank + int64_t(l) * p.seqlen_k;
  // The first row's prefix: the ranks whose (allowed) key lies below its end, a warp ballot per
  // 32 ranks (the key order scattered over the bitmap by shared atomics was slower); then the
  // keys the other rows add.
  const int e0 = visible(p, i0), e1 = visible(p, i1 - 1);
  const int lane = threadIdx.x % 32;
#pragma unroll 4
  for (int w = threadIdx.x / 32; w < words; w += kSweepThreads / 32) {
    const int r = w * 32 + lane;
    const uint32_t word = __ballot_sync(0xffffffffu, r < p.seqlen_k && perm[r] < e0);
    if (lane == 0) bits[w] = word;
  }
  for (int x = threadIdx.x; x < e1 - e0; x += blockDim.x) added[x] = rank[e0 + x];
  __syncthreads();
  // The topk-th set bit: each thread counts a contiguous run of words, then a block-wide scan.
  const int per = (words + kSweepThreads - 1) / kSweepThreads;
  const int w0 = min(int(threadIdx.x) * per, words), w1 = min(w0 + per, words);
  int mine = 0;
  for (int w = w0; w < w1; ++w) mine += __popc(bits[w]);
  scan[threadIdx.x] = mine;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  for (int o = 1; o < kSweepThreads; o *= 2) {  // inclusive Hillis-Steele scan
    const int v = threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
    __syncthreads();
    scan[threadIdx.x] += v;
    __syncthreads();
  }
  const int before = scan[threadIdx.x] - mine;
  if (before < p.topk && p.topk <= scan[threadIdx.x]) {
    int need = p.topk - before;
    for (int w = w0; w < w1; ++w) {
      const int c = __popc(bits[w]);
      if (need <= c) {
        uint32_t x = bits[w];
        for (int n = 1; n < need; ++n) x &= x - 1;  // drop the need - 1 lowest set bits
        found = w * 32 + __ffs(x) - 1;
        break;
      }
      need -= c;
    }
  }
  const int count0 = scan[kSweepThreads - 1];
  __syncthreads();
  if (threadIdx.x == 0) {
    // One thread walks the chunk: row i adds keys [e_{i-1}, e_i).
    int count = count0, threshold = found, e = e0;
    for (int i = i0; i < i1; ++i) {
      const int end = visible(p, i);
      for (; e < end; ++e) {
        const int r = added[e - e0];
        if (r < 0) continue;  // dropped by the mask
        bits[r / 32] |= 1u << (r % 32);
        if (++count == p.topk) {
          threshold = previous_set_bit(bits, p.seqlen_k);  // the largest rank: the topk-th best
        } else if (count > p.topk && r < threshold) {
          threshold = previous_set_bit(bits, threshold);  // the old one drops out of the top k
        }
      }
      row_threshold[i - i0] = count < p.topk ? -1 : threshold;
    }
  }
  __syncthreads();
  for (int x = threadIdx.x; x < i1 - i0; x += blockDim.x) {
    const int64_t at = int64_t(l) * p.seqlen_q + i0 + x;
    const int r = row_threshold[x];
    if (r < 0) {  // every allowed key of the row is kept
      p.out_key[at] = 0;
      p.out_last[at] = std::numeric_limits<int32_t>::max();
    } else {
      p.out_key[at] = ~uint32_t(sorted[r]);
      p.out_last[at] = perm[r];
    }
  }
}

__global__ void keep_all_kernel(int64_t rows, uint32_t* key, int32_t* last) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  key[i] = 0;
  last[i] = std::numeric_limits<int32_t>::max();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::shared_ptr<const RowThresholds> make_device_thresholds(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, int64_t topk, double min_value, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (mask && mask->read_stride[2] != 0) {
    throw Error(ErrorKind::kUnsupported, "attn_mask",
                "per-row top-k on CUDA takes a key-only attn_mask (query dim 1) or none; for a "
                "mask with a query dim, build the mask with create_mask");
  }
  if (g.seqlen_k > kMaxSweepKeys) {
    throw Error(ErrorKind::kUnsupported, "key",
                "per-row top-k on CUDA supports seqlen_k <= " + std::to_string(kMaxSweepKeys) +
                    ", got " + std::to_string(g.seqlen_k));
  }
  const TopkLists extents = topk_lists(bias, mask);
  const int64_t batch = extents.batch, heads = extents.heads;
  const int64_t lists = batch * heads, sq = g.seqlen_q, sk = g.seqlen_k;
  if (lists * std::max<int64_t>(sk, 1) > std::numeric_limits<int32_t>::max() / 2) {
    throw Error(ErrorKind::kUnsupported, "attn_bias",
                "per-row top-k on CUDA ranks at most 2^30 keys over (batch, heads) at once");
  }

  // Thresholds: key (lists, Sq) and last (lists, Sq), one allocation owned by the plan.
  void* raw = nullptr;
  const size_t half = size_t(std::max<int64_t>(lists * sq, 1)) * 4;
  FSA_CUDA_CHECK(scratch_malloc(&raw, 2 * half, stream));
  std::shared_ptr<void> storage = scratch_owner(raw, stream);
  auto* out_key = static_cast<uint32_t*>(raw);
  auto* out_last = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(raw) + half);

  if (lists * sq > 0 && topk >= sk) {
    keep_all_kernel<<<unsigned(ceil_div(lists * sq, 256)), 256, 0, stream>>>(lists * sq, out_key,
                                                                             out_last);
    FSA_CUDA_CHECK(cudaGetLastError());
  } else if (lists * sq > 0) {
    const TopkKeys lp = make_topk_keys(g, bias, mask, heads);

    // Scratch: sort keys in / out, indices in / out, ranks.
    const int64_t n = lists * sk;
    StreamBuffer scratch(stream), sort_temp(stream);
    FSA_CUDA_CHECK(scratch_malloc(&scratch.ptr, size_t(n) * (2 * 8 + 3 * 4), stream));
    auto* keys_in = static_cast<uint64_t*>(scratch.ptr);
    auto* keys_out = keys_in + n;
    auto* index_in = reinterpret_cast<int32_t*>(keys_out + n);
    auto* index_out = index_in + n;
    auto* rank = index_out + n;

    const dim3 per_key(unsigned(ceil_div(sk, 256)), unsigned(lists));
    order_keys_kernel<<<per_key, 256, 0, stream>>>(lp, keys_in, index_in);
    FSA_CUDA_CHECK(cudaGetLastError());
    // Radix sort is stable: equal keys keep ascending indices, create_mask's tie order. The order
    // key of a bf16 (fp16) value is a function of its top 16 (19) bits: the sort skips the rest.
    const int begin_bit =
        bias.dtype == DType::kBFloat16 ? 16 : bias.dtype == DType::kFloat16 ? 13 : 0;
    sort_pairs(keys_in, keys_out, index_in, index_out, n, begin_bit, 32 + bits_below(lists),
               sort_temp, stream);
    rank_kernel<<<per_key, 256, 0, stream>>>(keys_out, index_out, int(sk), rank);
    FSA_CUDA_CHECK(cudaGetLastError());

    SweepParams sp{};
    sp.sorted_keys = keys_out;
    sp.perm = index_out;
    sp.rank = rank;
    sp.seqlen_q = int(sq);
    sp.seqlen_k = int(sk);
    sp.topk = int(topk);
    sp.is_causal = is_causal;
    sp.out_key = out_key;
    sp.out_last = out_last;
    const int smem = int(ceil_div(sk, 32) * 4);
    FSA_CUDA_CHECK(cudaFuncSetAttribute(sweep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kMaxSweepKeys / 8)));
    sweep_kernel<<<dim3(unsigned(ceil_div(sq, kSweepRows)), unsigned(lists)), kSweepThreads, smem,
                   stream>>>(sp);
    FSA_CUDA_CHECK(cudaGetLastError());
  }

  auto t = std::make_shared<RowThresholds>();
  t->view.key = out_key;
  t->view.last = out_last;
  t->view.stride_b = batch == 1 ? 0 : heads * sq;
  t->view.stride_h = sq;
  t->view.head_group = g.num_heads / heads;
  const float fill = rounded_fill(min_value, bias.dtype);
  t->view.fill_key = order_key(fill);
  t->view.fill_key_alt = fill == 0.0f ? order_key(-fill) : t->view.fill_key;
  t->topk = topk;
  t->bias = bias.data;
  t->storage = std::move(storage);
  return t;
}

}  // namespace fsa::detail::cuda
