// CUDA backend host side: builds the device block map, lowers a validated problem into the
// kernels' params, and dispatches on (head dim, dtype) — the only place with such switches.

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "cuda/backward_launch.h"
#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_arch.h"
#include "cuda/device_plan.h"
#include "cuda/experiments.h"
#include "cuda/forward_launch.h"
#include "cuda/list_sort.h"
#include "cuda/memory_pool.h"
#include "cuda/plan_graph.h"
#include "cuda/plan_kernels.cuh"
#include "cuda/split_kv.h"
#include "cuda/stream_buffer.h"
#include "cuda/tiles.h"

// Which (head dim, dtype) instantiations this build has: CMake defines FSA_CUDA_BUILT_<D>_<dtype>=1
// for each generated file it compiles.
#ifndef FSA_CUDA_BUILT_64_bf16
#define FSA_CUDA_BUILT_64_bf16 0
#endif
#ifndef FSA_CUDA_BUILT_64_fp16
#define FSA_CUDA_BUILT_64_fp16 0
#endif
#ifndef FSA_CUDA_BUILT_128_bf16
#define FSA_CUDA_BUILT_128_bf16 0
#endif
#ifndef FSA_CUDA_BUILT_128_fp16
#define FSA_CUDA_BUILT_128_fp16 0
#endif
#ifndef FSA_CUDA_BUILT_256_bf16
#define FSA_CUDA_BUILT_256_bf16 0
#endif
#ifndef FSA_CUDA_BUILT_256_fp16
#define FSA_CUDA_BUILT_256_fp16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_64_bf16
#define FSA_CUDA_BWD_BUILT_64_bf16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_64_fp16
#define FSA_CUDA_BWD_BUILT_64_fp16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_128_bf16
#define FSA_CUDA_BWD_BUILT_128_bf16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_128_fp16
#define FSA_CUDA_BWD_BUILT_128_fp16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_256_bf16
#define FSA_CUDA_BWD_BUILT_256_bf16 0
#endif
#ifndef FSA_CUDA_BWD_BUILT_256_fp16
#define FSA_CUDA_BWD_BUILT_256_fp16 0
#endif
#define FSA_IF_BWD_BUILT(D, dtype, ...) \
  if constexpr (FSA_CUDA_BWD_BUILT_##D##_##dtype) { __VA_ARGS__ }
#define FSA_IF_BUILT(D, dtype, ...) \
  if constexpr (FSA_CUDA_BUILT_##D##_##dtype) { __VA_ARGS__ }

namespace fsa::detail::cuda {
namespace {

size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

void fill_strides(int64_t (&dst)[4], const BroadcastOperand& op) {
  for (int d = 0; d < 4; ++d) dst[d] = op.read_stride[d];
}

[[noreturn]] void fail(const std::string& arg, const std::string& message) {
  throw Error(ErrorKind::kUnsupported, arg, message);
}

// The kernels copy rows in 16-byte chunks: every row must start 16-byte aligned and hold a
// multiple of 8 elements.
bool rows_aligned(const SeqOperand& op, int64_t head_dim) {
  const auto addr = reinterpret_cast<uintptr_t>(op.data);
  return head_dim % 8 == 0 && addr % 16 == 0 && op.stride_b % 8 == 0 && op.stride_s % 8 == 0 &&
         op.stride_h % 8 == 0;
}

// dst (rows = B * S * H, padded_dim) = src (B, S, H, head_dim) with zeros past head_dim.
__global__ void pad_rows_kernel(const uint16_t* src, int64_t stride_b, int64_t stride_s,
                                int64_t stride_h, int64_t seqlen, int64_t heads, int head_dim,
                                int padded_dim, int64_t rows, uint16_t* dst) {
  const int64_t total = rows * padded_dim;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / padded_dim;
    const int d = int(idx % padded_dim);
    const int64_t h = row % heads, s = (row / heads) % seqlen, b = row / (heads * seqlen);
    dst[idx] = d < head_dim ? src[b * stride_b + s * stride_s + h * stride_h + d] : uint16_t(0);
  }
}

// Rows that are not 16-byte chunks (a head dim that is not a multiple of 8, odd strides, an
// unaligned pointer) are copied once into a zero-padded contiguous buffer the kernels can read:
// one extra read and write of that input, reported in docs/numerics.md.
SeqOperand padded_copy(const SeqOperand& op, int64_t batch, int64_t seqlen, int64_t heads,
                       int64_t head_dim, cudaStream_t stream, void*& buffer) {
  const int padded = int((head_dim + 7) / 8 * 8);
  const int64_t rows = batch * seqlen * heads;
  FSA_CUDA_CHECK(scratch_malloc(&buffer, std::max<int64_t>(rows * padded, 1) * 2, stream));
  if (rows > 0) {
    const int64_t blocks = std::min<int64_t>((rows * padded + 255) / 256, 65535);
    pad_rows_kernel<<<unsigned(blocks), 256, 0, stream>>>(
        static_cast<const uint16_t*>(op.data), op.stride_b, op.stride_s, op.stride_h, seqlen,
        heads, int(head_dim), padded, rows, static_cast<uint16_t*>(buffer));
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  return {buffer, seqlen * heads * padded, heads * padded, padded};
}

// The operand itself when the kernels can read its rows, else a padded copy held by `buffer`.
SeqOperand kernel_rows(const SeqOperand& op, int64_t batch, int64_t seqlen, int64_t heads,
                       int64_t head_dim, StreamBuffer& buffer) {
  if (rows_aligned(op, head_dim)) return op;
  return padded_copy(op, batch, seqlen, heads, head_dim, buffer.stream, buffer.ptr);
}

// Mask, bias and row-bound fields are the same in the forward and backward params.
template <class Params>
void fill_mask_and_bias(Params& params, const Problem& p) {
  params.row_end = p.row_end;
  params.row_topk = p.row_topk;
  if (p.mask) {
    params.mask = static_cast<const uint8_t*>(p.mask->data);
    fill_strides(params.mask_stride, *p.mask);
    params.mask_head_group = int(p.mask->head_group);
  }
  if (p.bias) {
    params.bias = p.bias->data;
    params.bias_is_fp32 = p.bias->dtype == DType::kFloat32;
    fill_strides(params.bias_stride, *p.bias);
    params.bias_head_group = int(p.bias->head_group);
    // A 16-bit bias with a query dim whose key rows are whole 16-byte chunks: the Hopper kernels'
    // producers stage its tiles in shared memory with the K/V tiles (see Params::bias_staged).
    bool chunks = p.bias->dtype != DType::kFloat32 && params.bias_stride[2] != 0 &&
                  params.bias_stride[3] == 1 && p.seqlen_k % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(p.bias->data) % 16 == 0;
    for (int d = 0; d < 3; ++d) chunks = chunks && params.bias_stride[d] % 8 == 0;
    params.bias_staged = chunks;
  }
}

// Whether per-row top-k plans build the dK/dV groups (BlockMapParams::dkv_slots);
// FSA_CUDA_DKV_GROUPS=0 keeps the slot-order tiles (A/B measurements, docs/perf.md).
bool dkv_groups_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_DKV_GROUPS", "0");
  return enabled;
}

// The sm90 dK/dV pass's groups (BlockMapParams::dkv_slots): each list's slots keyed by list, chunk
// and last query tile (core/dkv_order.h), sorted stably (one radix sort over the key's bits,
// cuda/list_sort.h), then grouped and classified per query tile.
void plan_dkv_groups(const PlanParams& pp, int64_t lists, int64_t stride, cudaStream_t stream) {
  const int64_t n = lists * stride;  // within int32 (make_device_plan)
  // Scratch: keys in and out, slots in and out.
  StreamBuffer scratch(stream), sort_temp(stream);
  FSA_CUDA_CHECK(scratch_malloc(&scratch.ptr, size_t(4 * n) * 4, stream));
  auto* key_in = static_cast<uint32_t*>(scratch.ptr);
  auto* key_out = key_in + n;
  auto* slot_in = reinterpret_cast<int32_t*>(key_out + n);
  auto* slot_out = slot_in + n;
  const DkvKeyBits bits = dkv_key_bits(lists, stride, pp.map.m_blocks);
  dkv_key_kernel<<<dim3(unsigned((stride + 255) / 256), unsigned(lists)), 256, 0, stream>>>(
      pp, bits, int(stride), key_in, slot_in);
  FSA_CUDA_CHECK(cudaGetLastError());
  // Radix sort is stable: slots with equal keys keep their order (the keys' order).
  sort_pairs(key_in, key_out, slot_in, slot_out, n, 0,
             std::max(1, bits.list_bits + bits.chunk_bits + bits.tile_bits), sort_temp, stream);
  dkv_lists_kernel<<<dim3(unsigned((pp.map.n_blocks + kPlanWarps - 1) / kPlanWarps),
                          unsigned(lists)),
                     32 * kPlanWarps, dkv_lists_smem(pp.map.m_blocks), stream>>>(pp, slot_out);
  FSA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

std::shared_ptr<const DeviceBlockMap> make_device_plan(
    const Geometry& g, const std::optional<BroadcastOperand>& mask,
    const std::optional<BroadcastOperand>& selection, int sel_ratio_m, int sel_ratio_n,
    bool is_causal, const BlockMap& extents, const RowEnd& row_end, bool all_partial,
    int64_t gather_window, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  auto map = std::make_shared<DeviceBlockMap>();
  map->stream = stream;
  FSA_CUDA_CHECK(cudaGetDevice(&map->device));

  const int64_t outer = extents.batch * extents.heads;
  const int64_t rows = outer * extents.m_blocks, cols = outer * extents.n_blocks;
  const int64_t tiles = rows * extents.n_blocks;
  if (extents.m_blocks > 65535 || extents.n_blocks > INT32_MAX || outer > 65535) {
    fail("query", "too many query blocks or (batch x heads) for a CUDA plan (at most 65535 each)");
  }
  if (row_end.key_last != nullptr && outer * extents.n_blocks * extents.block_n > INT32_MAX) {
    fail("key", "too many compacted keys over (batch x heads) for a CUDA plan (at most 2^31)");
  }
  // Layout of the one allocation: counters, 2 x (rows counts + rows lists), 2 x (cols counts +
  // cols lists), tile classes.
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset += align_up(bytes);
    return at;
  };
  const size_t counters_at = take(kPlanCounters * sizeof(unsigned long long));
  const size_t full_count_at = take(rows * sizeof(int32_t));
  const size_t partial_count_at = take(rows * sizeof(int32_t));
  const size_t full_index_at = take(tiles * sizeof(int32_t));
  const size_t partial_index_at = take(tiles * sizeof(int32_t));
  const size_t full_count_t_at = take(cols * sizeof(int32_t));
  const size_t partial_count_t_at = take(cols * sizeof(int32_t));
  const size_t full_index_t_at = take(tiles * sizeof(int32_t));
  const size_t partial_index_t_at = take(tiles * sizeof(int32_t));
  const size_t class_at = take(tiles);
  // Per-row top-k over compacted keys: the gathered slot lists (BlockMapParams::gather_slots).
  const bool gathered = row_end.key_last != nullptr && gather_window > 0;
  const int64_t gather_stride =
      gathered ? detail::gather_stride(gather_window, extents.block_m, extents.block_n,
                                       extents.n_blocks)
               : 0;
  const size_t gather_slots_at = take(gathered ? rows * gather_stride * sizeof(int32_t) : 0);
  const size_t gather_full_at = take(gathered ? rows * sizeof(int32_t) : 0);
  const size_t gather_tiles_at = take(gathered ? rows * sizeof(int32_t) : 0);
  // ... and the sm90 dK/dV pass's groups of slots (BlockMapParams::dkv_slots), for its 64-key tiles.
  const bool dkv_groups = gathered && extents.block_n == 64 && dkv_groups_enabled();
  const int64_t dkv_stride = extents.n_blocks * 64;
  const size_t dkv_slots_at = take(dkv_groups ? outer * dkv_stride * sizeof(int32_t) : 0);
  const size_t dkv_counts_at = take(dkv_groups ? 2 * cols * sizeof(int32_t) : 0);
  const size_t dkv_index_at = take(dkv_groups ? 2 * tiles * sizeof(int32_t) : 0);
  void* raw = nullptr;
  FSA_CUDA_CHECK(scratch_malloc(&raw, offset, stream));
  map->storage = scratch_owner(raw, stream);  // freed after the plan's last use on `stream`
  auto* base = static_cast<uint8_t*>(raw);
  map->counters = reinterpret_cast<unsigned long long*>(base + counters_at);
  map->tile_class = base + class_at;
  FSA_CUDA_CHECK(
      cudaMemsetAsync(map->counters, 0, kPlanCounters * sizeof(unsigned long long), stream));

  BlockMapParams& mp = map->params;
  mp.full_count = reinterpret_cast<int32_t*>(base + full_count_at);
  mp.partial_count = reinterpret_cast<int32_t*>(base + partial_count_at);
  mp.full_index = reinterpret_cast<int32_t*>(base + full_index_at);
  mp.partial_index = reinterpret_cast<int32_t*>(base + partial_index_at);
  mp.full_count_t = reinterpret_cast<int32_t*>(base + full_count_t_at);
  mp.partial_count_t = reinterpret_cast<int32_t*>(base + partial_count_t_at);
  mp.full_index_t = reinterpret_cast<int32_t*>(base + full_index_t_at);
  mp.partial_index_t = reinterpret_cast<int32_t*>(base + partial_index_t_at);
  if (gathered) {
    mp.gather_slots = reinterpret_cast<int32_t*>(base + gather_slots_at);
    mp.gather_full = reinterpret_cast<int32_t*>(base + gather_full_at);
    mp.gather_tiles = reinterpret_cast<int32_t*>(base + gather_tiles_at);
    mp.gather_stride = int(gather_stride);
  }
  if (dkv_groups) {
    mp.dkv_slots = reinterpret_cast<int32_t*>(base + dkv_slots_at);
    mp.dkv_full_count_t = reinterpret_cast<int32_t*>(base + dkv_counts_at);
    mp.dkv_partial_count_t = mp.dkv_full_count_t + cols;
    mp.dkv_full_index_t = reinterpret_cast<int32_t*>(base + dkv_index_at);
    mp.dkv_partial_index_t = mp.dkv_full_index_t + tiles;
  }
  mp.map_batch = int(extents.batch);
  mp.map_heads = int(extents.heads);
  mp.head_group = int(g.num_heads / extents.heads);
  mp.m_blocks = int(extents.m_blocks);
  mp.n_blocks = int(extents.n_blocks);
  mp.block_m = extents.block_m;
  mp.block_n = extents.block_n;

  PlanParams pp{};
  if (mask) {
    pp.mask = static_cast<const uint8_t*>(mask->data);
    fill_strides(pp.mask_stride, *mask);
    pp.mask_head_group = int(mask->head_group);
  }
  if (selection) {
    pp.selection = static_cast<const uint8_t*>(selection->data);
    fill_strides(pp.sel_stride, *selection);
    pp.sel_head_group = int(selection->head_group);
    pp.sel_ratio_m = sel_ratio_m;
    pp.sel_ratio_n = sel_ratio_n;
  }
  pp.seqlen_q = int(g.seqlen_q);
  pp.seqlen_k = int(g.seqlen_k);
  pp.is_causal = is_causal;
  pp.row_end = row_end;
  pp.all_partial = all_partial;
  pp.tile_class = map->tile_class;
  pp.counters = map->counters;
  pp.map = mp;
  if (rows > 0 && extents.n_blocks > 0) {
    const unsigned threads = 32 * kPlanWarps;
    pp.classify_tiles_per_warp = classify_tiles_per_warp(rows * extents.n_blocks);
    const int64_t tiles_per_cta = int64_t(kPlanWarps) * pp.classify_tiles_per_warp;
    const dim3 grid(unsigned((extents.n_blocks + tiles_per_cta - 1) / tiles_per_cta),
                    unsigned(extents.m_blocks), unsigned(outer));
    // The map, the gathered lists and the dK/dV groups read only what came before (the row
    // bounds): in a planning graph they are parallel branches.
    const CaptureBranches branches(stream);
    const cudaStream_t map_stream = branches.branch(0), dkv_stream = branches.branch(1);
    classify_kernel<<<grid, threads, 0, map_stream>>>(pp);
    FSA_CUDA_CHECK(cudaGetLastError());
    compact_kernel<<<unsigned((rows + kPlanWarps - 1) / kPlanWarps), threads, 0, map_stream>>>(
        pp);
    FSA_CUDA_CHECK(cudaGetLastError());
    transpose_kernel<<<unsigned((cols + kPlanWarps - 1) / kPlanWarps), threads, 0, map_stream>>>(
        pp);
    FSA_CUDA_CHECK(cudaGetLastError());
    if (gathered) {
      gather_lists_kernel<<<dim3(unsigned(extents.m_blocks), unsigned(outer)), threads, 0,
                            stream>>>(pp);
      FSA_CUDA_CHECK(cudaGetLastError());
    }
    if (dkv_groups) plan_dkv_groups(pp, outer, dkv_stride, dkv_stream);
  } else {
    // Sk = 0 or Sq = 0: every list is empty, by row and by column. The storage comes from the
    // scratch pool, which holds what its last user left. With Sq = 0 (rows = 0) the dK/dV pass
    // still runs every key tile over its column's counts (to write zero dK and dV); unwritten,
    // those counts were read as lists of query tiles (an illegal address on the card in the
    // empty-sequence backward test at D = 128).
    auto fill = [&](const int32_t* list, int64_t count, int byte) {
      if (count > 0) {
        FSA_CUDA_CHECK(cudaMemsetAsync(const_cast<int32_t*>(list), byte,
                                       size_t(count) * sizeof(int32_t), stream));
      }
    };
    fill(mp.full_count, rows, 0);
    fill(mp.partial_count, rows, 0);
    fill(mp.full_count_t, cols, 0);
    fill(mp.partial_count_t, cols, 0);
    if (gathered) {
      fill(mp.gather_full, rows, 0);
      fill(mp.gather_tiles, rows, 0);
    }
    if (dkv_groups) {  // no slot in any group (-1), no query tile in any group's lists
      fill(mp.dkv_slots, outer * dkv_stride, 0xff);
      fill(mp.dkv_full_count_t, 2 * cols, 0);
    }
  }
  return map;
}

CurrentDevice::CurrentDevice(int device) {
  int current = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) {
    FSA_CUDA_CHECK(cudaSetDevice(device));
    previous_ = current;
  }
}

CurrentDevice::~CurrentDevice() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

DevicePlanStats device_plan_stats(const DeviceBlockMap& map) {
  unsigned long long host[kPlanCounters] = {};
  FSA_CUDA_CHECK(cudaMemcpyAsync(host, map.counters, sizeof(host), cudaMemcpyDeviceToHost,
                                 map.stream));
  FSA_CUDA_CHECK(cudaStreamSynchronize(map.stream));
  return {int64_t(host[0]), int64_t(host[1]), int64_t(host[2]), int64_t(host[3]),
          int64_t(host[4]), int64_t(host[5])};
}

// The plan must be a CUDA plan with the kernels' tiles for this head dim.
const DeviceBlockMap& kernel_plan(const Plan& plan, int64_t head_dim) {
  const DeviceBlockMap* map = plan.device_map();
  if (!map) fail("plan", "expected a plan built for CUDA tensors");
  const int block_m = forward_block_m(int(head_dim)), block_n = forward_block_n(int(head_dim));
  if (map->params.block_m != block_m || map->params.block_n != block_n) {
    throw Error(ErrorKind::kValue, "plan",
                "built with tiles " + std::to_string(map->params.block_m) + "x" +
                    std::to_string(map->params.block_n) + ", the CUDA kernels for head_dim " +
                    std::to_string(head_dim) + " need " + std::to_string(block_m) + "x" +
                    std::to_string(block_n) + " (leave PlanOptions block_m/block_n at 0)");
  }
  return *map;
}

void forward(const ForwardProblem& p, const Plan& plan, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DeviceBlockMap* map = &kernel_plan(plan, p.head_dim);
  const int kdim = kernel_head_dim(int(p.head_dim));
  const int block_m = forward_block_m(int(p.head_dim));
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) return;
  if (p.batch > 65535 || p.num_heads > 65535) fail("query", "batch and num_heads must be <= 65535");

  StreamBuffer q_pad(stream), k_pad(stream), v_pad(stream);
  const SeqOperand q = kernel_rows(p.q, p.batch, p.seqlen_q, p.num_heads, p.head_dim, q_pad);
  const SeqOperand k = kernel_rows(p.k, p.batch, p.seqlen_k, p.num_kv_heads, p.head_dim, k_pad);
  const SeqOperand v = kernel_rows(p.v, p.batch, p.seqlen_k, p.num_kv_heads, p.head_dim, v_pad);

  ForwardParams fp{};
  fp.q = q.data;
  fp.k = k.data;
  fp.v = v.data;
  fp.paged = paged_rows(k);  // validate_forward gave key and value one page table
  fp.out = p.out.data;
  fp.lse = p.lse;
  fp.q_stride_b = q.stride_b, fp.q_stride_s = q.stride_s, fp.q_stride_h = q.stride_h;
  fp.k_stride_b = k.stride_b, fp.k_stride_s = k.stride_s, fp.k_stride_h = k.stride_h;
  fp.v_stride_b = v.stride_b, fp.v_stride_s = v.stride_s, fp.v_stride_h = v.stride_h;
  fp.o_stride_b = p.out.stride_b, fp.o_stride_s = p.out.stride_s, fp.o_stride_h = p.out.stride_h;
  fp.lse_stride_b = p.lse_stride_b, fp.lse_stride_h = p.lse_stride_h;
  fp.lse_stride_s = p.lse_stride_s;
  fill_mask_and_bias(fp, p);
  fp.v_nonfinite = p.v_nonfinite;
  fp.cache_seqlens = p.cache_seqlens;
  fp.batch = int(p.batch);
  fp.seqlen_q = int(p.seqlen_q);
  fp.seqlen_k = int(p.seqlen_k);
  fp.num_heads = int(p.num_heads);
  fp.num_kv_heads = int(p.num_kv_heads);
  fp.head_dim = int(p.head_dim);
  fp.group = int(p.group());
  constexpr float kLog2e = 1.4426950408889634f;
  fp.scale_log2 = p.scale * kLog2e;
  if (p.softcap > 0.0f) {
    fp.softcap_in = p.scale / p.softcap;
    fp.softcap_out = p.softcap * kLog2e;
  }
  fp.is_causal = p.is_causal;
  fp.map = map->params;
  fp.causal_band = plan.causal_band();

  // GQA packing when every query of a kv head's G heads fits one row tile and the plan's lists
  // are shared by those heads (map heads 1 or Hk).
  // Not over gathered lists, whose tiles read one query head's bias.
  fp.pack_gqa = p.group() > 1 && p.seqlen_q * p.group() <= block_m &&
                map->params.head_group % p.group() == 0 && map->params.gather_slots == nullptr;
  const int64_t heads = fp.pack_gqa ? p.num_kv_heads : p.num_heads;
  // (Slots as the sm80 kernel's layout for this call has them; the sm90 kernel's grid is sized
  // the same way.)
  const Sm80Layout layout = sm80_layout(fp.pack_gqa, fp.seqlen_q * fp.group, kdim);
  const int plan_rows = forward_plan_rows_per_cta(fp, kdim);
  fp.num_splits = choose_splits((int64_t(map->params.m_blocks) + plan_rows - 1) / plan_rows *
                                    heads * p.batch,
                                map->params.n_blocks,
                                int64_t(layout.ctas_per_sm(kdim)) * multiprocessor_count());
  fp.kv_evict_first = layout.split_keys && kv_evict_first_enabled();
  fp.touch_table = layout.split_keys && fp.paged.table != nullptr && touch_table_enabled();
  StreamBuffer workspace(stream);  // split-KV partial outputs, released after the combine
  if (fp.num_splits > 1) {
    const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
    const size_t o_bytes = size_t(fp.num_splits) * rows * kdim * sizeof(float);
    const size_t lse_bytes = size_t(fp.num_splits) * rows * sizeof(float);
    FSA_CUDA_CHECK(scratch_malloc(&workspace.ptr, o_bytes + lse_bytes, stream));
    fp.o_partial = static_cast<float*>(workspace.ptr);
    fp.lse_partial = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace.ptr) + o_bytes);
  }

  const bool bf16 = p.dtype == DType::kBFloat16;
  switch (kdim) {
#define FSA_FORWARD_CASE(D)                                                    \
  case D:                                                                      \
    if (bf16) {                                                                \
      FSA_IF_BUILT(D, bf16, launch_forward<D, Bf16>(fp, stream); return;)      \
    } else {                                                                   \
      FSA_IF_BUILT(D, fp16, launch_forward<D, Fp16>(fp, stream); return;)      \
    }                                                                          \
    break;
    FSA_FORWARD_CASE(64)
    FSA_FORWARD_CASE(128)
    FSA_FORWARD_CASE(256)
#undef FSA_FORWARD_CASE
  }
  require_built(p);  // (dispatch.cc asked before planning: not reached)
  fail("query", "no CUDA forward for kernel width " + std::to_string(kdim));
}

