// Per-row top-k thresholds on the device (core/row_topk.h), for a query-invariant bias with a
// key-only mask (or none), under causality or not.
//
// Every row of a list (batch, head) chooses among a prefix of the same keys: keys [0, e_i) with
// e_i non-decreasing in i (all of them without causality). So the keys are ranked once per list
// (a stable descending sort of their order keys: rank order is create_mask's order, ties to the
// lower index), and row i's threshold is the rank of the topk-th best key of its prefix. Rows are
// swept in chunks: a CTA marks the ranks of its first row's prefix in a shared-memory bitmap, finds
// the topk-th set bit with a block-wide popcount scan, then one thread walks the chunk's rows,
// adding each newly visible key; a key that beats the threshold moves it to the previous set bit.
// Cost: one sort of B * H * Sk keys and O(Sk / 32 + chunk) per chunk; no Sq x Sk work.

#include <cuda_fp16.h>

#include <algorithm>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <limits>
#include <string>

#include "core/thresholds.h"
#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/stream_buffer.h"
#include "cuda/topk_keys.h"

namespace fsa::detail::cuda {
namespace {

constexpr int kSweepThreads = 256;
constexpr int kSweepRows = 128;  // rows per sweep CTA: the sequential walk stays short
// Largest Sk whose rank bitmap fits the sweep's shared memory (128 KiB).
constexpr int64_t kMaxSweepKeys = int64_t(128) << 13;

// grid (ceil(Sk / 256), lists): order keys (0 for keys the mask drops: below every real key, so
// they sort last and are never inserted) and their indices, per list; plus the segment offsets.
__global__ void order_keys_kernel(const __grid_constant__ TopkKeys p, uint32_t* keys,
                                 int32_t* index, int32_t* offsets) {
  const int l = blockIdx.y;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j == 0) {
    offsets[l] = l * p.seqlen_k;
    if (l == int(gridDim.y) - 1) offsets[l + 1] = (l + 1) * p.seqlen_k;
  }
  if (j >= p.seqlen_k) return;
  const int64_t at = int64_t(l) * p.seqlen_k + j;
  keys[at] = p.allowed(l, j) ? order_key(p.value(l, j)) : 0u;
  index[at] = j;
}

// rank[l][perm[l][r]] = r.
__global__ void rank_kernel(const int32_t* perm, int seqlen_k, int32_t* rank) {
  const int l = blockIdx.y;
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= seqlen_k) return;
  rank[int64_t(l) * seqlen_k + perm[int64_t(l) * seqlen_k + r]] = r;
}

struct SweepParams {
  const uint32_t* sorted_keys;  // (lists, Sk) descending
  const int32_t* perm;          // (lists, Sk) key index of each rank
  const int32_t* rank;          // (lists, Sk) rank of each key index
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
  const int l = blockIdx.y, i0 = blockIdx.x * kSweepRows;
  const int i1 = min(i0 + kSweepRows, p.seqlen_q);
  const int words = (p.seqlen_k + 31) / 32;
  const uint32_t* sorted = p.sorted_keys + int64_t(l) * p.seqlen_k;
  const int32_t* perm = p.perm + int64_t(l) * p.seqlen_k;
  const int32_t* rank = p.rank + int64_t(l) * p.seqlen_k;
  for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
  __syncthreads();
  // The first row's prefix: its allowed keys (key 0: dropped by the mask).
  const int e0 = visible(p, i0);
  for (int j = threadIdx.x; j < e0; j += blockDim.x) {
    const int r = rank[j];
    if (sorted[r] != 0) atomicOr(&bits[r / 32], 1u << (r % 32));
  }
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
  if (threadIdx.x != 0) return;
  // One thread walks the chunk: row i adds keys [e_{i-1}, e_i).
  int count = count0, threshold = found, e = e0;
  for (int i = i0; i < i1; ++i) {
    const int end = visible(p, i);
    for (; e < end; ++e) {
      const int r = rank[e];
      if (sorted[r] == 0) continue;  // dropped by the mask
      bits[r / 32] |= 1u << (r % 32);
      if (++count == p.topk) {
        threshold = previous_set_bit(bits, p.seqlen_k);  // the largest rank: the topk-th best
      } else if (count > p.topk && r < threshold) {
        threshold = previous_set_bit(bits, threshold);  // the old one drops out of the top k
      }
    }
    const int64_t at = int64_t(l) * p.seqlen_q + i;
    if (count < p.topk) {  // every allowed key of the row is kept
      p.out_key[at] = 0;
      p.out_last[at] = std::numeric_limits<int32_t>::max();
    } else {
      p.out_key[at] = sorted[threshold];
      p.out_last[at] = perm[threshold];
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
  FSA_CUDA_CHECK(cudaMallocAsync(&raw, 2 * half, stream));
  std::shared_ptr<void> storage(raw, [stream](void* ptr) { cudaFreeAsync(ptr, stream); });
  auto* out_key = static_cast<uint32_t*>(raw);
  auto* out_last = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(raw) + half);

  if (lists * sq > 0 && topk >= sk) {
    keep_all_kernel<<<unsigned(ceil_div(lists * sq, 256)), 256, 0, stream>>>(lists * sq, out_key,
                                                                             out_last);
    FSA_CUDA_CHECK(cudaGetLastError());
  } else if (lists * sq > 0) {
    const TopkKeys lp = make_topk_keys(g, bias, mask, heads);

    // Scratch: keys and indices in / out of the sort, ranks, segment offsets, the sort's own.
    const size_t n = size_t(lists * sk);
    const size_t arrays = 5 * n * 4 + size_t(lists + 1) * 4;
    size_t sort_bytes = 0;
    FSA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(n), int(lists),
        static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr), 0, 32, stream));
    StreamBuffer scratch(stream);
    FSA_CUDA_CHECK(cudaMallocAsync(&scratch.ptr, arrays + sort_bytes + 256, stream));
    auto* base = static_cast<uint8_t*>(scratch.ptr);
    auto* keys_in = reinterpret_cast<uint32_t*>(base);
    auto* keys_out = keys_in + n;
    auto* index_in = reinterpret_cast<int32_t*>(keys_out + n);
    auto* index_out = index_in + n;
    auto* rank = index_out + n;
    auto* offsets = rank + n;
    void* sort_temp = base + (arrays + 255) / 256 * 256;

    const dim3 per_key(unsigned(ceil_div(sk, 256)), unsigned(lists));
    order_keys_kernel<<<per_key, 256, 0, stream>>>(lp, keys_in, index_in, offsets);
    FSA_CUDA_CHECK(cudaGetLastError());
    // Radix sort is stable: equal keys keep ascending indices, create_mask's tie order.
    FSA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        sort_temp, sort_bytes, keys_in, keys_out, index_in, index_out, int(n), int(lists), offsets,
        offsets + 1, 0, 32, stream));
    rank_kernel<<<per_key, 256, 0, stream>>>(index_out, int(sk), rank);
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