void backward(const BackwardProblem& p, const Plan& plan, void* stream_ptr) {
  backward(p, plan, stream_ptr, KeyScatter{});
}

bool backward(const BackwardProblem& p, const Plan& plan, void* stream_ptr,
              const KeyScatter& scatter) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DeviceBlockMap& map = kernel_plan(plan, p.head_dim);
  const int kdim = kernel_head_dim(int(p.head_dim));
  if (p.batch > 65535 || p.num_heads > 65535) fail("query", "batch and num_heads must be <= 65535");

  StreamBuffer q_pad(stream), k_pad(stream), v_pad(stream), do_pad(stream);
  const SeqOperand q = kernel_rows(p.q, p.batch, p.seqlen_q, p.num_heads, p.head_dim, q_pad);
  const SeqOperand k = kernel_rows(p.k, p.batch, p.seqlen_k, p.num_kv_heads, p.head_dim, k_pad);
  const SeqOperand v = kernel_rows(p.v, p.batch, p.seqlen_k, p.num_kv_heads, p.head_dim, v_pad);
  const SeqOperand dout =
      kernel_rows(p.dout, p.batch, p.seqlen_q, p.num_heads, p.head_dim, do_pad);

  BackwardParams bp{};
  bp.q = q.data, bp.k = k.data, bp.v = v.data, bp.out = p.out.data, bp.dout = dout.data;
  bp.lse = p.lse;
  bp.dq = p.dq.data, bp.dk = p.dk.data, bp.dv = p.dv.data;
  bp.q_stride_b = q.stride_b, bp.q_stride_s = q.stride_s, bp.q_stride_h = q.stride_h;
  bp.k_stride_b = k.stride_b, bp.k_stride_s = k.stride_s, bp.k_stride_h = k.stride_h;
  bp.v_stride_b = v.stride_b, bp.v_stride_s = v.stride_s, bp.v_stride_h = v.stride_h;
  bp.o_stride_b = p.out.stride_b, bp.o_stride_s = p.out.stride_s, bp.o_stride_h = p.out.stride_h;
  bp.do_stride_b = dout.stride_b, bp.do_stride_s = dout.stride_s, bp.do_stride_h = dout.stride_h;
  bp.dq_stride_b = p.dq.stride_b, bp.dq_stride_s = p.dq.stride_s, bp.dq_stride_h = p.dq.stride_h;
  bp.dk_stride_b = p.dk.stride_b, bp.dk_stride_s = p.dk.stride_s, bp.dk_stride_h = p.dk.stride_h;
  bp.dv_stride_b = p.dv.stride_b, bp.dv_stride_s = p.dv.stride_s, bp.dv_stride_h = p.dv.stride_h;
  bp.lse_stride_b = p.lse_stride_b, bp.lse_stride_h = p.lse_stride_h;
  bp.lse_stride_s = p.lse_stride_s;
  fill_mask_and_bias(bp, p);
  bp.batch = int(p.batch), bp.seqlen_q = int(p.seqlen_q), bp.seqlen_k = int(p.seqlen_k);
  bp.num_heads = int(p.num_heads), bp.num_kv_heads = int(p.num_kv_heads);
  bp.head_dim = int(p.head_dim), bp.group = int(p.group());
  constexpr float kLog2e = 1.4426950408889634f;
  bp.scale = p.scale;
  bp.scale_log2 = p.scale * kLog2e;
  if (p.softcap > 0.0f) {
    bp.softcap_in = p.scale / p.softcap;
    bp.softcap_out = p.softcap * kLog2e;
  }
  bp.is_causal = p.is_causal;
  bp.deterministic = p.deterministic;
  bp.map = map.params;
  bp.dq_head_step = 1;  // grid (m, H, B); see BackwardParams::ordered_dbias
  bp.dkv_splits = 1;    // launch_backward may split the sm90 dK/dV pass
  bp.dkv_split_log2 = 0;
  bp.dkv_rows = int(p.seqlen_k);
  bp.scatter = scatter;

  // Scratch from the stream-ordered pool: rowdot (B, H, Sq) and the bias-gradient accumulator.
  StreamBuffer rowdot(stream), accum(stream);
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  FSA_CUDA_CHECK(scratch_malloc(&rowdot.ptr, std::max<int64_t>(rows, 1) * sizeof(float), stream));
  bp.rowdot = static_cast<float*>(rowdot.ptr);
  bp.rowdot_chunks = rows_aligned(p.out, p.head_dim) && rows_aligned(dout, p.head_dim);
  if (p.dbias) {
    const BroadcastOperand& g = *p.dbias;
    for (int d = 0; d < 4; ++d) {
      bp.dbias_stride[d] = g.stride[d];
      bp.dbias_shape[d] = int(g.shape[d]);
    }
    bp.dbias = g.data;
    if (g.shape[0] * g.shape[1] * g.shape[2] > INT32_MAX) {  // its rows are one grid dimension
      fail("attn_bias", "a bias gradient with more than 2^31 - 1 rows (batch x heads x queries) "
                        "is not supported on CUDA");
    }
    const int elt_bytes = g.dtype == DType::kFloat32 ? 4 : 2;
    bp.dbias_pairs = g.stride[3] == 1 && g.stride[0] % 2 == 0 && g.stride[1] % 2 == 0 &&
                     g.stride[2] % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(g.data) % (2 * elt_bytes) == 0;
    const bool query_full = g.shape[2] == p.seqlen_q, key_full = g.shape[3] == p.seqlen_k;
    const bool broadcast = g.shape[0] != p.batch || g.shape[1] != p.num_heads;
    if (query_full && key_full) {
      bp.bias_grad = broadcast ? BiasGrad::kFullSummed : BiasGrad::kFull;
    } else {
      bp.bias_grad = query_full ? BiasGrad::kRows : BiasGrad::kColumns;
    }
    // A full bias broadcast over batch or heads sums the dS of several (b, h) into one element:
    // ordered launches (one per (b, h) sharing a bias slice, BackwardParams::ordered_dbias) when
    // deterministic, or when each launch still has two CTAs per SM; else fp32 atomics from one
    // launch. On H100 the ordered launches tied with the atomics at 512 CTAs per launch and took
    // 1.6-2.9x as long at 64 and 32 (docs/perf.md, "Bias gradients").
    const int64_t ordered_ctas = int64_t(map.params.m_blocks) * g.shape[1] * g.shape[0];
    bp.ordered_dbias = bp.bias_grad == BiasGrad::kFullSummed &&
                       (p.deterministic || ordered_ctas >= 2 * int64_t(multiprocessor_count()));
    int64_t accum_elems = 0;
    if (bp.bias_grad == BiasGrad::kFullSummed) accum_elems = g.shape[0] * g.shape[1] * g.shape[2] * g.shape[3];
    if (bp.bias_grad == BiasGrad::kRows) accum_elems = rows;
    if (bp.bias_grad == BiasGrad::kColumns) accum_elems = p.batch * p.num_heads * p.seqlen_k;
    if (accum_elems > 0) {
      FSA_CUDA_CHECK(scratch_malloc(&accum.ptr, accum_elems * sizeof(float), stream));
      float* a = static_cast<float*>(accum.ptr);
      if (bp.bias_grad == BiasGrad::kFullSummed) {
        FSA_CUDA_CHECK(cudaMemsetAsync(a, 0, accum_elems * sizeof(float), stream));
        bp.dbias_accum = a;
      } else if (bp.bias_grad == BiasGrad::kRows) {
        bp.row_accum = a;
      } else {
        bp.col_accum = a;
      }
    }
  }

  const bool bf16 = p.dtype == DType::kBFloat16;
  switch (kdim) {
#define FSA_BACKWARD_CASE(D)                                                     \
  case D:                                                                        \
    if (bf16) {                                                                  \
      FSA_IF_BWD_BUILT(D, bf16, return launch_backward<D, Bf16>(bp, stream);)    \
    } else {                                                                     \
      FSA_IF_BWD_BUILT(D, fp16, return launch_backward<D, Fp16>(bp, stream);)    \
    }                                                                            \
    break;
    FSA_BACKWARD_CASE(64)
    FSA_BACKWARD_CASE(128)
    FSA_BACKWARD_CASE(256)
#undef FSA_BACKWARD_CASE
  }
  require_built(p);  // (dispatch.cc asked before planning: not reached)
  fail("query", "no CUDA backward for kernel width " + std::to_string(kdim));
}

namespace {
// Per kernel width (64, 128, 256) and dtype (bf16, fp16): whether this build compiled its kernels.
constexpr bool kForwardBuilt[3][2] = {{FSA_CUDA_BUILT_64_bf16, FSA_CUDA_BUILT_64_fp16},
                                      {FSA_CUDA_BUILT_128_bf16, FSA_CUDA_BUILT_128_fp16},
                                      {FSA_CUDA_BUILT_256_bf16, FSA_CUDA_BUILT_256_fp16}};
constexpr bool kBackwardBuilt[3][2] = {{FSA_CUDA_BWD_BUILT_64_bf16, FSA_CUDA_BWD_BUILT_64_fp16},
                                       {FSA_CUDA_BWD_BUILT_128_bf16, FSA_CUDA_BWD_BUILT_128_fp16},
                                       {FSA_CUDA_BWD_BUILT_256_bf16, FSA_CUDA_BWD_BUILT_256_fp16}};
bool built_in(const bool (&table)[3][2], int64_t head_dim, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  const int width = kernel_head_dim(int(head_dim));
  return table[width == 64 ? 0 : width == 128 ? 1 : 2][dtype == DType::kFloat16 ? 1 : 0];
}
[[noreturn]] void fail_not_built(const char* pass, int64_t head_dim, DType dtype) {
  fail("query", std::string("the CUDA ") + pass + " for head_dim " + std::to_string(head_dim) +
                    " (kernel width " + std::to_string(kernel_head_dim(int(head_dim))) +
                    ") and dtype " + to_string(dtype) +
                    " was not built (see FSA_CUDA_INSTANCES, or FSA_CUDA_HEAD_DIMS and "
                    "FSA_CUDA_DTYPES)");
}
}  // namespace

bool forward_built(int64_t head_dim, DType dtype) {
  return built_in(kForwardBuilt, head_dim, dtype);
}

bool backward_built(int64_t head_dim, DType dtype) {
  return built_in(kBackwardBuilt, head_dim, dtype);
}

void require_built(const ForwardProblem& p) {
  if (!forward_built(p.head_dim, p.dtype)) fail_not_built("forward", p.head_dim, p.dtype);
}

void require_built(const BackwardProblem& p) {
  if (!backward_built(p.head_dim, p.dtype)) fail_not_built("backward", p.head_dim, p.dtype);
}

std::vector<fsa::KernelExperiment> kernel_experiments() {
  std::vector<fsa::KernelExperiment> out;
  for (const auto& e : kExperiments) out.push_back({e.name, e.value});
  return out;
}

}  // namespace fsa::detail::cuda
