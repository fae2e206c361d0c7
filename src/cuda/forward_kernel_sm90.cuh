#pragma once
// Hopper forward kernel: warpgroup MMA (wgmma, sm_90a) over the same block lists as the sm80
// kernel, for kernel head dims 64, 128 and 256.
//
// A CTA runs (128-row query block, head, batch) tiles with three warpgroups: one tile per CTA, or
// persistent, one CTA per SM taking the next tile from a counter (ForwardTileOrder), so a tile's
// Q and first K/V tiles load while the consumers finish the previous one and write it out. A
// producer warpgroup (few registers after setmaxnreg) copies the tile's Q, then each key tile's K
// and V, and a query-invariant bias's slice or a 16-bit bias's (128 x 64) tile, into one of the
// shared-memory stages with cp.async (whole K/V tiles by TMA at D >= 128 where the call has tensor
// maps: KvTensorMaps, sm90_forward_tma_kv) and arrives on the stage's "full" mbarrier when the
// copies land. Two consumer warpgroups own 64 query rows each and never wait for each other: per
// tile, S = Q K^T with Q in registers (wgmma RS; from shared memory at D = 256, whose O alone
// takes 128 registers per thread, and over the lean walks' 128-key tiles, sm90_forward_wide),
// the logits and online softmax in registers (the WarpRows / softmax_step code of the sm80
// kernel: a wgmma accumulator is laid out per warp exactly like an mma.sync C fragment), then
// O += P V with P from registers and V read from shared memory as an MN-major operand; each
// consumer overlaps the softmax of tile j with its P_{j-1} V_{j-1} and releases a stage on its
// "empty" mbarrier.
//
// At D = 256 the plan's query tiles are 64 rows (forward_block_m: the sm80 kernels' and the
// backward's), and a CTA of 128 rows runs two of them, one per consumer warpgroup, over the union
// of their key lists (PairedWalk): both warpgroups share each K/V tile that both lists hold, so a
// tile read from L2 feeds 128 rows, not 64.
//
// Per-row top-k over compacted keys walks gathered tiles instead (kGathered, D <= 128): the
// producer copies each tile's K/V rows, bias values and last rows by slot
// (BlockMapParams::gather_slots).
//
// Shared-memory tiles use the canonical 128-byte-swizzled GMMA layouts of CuTe; the cp.async
// destinations are computed from the same layout objects (gmma_offset), so loads and descriptors
// cannot disagree.

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/experiments.h"
#include "cuda/forward_kernel.cuh"
#include "cuda/tma.h"

namespace fsa::detail::cuda {

template <class Elt>
struct CuteElement;
template <>
struct CuteElement<Bf16> {
  using type = cute::bfloat16_t;
};
template <>
struct CuteElement<Fp16> {
  using type = cute::half_t;
};

// Whether the sm90 forward at kernel head dim kHeadDim loads whole K/V tiles by TMA (KvTensorMaps).
// At D = 128 TMA is 3-5% faster than cp.async; at D = 64 (one 64 x 64 box each for K and V per
// tile) it measured 5-9% slower on H200, so that head dim keeps cp.async (docs/perf.md, twenty-
// fourth session), but for the experiment FSA_SM90_BAND64_TMA (its walk's Sm90ForwardTiles::
// kTmaKv; the other D = 64 walks ignore the maps). D = 256 loads four boxes each.
constexpr bool sm90_forward_tma_kv(int kHeadDim) {
  return kHeadDim >= 128 || (kHeadDim == 64 && FSA_SM90_BAND64_TMA != 0);
}

// The band walk (forward_kernel_sm90's kBand): over calls whose lists are causality's band alone,
// which it computes instead of reading the plan's 128-row tiles (BandList), query blocks of its
// own. At D = 64, 192 rows and three consumer warpgroups (FlashAttention-3's shape there): the
// dense (2, 16384, 16, 16, 64) forward 1.37x / 1.45x faster causal / non-causal than with two
// warpgroups over 128 rows (H200, docs/perf.md, thirty-fourth session). At D = 128, 128 rows over
// 128-key tiles (sm90_forward_wide).
constexpr bool sm90_forward_band(int kHeadDim) { return kHeadDim <= 128; }
constexpr int sm90_band_rows(int kHeadDim) { return kHeadDim == 64 ? 192 : 128; }

// Whether the lean walks (forward_kernel_sm90's kLean, the band walk among them) step over
// 128-key tiles at kernel head dim kHeadDim (Sm90ForwardTiles' kWide): one softmax, one set of
// barrier waits and one O rescale per 128 keys, Q read from shared memory by the S product (a 64
// x 128 S tile beside O and P leaves no registers for Q's fragments), three stages of 64 KB at
// D = 128. Over the plan's 64-key lists a step is two consecutive tiles of one list, or one and
// the other half dropped (KeyPairWalk). At D = 64 the band walk is the only lean walk; its
// 192 x 128 steps (FlashAttention-3's tiles there) made the dense (2, 16384, 16, 16, 64) forward
// 15% faster than 192 x 64 steps, 21% with the softmax pin (Sm90ForwardTiles::kPinSoftmax): 1.11x
// / 1.13x cuDNN's rate causal / non-causal (H100, docs/perf.md, forty-fifth session).
constexpr bool sm90_forward_wide(int kHeadDim) { return kHeadDim == 64 || kHeadDim == 128; }

// The band walk's calls have keys a whole number of these (band_forward_call): its key tiles at
// D = 128; at D = 64 the plan's 64-key tiles, also over 128-key steps, whose last one's ragged
// half lies past every row's visible end, so the walk drops it as a partial step (BandList), its
// K/V rows zero-filled and its bias slice cut at the keys' end.
constexpr int sm90_band_keys(int kHeadDim) { return kHeadDim == 64 ? 64 : 128; }

template <int kHeadDim_, class Elt, bool kBand_ = false, bool kWide_ = false>
struct Sm90ForwardTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256,
                "the sm90 forward covers head dims 64, 128 and 256");
  // The CTA's query rows, and the plan's tiles: the same block map serves this kernel, the sm80
  // one and the backward. At D = 256 the plan's query tiles are 64 rows, and a CTA runs two
  // (kPlanRows), one per consumer warpgroup (PairedWalk). The band walk's blocks (kBand) are its
  // own; 128-key tiles (kWide) are two of the plan's.
  static constexpr bool kBand = kBand_;
  static constexpr bool kWide = kWide_;
  static_assert(!kBand || sm90_forward_band(kHeadDim), "the band walk's head dims");
  static_assert(!kWide || sm90_forward_wide(kHeadDim), "the wide walk's head dims");
  static constexpr int kBlockM = kBand ? sm90_band_rows(kHeadDim) : 128;
  static constexpr int kBlockN = kWide ? 128 : 64;
  static constexpr int kPlanRows = kBand ? 1 : kBlockM / forward_block_m(kHeadDim);
  static_assert(kBand || (kBlockM % forward_block_m(kHeadDim) == 0 &&
                          kBlockN % forward_block_n(kHeadDim) == 0),
                "the sm90 kernel walks the plan's tiles");
  static constexpr int kWarpGroups = kBlockM / 64;  // consumers: 64 rows each
  static_assert(kPlanRows == 1 || kPlanRows == kWarpGroups, "a plan tile per consumer");
  // Q is the register operand of S = Q K^T at D <= 128 over 64-key tiles; at D = 256 O takes 128
  // registers per thread and S 32 more, and over 128-key tiles S takes 64 and P 32 beside O (64
  // at D = 128; 32 at D = 64, whose three consumer warpgroups have 160 registers each): there Q
  // is read from shared memory.
  static constexpr bool kQInRegisters = kHeadDim <= 128 && kBlockN == 64;
  // At D = 256 a consumer waits for P_{j-1} V_{j-1} before tile j's softmax: its registers (P)
  // are then free for the softmax, which without them spilled.
  static constexpr bool kSoftmaxAfterPv = kHeadDim > 128;
  // At D = 64 a step's row sums are stored into shared memory before the wait for P_{j-1}
  // V_{j-1} (pin_before_wait), so that its exps issue under that product: 7% faster over 128-key
  // steps there (forty-fifth session). At D = 128 it measured within the runs' spread.
  static constexpr bool kPinSoftmax = kHeadDim == 64;
  static constexpr int kProducerThreads = 128;      // one warpgroup issues every K/V load
  static constexpr int kConsumerThreads = kWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // Registers per thread after setmaxnreg: the producer needs few, the consumers hold O, S, P and
  // Q. 128 * 40 + 256 * 232 = 64512 <= 65536; three consumers, 128 * 32 + 384 * 160 = 65536.
  static constexpr int kProducerRegisters = kWarpGroups == 3 ? 32 : 40;
  static constexpr int kConsumerRegisters = kWarpGroups == 3 ? 160 : 232;
  // Gathered tiles: the producer holds each batch of row slots and their addresses (at 40 ptxas
  // spilled 58 bytes there). 128 * 56 + 256 * 224 = 64512.
  static constexpr int kGatheredProducerRegisters = 56;
  static constexpr int kGatheredConsumerRegisters = 224;
  // See the pipeline in forward_kernel_sm90. At D = 256 a stage is 64 KB: two, after Q's 64 KB;
  // over 128-key tiles at D = 128 too, three after Q's 32 KB (a stage goes back once its P V is
  // done, a tile after its S: with two, the producer would start a tile's copies half a tile
  // before the consumers need it). Stages of 32 KB or less: four.
  static constexpr int kStages = kHeadDim > 128 ? 2 : kBlockN * kHeadDim > 64 * 128 ? 3 : 4;
  static constexpr bool kTmaKv =
      sm90_forward_tma_kv(kHeadDim) && (kHeadDim > 64 || (kBand && kWide));

  using T = typename CuteElement<Elt>::type;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V as the B operand of P . V: (N = head dim, K = keys), head dim contiguous (MN-major). Its
  // 64-column blocks of the head dim one after the other (keys first inside each), as K's, so that
  // one (64 x 64) TMA box fills one block of either.
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  // Q is the register operand of S = Q K^T where it fits (kQInRegisters): with 64-key tiles,
  // reading it from shared memory for every product costs as much shared-memory bandwidth as the
  // K tile itself.
  using ShapeS = cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>;
  using TiledMmaS = decltype(cute::make_tiled_mma(
      std::conditional_t<kQInRegisters,
                         decltype(cute::GMMA::rs_op_selector<T, T, float, ShapeS>()),
                         decltype(cute::GMMA::ss_op_selector<T, T, float, ShapeS>())>{},
      cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>{}));
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>{}));

  static constexpr int kSmemQ = int(cute::cosize_v<SmemLayoutQ>);
  static constexpr int kSmemK = int(cute::cosize_v<SmemLayoutK>);
  static constexpr int kSmemV = int(cute::cosize_v<SmemLayoutVt>);
  // Per stage, the key tile's slice of a query-invariant bias (fp32 at most: 4 bytes per key).
  static constexpr int kBiasStageBytes = kBlockN * 4;
  static constexpr int kBarrierOffset = (kSmemQ + kSmemK + kSmemV) * 2 + kStages * kBiasStageBytes;
  // Per stage: "full" (the producer's copies landed) and "empty" (both consumers are done with it),
  // then a partial tile's non-finite V keys (add_nonfinite_keys), 64 bits per stage.
  static constexpr int kNonfiniteOffset = kBarrierOffset + 2 * kStages * 8;
  // The tile schedule's handshake (forward_kernel_sm90): the barriers tile_full, q_full and
  // q_empty, then the published tile and the producer's two fetch slots (int32 each).
  static constexpr int kTileOffset = kNonfiniteOffset + kStages * 8;
  // Two plan tiles per CTA (kPlanRows == 2) or 128-key steps over the plan's lists (kWide): per
  // stage the producer's step record (PairedWalk, KeyPairWalk); paired tiles then have the V
  // side's own "full" and "empty" barriers (the stage barriers above then serve K, its bias and
  // the record alone).
  static constexpr int kStepOffset = kTileOffset + 3 * 8 + 4 * 4;
  static constexpr int kVBarrierOffset = kStepOffset + kStages * 8;
  // (The fourth int32 of the tile handshake is padding where a step record follows; the softmax
  // pin, kPinSoftmax, stores into it, so it is allocated wherever the pin is.)
  static constexpr int kTileInts = kPinSoftmax ? 4 : 3;
  static constexpr int kSmemBytes = kPlanRows == 2 ? kVBarrierOffset + 2 * kStages * 8
                                    : kWide        ? kVBarrierOffset
                                                   : kTileOffset + 3 * 8 + kTileInts * 4;
  static_assert(kBlockN <= 64 || kWide,
                "one bit per key of a tile (the wide walks have no V check)");
  // A staged bias (Params::bias_staged) lives after the barriers, so that launches without one
  // keep their shared memory (and the L1 that the rest of the carveout leaves) as it was. Per
  // stage its (kBlockM x kBlockN) tile, SmemTile<kBlockN>.
  static constexpr int kStagedBiasOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kStagedBiasStageElems = kBlockM * kBlockN;
  // Per-row top-k over compacted keys, gathered tiles (BlockMapParams::gather_slots): per stage,
  // the tile's slots and their last rows (RowEnd::key_last), kBlockN int32 each. Such calls never
  // stage a bias (their bias is query-invariant), so the two share the region after the barriers.
  static constexpr int kSlotOffset = kStagedBiasOffset;
  static constexpr int kKeyLastOffset = kSlotOffset + kStages * kBlockN * 4;
  static constexpr int smem_bytes(bool staged_bias, bool gathered = false) {
    return staged_bias ? kStagedBiasOffset + kStages * kStagedBiasStageElems * 2
           : gathered  ? kKeyLastOffset + kStages * kBlockN * 4
                       : kSmemBytes;
  }
  static_assert(kSmemBytes <= 227 * 1024, "a CTA's shared memory on sm_90");
};

// The tiles of forward_kernel_sm90's walk (kLean, kBand): the lean walks step over 128-key tiles
// where sm90_forward_wide. The kernel, its launch bounds and its launches name them alike.
template <int kHeadDim, class Elt, bool kLean, bool kBand>
using Sm90WalkTiles = Sm90ForwardTiles<kHeadDim, Elt, kBand, kLean && sm90_forward_wide(kHeadDim)>;

// Element offset of a coordinate in one of the GMMA shared-memory layouts above. CuTe applies their
// 128-byte swizzle (Swizzle<3, 4, 3>) to byte addresses when a tensor is built on a pointer; on
// 16-bit elements of a 1024-byte aligned tile that is Swizzle<3, 3, 3> of the element offset:
// 16-byte chunk bits [3, 6) XOR-ed with the 128-byte row bits [6, 9). (Evaluating the layout
// object itself would apply the swizzle to element offsets, which is not what the hardware reads.)
template <class GmmaLayout, class... Coord>
__device__ __forceinline__ int gmma_offset(const GmmaLayout& layout, Coord... coord) {
  const int linear = int(layout.layout_b()(coord...));
  return linear ^ (((linear >> 6) & 7) << 3);
}

// The calling consumer thread's warpgroup (0 for the first warpgroup past the producer's
// `producer_threads`), broadcast from lane 0: the compiler then knows it is the same across the
// warp, so the wgmma descriptors derived from it (a thread slice's operand offsets, a warpgroup's
// own tiles) are computed in uniform registers instead of being moved there (R2UR) before each
// product.
__device__ __forceinline__ int uniform_warpgroup(int producer_threads) {
  return __shfl_sync(0xffffffffu, (int(threadIdx.x) - producer_threads) / 128, 0);
}

// The softmax pin (the forward at D = 64, Sm90ForwardTiles::kPinSoftmax; the backward passes under
// the experiment FSA_SM90_SOFTMAX_PIN): a consumer stores its row sums (which depend on every
// exp2 of the step) into a shared word nobody reads, before the wait for its own previous P V.
// ptxas keeps a shared store on its side of that wait, so the step's exps are issued under the
// product instead of after it (without it, all 66 MUFU.EX2 of a 128-key step follow the wait).
// The store is predicated inside the asm (one writer, no race), so every thread still waits for
// its operand.
__device__ __forceinline__ void pin_before_wait(const void* word, float value, bool writer) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p st.shared.f32 [%0], %1;\n}\n" ::"r"(
          static_cast<uint32_t>(__cvta_generic_to_shared(word))),
      "f"(value), "r"(int(writer))
      : "memory");
}

// Orders this thread's generic-proxy writes to shared memory (cp.async, st.shared) before later
// reads of the async proxy (wgmma operands).
__device__ inline void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Shared-memory mbarriers (PTX ISA, "mbarrier"): the producer/consumer handshake of the pipeline.
__device__ inline uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ inline void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count));
}
__device__ inline void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued before has completed.
__device__ inline void mbarrier_arrive_on_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar))
               : "memory");
}
// Waits until the phase of `bar` with the given parity has completed.
__device__ inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}

// The pipeline's per-stage barriers at `bar`: "full" (kStages, one arrival per producer thread,
// when its copies land) then "empty" (kStages, one arrival per consumer warp). Thread 0
// initializes them; the whole CTA then synchronizes. Returns the "full" array; "empty" follows.
template <int kStages, int kProducerThreads, int kConsumerThreads>
__device__ inline uint64_t* init_stage_barriers(uint8_t* bar) {
  auto* full = reinterpret_cast<uint64_t*>(bar);
  if (threadIdx.x == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(&full[st], kProducerThreads);
      mbarrier_init(&full[kStages + st], kConsumerThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  return full;
}

// 16-byte chunks per row that one pass of the producer's copies covers (GmmaLoadOffsets): the
// head dim, or 128 columns of it at D = 256, whose rows are copied as two such halves. (Wider
// passes would step 4 rows, which the swizzle's row bits do not leave constant.)
constexpr int gmma_load_chunks(int head_dim) { return (head_dim < 128 ? head_dim : 128) / 8; }
constexpr int gmma_load_halves(int head_dim) { return head_dim > 128 ? head_dim / 128 : 1; }

// Copies key rows [row_begin, row_begin + kRows) of a (S, D) slice with row stride `row_stride`
// into a swizzled tile: rows past row_limit and columns past head_dim are zero. Thread t copies
// 16-byte chunk column t % kChunks (of each 128-column half at D = 256) of rows t / kChunks + k *
// kRowsPerPass; its destination offsets are `first` + k * `step` (+ h * `half`) elements (see
// GmmaLoadOffsets).
template <int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_rows_async(uint16_t* smem, int first, int step,
                                                const uint16_t* gmem, int64_t row_stride,
                                                int row_begin, int row_limit, int head_dim,
                                                int half = 0) {
  constexpr int kChunks = gmma_load_chunks(kHeadDim), kHalves = gmma_load_halves(kHeadDim);
  static_assert(kThreads % kChunks == 0, "threads must cover whole rows");
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0, "passes must cover the tile");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const uint16_t* src = gmem + int64_t(row_begin + r0) * row_stride + c * 8;
  const int64_t src_step = int64_t(kRowsPerPass) * row_stride;
#pragma unroll
  for (int k = 0; k < kRows / kRowsPerPass; ++k) {
    const bool row_ok = row_begin + r0 + k * kRowsPerPass < row_limit;
#pragma unroll
    for (int hh = 0; hh < kHalves; ++hh) {
      const bool valid = row_ok && c * 8 + 128 * hh < head_dim;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(valid ? src + 128 * hh : gmem),
          *reinterpret_cast<cute::uint128_t*>(smem + first + k * step + hh * half), valid);
    }
    src += src_step;
  }
}

// A producer's share of a staged bias tile (Params::bias_staged): rows [row_begin, row_begin +
// kRows) x 64 keys of a 16-bit bias slice (row stride `row_stride`, `gmem` at the tile's first
// key) into SmemTile<64> (read back with staged_bias); rows past row_limit and keys past
// key_limit are zero. A rolled loop: the producer warpgroup runs on 40 registers, and the
// unrolled copy made ptxas spill there. Not load_tile_async<64, kRows, kThreads> with its loop
// rolled: that version keeps its stepped source pointer and 64-bit step live and still spilled
// 12 bytes in the staged dQ kernels at D = 128; this one recomputes each row's address.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_bias_tile_async(uint16_t* smem, const uint16_t* gmem,
                                                     int64_t row_stride, int row_begin,
                                                     int row_limit, int key_limit) {
  constexpr int kChunks = 8;  // 64 keys of 16-byte chunks
  static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0, "whole passes");
  const int c = threadIdx.x % kChunks;
  const bool col_ok = c * 8 < key_limit;
#pragma unroll 1
  for (int r = threadIdx.x / kChunks; r < kRows; r += kThreads / kChunks) {
    const bool valid = col_ok && row_begin + r < row_limit;
    const uint16_t* src = valid ? gmem + int64_t(row_begin + r) * row_stride + c * 8 : gmem;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(smem + SmemTile<64>::offset(r, c)), valid);
  }
}

// A thread's cp.async destinations in a GMMA tile, computed once: the offset of its first row
// (row t / kChunks, column 8 (t % kChunks)), the step per pass of kRowsPerPass rows and, at D =
// 256, the step to the second 128-column half. A pass moves by a multiple of 512 elements in
// these layouts (8 or 16 rows of 64 elements, or 8 or 16 MN-major columns of the head dim), and a
// half by whole 64-column blocks, above the swizzle's source bits 6-8, so the steps are constant.
struct GmmaLoadOffsets {
  int first, step, half;
  template <int kHeadDim, int kThreads, class GmmaLayout>
  __device__ static GmmaLoadOffsets make(const GmmaLayout& layout, bool mn_major) {
    constexpr int kChunks = gmma_load_chunks(kHeadDim), kRowsPerPass = kThreads / kChunks;
    const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
    auto at = [&](int r, int col) {
      if constexpr (decltype(cute::rank(layout))::value == 2) {  // one tile, no stage mode
        return mn_major ? gmma_offset(layout, col, r) : gmma_offset(layout, r, col);
      } else {
        return mn_major ? gmma_offset(layout, col, r, 0) : gmma_offset(layout, r, col, 0);
      }
    };
    const int first = at(r0, c * 8);
    const int half = gmma_load_halves(kHeadDim) > 1 ? at(r0, c * 8 + 128) - first : 0;
    return {first, at(r0 + kRowsPerPass, c * 8) - first, half};
  }
};

// The gathered tiles of one map row (BlockMapParams::gather_slots), with BlockList's interface:
// iteration `it` is tile `it`, whose slots are slots[it * kBlockN, (it + 1) * kBlockN).
struct GatheredList {
  const int32_t* slots;
  int n_full;
  int begin, end;  // iterations [begin, end) of this split
  __device__ GatheredList(const ForwardParams& p, int b, int h_map, int m, int split) {
    const int64_t row = map_row(p, b, h_map, m);
    n_full = p.map.gather_full[row];
    split_range(p.map.gather_tiles[row], p.num_splits, split, begin, end);
    slots = p.map.gather_slots + row * p.map.gather_stride;
  }
  __device__ int at(int it) const { return it; }
};

// D = 256 (Sm90ForwardTiles::kPlanRows == 2): the CTA's query block m is the plan's tiles 2m and
// 2m + 1, one per consumer warpgroup. The producer walks the union of their four lists (each
// tile's full and partial key tiles, each ascending) in ascending key tiles, and publishes each
// step for the consumers in its stage (kStepOffset): the key tile and what it is to each plan
// tile, kStepFull or kStepPartial (two bits per tile, 0: not listed), kStepLast on a tile's last
// step. A tile without any step still publishes one (key tile -1, kStepLast), so the consumers
// always see where it ends. Split-KV: split s takes the key tiles of its share of [0, n_blocks).
constexpr int kStepFull = 1, kStepPartial = 2, kStepLast = 1 << 4;
constexpr int kStepPartialAny = kStepPartial | (kStepPartial << 2);
// A 128-key step's status (KeyPairWalk): which of its 64-key halves the list holds (bit h), and
// whether they are partial (causality drops keys inside them); kStepLast as above.
constexpr int kStepHalves = 3, kStepDrops = 1 << 2;
struct PairedWalk {
  const int32_t* full;     // plan tile 2m's full list; its partial list is `partial`, and
  const int32_t* partial;  // tile 2m + 1's lists follow each at a stride of n_blocks (map_row)
  int stride;
  int at[4], end[4];  // the four lists' cursors and lengths: full 2m, partial 2m, then 2m + 1
  int hi;             // key tiles from hi on belong to the next split
  __device__ PairedWalk(const ForwardParams& p, int b, int h_map, int m, int split) {
    const int64_t row = map_row(p, b, h_map, 2 * m);
    stride = p.map.n_blocks;
    full = p.map.full_index + row * stride;
    partial = p.map.partial_index + row * stride;
    const bool second = 2 * m + 1 < p.map.m_blocks;
    end[0] = p.map.full_count[row];
    end[1] = p.map.partial_count[row];
    end[2] = second ? p.map.full_count[row + 1] : 0;
    end[3] = second ? p.map.partial_count[row + 1] : 0;
    int lo;
    split_range(p.map.n_blocks, p.num_splits, split, lo, hi);
    // Each list's first entry >= lo (the lists ascend), a plan tile's two lists at a time. The
    // whole warp runs this (every producer thread builds its own walk).
#pragma unroll
    for (int q = 0; q < 4; ++q) at[q] = 0;
    if (lo > 0) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        warp_count_below(entry(2 * t, 0), end[2 * t], entry(2 * t + 1, 0), end[2 * t + 1], lo,
                         at[2 * t], at[2 * t + 1]);
      }
    }
  }
  __device__ const int32_t* entry(int q, int i) const {
    return (q % 2 == 0 ? full : partial) + (q / 2) * stride + i;
  }
  // The next step's key tile and status bits; false when the walk is done.
  __device__ bool next(int& n, int& status) {
    int head[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) head[q] = at[q] < end[q] ? *entry(q, at[q]) : INT_MAX;
    n = min(min(head[0], head[1]), min(head[2], head[3]));
    if (n >= hi) return false;
    status = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (head[q] == n) {
        status |= (q % 2 == 0 ? kStepFull : kStepPartial) << (2 * (q / 2));
        ++at[q];
      }
    }
    return true;
  }
};

// The wide lean walk's steps over the plan's lists (Sm90ForwardTiles' kWide, not the band): a
// 128-key step n is 64-key tiles 2n and 2n + 1 where both are consecutive entries of one list (the
// full tiles, then the partial ones, each ascending), else the one listed, its other half dropped.
// A split walks its share of the entries (BlockList), so a pair across the split's edge is two
// steps, one per split.
struct KeyPairWalk {
  BlockList list;
  int i;  // the next entry
  __device__ KeyPairWalk(const ForwardParams& p, int b, int h_map, int m, int split)
      : list(p, b, h_map, m, split), i(list.begin) {}
  // The next step's 128-key tile and status (kStepHalves, kStepDrops); false when done.
  __device__ bool next(int& n, int& status) {
    if (i >= list.end) return false;
    const int a = list.at(i);
    const bool partial = i >= list.n_full;
    n = a / 2;
    if (a % 2 == 0 && i + 1 < list.end && (i + 1 >= list.n_full) == partial &&
        list.at(i + 1) == a + 1) {
      status = kStepHalves;
      i += 2;
    } else {
      status = 1 << (a % 2);
      i += 1;
    }
    if (partial) status |= kStepDrops;
    return true;
  }
};

// BlockList's interface over no list: the paired kernel's, whose steps PairedWalk gives instead.
struct NoList {
  static constexpr int begin = 0, end = 0, n_full = 0;
  __device__ NoList(const ForwardParams&, int, int, int, int) {}
  __device__ int at(int) const { return 0; }
};

// The band walk's key tiles (forward_kernel_sm90's kBand), BlockList's interface over no list:
// query block m, rows [m kRows, m kRows + kRows) of which its last row sees keys [0, e), walks key
// tiles of kKeys keys [0, ceil(e / kKeys)) in order, the first n_full of them whole to every row
// (the ones its first row sees whole), the rest partial. One split.
template <int kRows, int kKeys>
struct BandList {
  static constexpr int begin = 0;
  int n_full, end;
  __device__ BandList(const ForwardParams& p, int b, int, int m, int) {
    const int first = m * kRows, last = min(first + kRows, p.seqlen_q) - 1;
    n_full = visible_end(p, b, 0, first) / kKeys;
    end = (visible_end(p, b, 0, last) + kKeys - 1) / kKeys;
  }
  __device__ int at(int it) const { return it; }
};

// The forward's tiles (query block m, split, head h, batch b), numbered in the order of the
// non-persistent grid (blockIdx x: the query block, longest causal rows first, and the split;
// then y: the head; z: the batch), so both launches walk them alike (the band walk, always
// persistent, may put every head's long blocks first: p.long_blocks). Persistent launches
// (p.tile_counter) start CTA c on tile c and hand out the rest in order through the counter.
// A CTA's query block m is plan tiles [m kPlanRows, (m + 1) kPlanRows) (Sm90ForwardTiles::
// kPlanRows), or, kBandRows > 0, rows [m kBandRows, (m + 1) kBandRows) (the band walk's blocks).
template <int kPlanRows, int kBandRows = 0>
struct ForwardTileOrder {
  int x_tiles, heads, total;
  const ForwardParams& p;
  __device__ static int m_blocks(const ForwardParams& params) {
    if constexpr (kBandRows > 0) {
      return (params.seqlen_q + kBandRows - 1) / kBandRows;  // the band walk's own blocks
    } else {
      return (params.map.m_blocks + kPlanRows - 1) / kPlanRows;
    }
  }
  __device__ explicit ForwardTileOrder(const ForwardParams& params)
      : x_tiles(m_blocks(params) * params.num_splits),
        heads(params.pack_gqa ? params.num_kv_heads : params.num_heads),
        total(x_tiles * heads * params.batch),
        p(params) {}
  __device__ int first() const {
    return int(blockIdx.x) + int(gridDim.x) * (int(blockIdx.y) + int(gridDim.y) * int(blockIdx.z));
  }
  // A tile number >= total means none is left.
  __device__ int next() const {
    return p.tile_counter != nullptr ? int(gridDim.x) + atomicAdd(p.tile_counter, 1) : total;
  }
  // Tiles are numbered head by head (each (b, h)'s blocks longest first: CTAs running together
  // share its K/V in L2). With p.long_blocks, each head's first long_blocks come first, head by
  // head, then the rest of each head: the last tiles handed out are short ones of every head,
  // not the longest of the last head, which the others would wait for.
  __device__ void decode(int tile, int& m, int& split, int& h, int& b) const {
    const int long_x = p.long_blocks * p.num_splits, long_tiles = long_x * heads * p.batch;
    const bool early = tile < long_tiles;
    const int width = early ? long_x : x_tiles - long_x, at = early ? tile : tile - long_tiles;
    const int x = at % width + (early ? 0 : long_x), rest = at / width;
    split = x % p.num_splits;
    m = m_blocks(p) - 1 - x / p.num_splits;
    h = rest % heads;
    b = rest / heads;
  }
};

// A producer's share of key tile n_block's slice of a query-invariant bias row (`bytes` per value;
// the row 16-byte aligned) into `dst`: one 16-byte cp.async for each thread below kBlockN * bytes
// / 16 whose chunk lies before the row's end, `keys` past the tile's first key (default: the
// whole tile; else a multiple of 8, the rest of the slice left as it was, for keys the walk drops).
template <int kBlockN>
__device__ __forceinline__ void copy_key_bias_async(const uint8_t* row, int n_block, int bytes,
                                                    uint8_t* dst, int keys = kBlockN) {
  if (int(threadIdx.x) < kBlockN * bytes / 16 && int(threadIdx.x) * 16 < keys * bytes) {
    using cute::uint128_t;
    cute::SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(
        *reinterpret_cast<const uint128_t*>(row + int64_t(n_block) * kBlockN * bytes +
                                            threadIdx.x * 16),
        *reinterpret_cast<uint128_t*>(dst + threadIdx.x * 16));
  }
}

// Gathered tiles: a producer's share (two threads per column, kLoaders == 2 kBlockN) of a tile's
// per-column data: the slot (copied from the list `tile_slots`), its last row and its fp32 bias
// value (no bias: `bias` null), zero for the padding slot -1.
template <int kBlockN>
__device__ __forceinline__ void stage_gathered_columns(const int32_t* tile_slots,
                                                       const int32_t* key_last, const float* bias,
                                                       int64_t bias_stride, int32_t* s_slot,
                                                       int32_t* s_last, float* s_bias) {
  const int col = int(threadIdx.x) % kBlockN;
  const int slot = tile_slots[col];
  const bool listed = slot >= 0;
  if (int(threadIdx.x) < kBlockN) {
    if (bias != nullptr) {
      cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
          *reinterpret_cast<const uint32_t*>(bias + (listed ? slot : 0) * bias_stride),
          *reinterpret_cast<uint32_t*>(s_bias + col), listed);
    }
  } else {
    cute::SM80_CP_ASYNC_CACHEALWAYS<uint32_t>::copy(
        *reinterpret_cast<const uint32_t*>(tile_slots + col),
        *reinterpret_cast<uint32_t*>(s_slot + col));
    cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
        *reinterpret_cast<const uint32_t*>(key_last + (listed ? slot : 0)),
        *reinterpret_cast<uint32_t*>(s_last + col), listed);
  }
}

// A producer's share of a gathered K and V tile: tile row r is row slots[r] of k and v, zero
// where the slot is -1 (past the end of the list). Each thread reads its rows' slots first, so
// their loads are in flight together.
template <int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_gathered_rows_async(uint16_t* smem_k, GmmaLoadOffsets k_dst,
                                                         uint16_t* smem_v, GmmaLoadOffsets v_dst,
                                                         const uint16_t* k, int64_t k_stride,
                                                         const uint16_t* v, int64_t v_stride,
                                                         const int32_t* slots, int head_dim) {
  static_assert(kHeadDim <= 128, "one pass covers a row (GmmaLoadOffsets without halves)");
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunks, kPasses = kRows / kRowsPerPass;
  static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0, "whole passes");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const bool col_ok = c * 8 < head_dim;
  // Four slots in flight at a time: the producer warpgroup runs on few registers
  // (kGatheredProducerRegisters).
  constexpr int kBatch = kPasses < 4 ? kPasses : 4;
  static_assert(kPasses % kBatch == 0, "whole batches");
#pragma unroll
  for (int first = 0; first < kPasses; first += kBatch) {
    int slot[kBatch];
#pragma unroll
    for (int x = 0; x < kBatch; ++x) slot[x] = slots[r0 + (first + x) * kRowsPerPass];
#pragma unroll
    for (int x = 0; x < kBatch; ++x) {
      const int k_pass = first + x;
      const bool valid = col_ok && slot[x] >= 0;
      const int64_t row = valid ? slot[x] : 0;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(k + row * k_stride + c * 8),
          *reinterpret_cast<cute::uint128_t*>(smem_k + k_dst.first + k_pass * k_dst.step), valid);
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(v + row * v_stride + c * 8),
          *reinterpret_cast<cute::uint128_t*>(smem_v + v_dst.first + k_pass * v_dst.step), valid);
    }
  }
}

// The lean walk's drops on a partial tile (forward_kernel_sm90's kLean): key columns col0 + c at
// or past the end of a fragment row, ends[r] for the thread's rows g and g + 8, get -inf.
template <int kNTiles>
__device__ __forceinline__ void drop_keys_from(float (&s)[kNTiles][4], int col0,
                                               const int (&ends)[2], int t) {
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (col0 + j * 8 + 2 * t + (e & 1) >= ends[e / 2]) s[j][e] = -INFINITY;
    }
}

// A 128-key step's halves the list does not hold (KeyPairWalk; bit h of `halves`: half h is
// listed): their columns get -inf.
template <int kNTiles>
__device__ __forceinline__ void drop_halves(float (&s)[kNTiles][4], int halves) {
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!((halves >> (j / (kNTiles / 2))) & 1)) s[j][e] = -INFINITY;
    }
}

// kStagedBias == p.bias_staged. A separate instantiation: with the staged path behind runtime
// branches in the producer and consumer loops the dense forward measured 4.55-4.60 ms against
// 4.14-4.22 ms before it (H100, same runs; docs/perf.md); this way the common instantiation
// compiles to the PTX it had before the staged path existed. kGathered == (p.map.gather_slots !=
// null), per-row top-k over compacted keys through each query tile's gathered slots, is one for
// the same reason: in the common one the slots' last rows alone cost block selections 4-7% of
// their forward (H200, same run).
// kCheckV and kLean: see forward_kernel_sm90 below.
// kBand: the band walk (Sm90ForwardTiles' kBand rows per CTA, BandList), lean only. The lean
// walks step over 128-key tiles where sm90_forward_wide (Sm90ForwardTiles' kWide): the band's
// computed ones, or pairs of the plan's (KeyPairWalk, whose steps the producer publishes in the
// stage's record, as PairedWalk's).
template <int kHeadDim, class Elt, bool kStagedBias, bool kGathered, bool kCheckV, bool kLean,
          bool kBand, bool kLeanBias>
__device__ __forceinline__ void forward_sm90_cta(const ForwardParams& p, const KvTensorMaps& tma) {
  using namespace cute;
  using Tiles = Sm90WalkTiles<kHeadDim, Elt, kLean, kBand>;
  constexpr bool kWide = Tiles::kWide;
  static_assert(!kBand || kLean, "the band walk is a lean one");
  using T = typename Tiles::T;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kStages = Tiles::kStages;
  constexpr int kNTiles = kBlockN / 8;
  constexpr int kDTiles = kHeadDim / 8;

  // Dynamic shared memory starts 1024-byte aligned (no static shared memory here), as the 128-byte
  // swizzle of the GMMA layouts requires.
  extern __shared__ __align__(128) uint8_t smem_raw[];
  constexpr bool kPaired = Tiles::kPlanRows == 2;  // two plan tiles per CTA (PairedWalk)
  static_assert(!(kPaired && kGathered), "gathered tiles are one plan tile's");
  // 128-key steps over the plan's lists (KeyPairWalk).
  constexpr bool kKeyPairs = kWide && !kBand;
  // The producer publishes each step in its stage's record (s_step), the consumers read it there.
  constexpr bool kSteps = kPaired || kKeyPairs;
  // Q read from shared memory by one plan tile's walk: the consumers give it back at the tile's
  // last S, not after its last P V (paired tiles give it back at the end, as they learn which S
  // is their last only from the step after it).
  constexpr bool kEarlyQ = !Tiles::kQInRegisters && !kPaired;
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_k = smem_q + Tiles::kSmemQ;
  T* smem_v = smem_k + Tiles::kSmemK;
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Tiles::SmemLayoutVt{});
  const typename Tiles::SmemLayoutQ layout_q;
  const typename Tiles::SmemLayoutK layout_k;
  const typename Tiles::SmemLayoutVt layout_vt;

  // Tiles (query block, split, head, batch) come from the launch's schedule: one per CTA of a
  // full grid, or, persistent (ForwardParams::tile_counter), one CTA per SM walking tiles until
  // none is left. Per tile the producer publishes its number in s_tile (tile_full), copies its Q
  // (q_full) once the consumers hold the previous Q in registers (q_empty; at D = 256, where Q
  // stays in shared memory, once they computed the previous tile's last S), then its K/V tiles;
  // the stage ring runs on across tiles, so the next tile's Q and first K/V tiles land while the
  // consumers finish the current one and write it out.
  allow_dependent_launch();  // a split call's combine (forward_kernel.cuh)
  const ForwardTileOrder<Tiles::kPlanRows, kBand ? kBlockM : 0> order(p);
  uint64_t* tile_full = reinterpret_cast<uint64_t*>(smem_raw + Tiles::kTileOffset);
  uint64_t* q_full = tile_full + 1;
  uint64_t* q_empty = tile_full + 2;
  auto* s_tile = reinterpret_cast<int*>(tile_full + 3);  // [0]: published; [1, 2]: producer's
  if (threadIdx.x == 0) {  // initialized before init_stage_barriers' fence and CTA barrier
    mbarrier_init(tile_full, 1);
    mbarrier_init(q_full, Tiles::kProducerThreads);
    mbarrier_init(q_empty, Tiles::kConsumerThreads / 32);
    if constexpr (kPaired) {
      auto* v_bar = reinterpret_cast<uint64_t*>(smem_raw + Tiles::kVBarrierOffset);
      for (int st = 0; st < kStages; ++st) {
        mbarrier_init(&v_bar[st], Tiles::kProducerThreads);
        mbarrier_init(&v_bar[kStages + st], Tiles::kConsumerThreads / 32);
      }
    }
  }
  // Paired tiles: producer thread 0 arrives once more on a stage's "full", after it wrote the
  // stage's step record (a release, which its arrival on its copies is not).
  uint64_t* full_bar =
      init_stage_barriers<kStages, Tiles::kProducerThreads + (kSteps ? 1 : 0),
                          Tiles::kConsumerThreads>(smem_raw + Tiles::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;
  auto* s_nonfinite = reinterpret_cast<unsigned long long*>(smem_raw + Tiles::kNonfiniteOffset);
  auto* s_step = reinterpret_cast<int2*>(smem_raw + Tiles::kStepOffset);  // kSteps only
  // Paired tiles: K and V have their own rings of barriers over the same stages. A stage's K is
  // released once both consumers computed its S, its V once their P V is done, so the producer
  // fills the next K while the consumers still read V: with two 64 KB stages, one pair of
  // barriers held each stage for about two key tiles and left the producer one tile ahead.
  uint64_t* full_v = reinterpret_cast<uint64_t*>(smem_raw + Tiles::kVBarrierOffset);
  uint64_t* empty_v = full_v + kStages;

  // Paired tiles and key pairs walk their steps (the producer) and records (the consumers)
  // instead.
  using List = std::conditional_t<
      kBand, BandList<kBlockM, kBlockN>,
      std::conditional_t<kSteps, NoList,
                         std::conditional_t<kGathered, GatheredList, BlockList>>>;
  constexpr int kStageElems = kBlockN * kHeadDim;  // a stage is the outermost mode of both layouts
  static_assert(Tiles::kSmemK == kStages * kStageElems && Tiles::kSmemV == kStages * kStageElems,
                "stages are contiguous tiles");
  // A query-invariant bias with a contiguous, 16-byte aligned key dim travels with its K/V tile
  // (cp.async into the stage's bias slice), so the softmax never waits on a global load. Whole
  // tiles only: the ragged last one reads global memory. Producer and consumers derive the same
  // answer from the params. A bias with a query dim travels as its (kBlockM x kBlockN) tile when
  // p.bias_staged (16-bit, whole 16-byte chunks); other biases are read by WarpRows::logits.
  uint8_t* s_bias = smem_raw + (Tiles::kSmemQ + Tiles::kSmemK + Tiles::kSmemV) * 2;
  auto* s_staged_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kStagedBiasOffset);
  // Gathered tiles (per-row top-k over compacted keys): each stage's slots and their last rows,
  // and the bias values of its slots in s_bias (the compacted bias is fp32 and query-invariant,
  // and one query head's rows share its head: the host never packs GQA here).
  static_assert(!(kStagedBias && kGathered), "the two share their shared-memory region");
  auto* s_slot = reinterpret_cast<int32_t*>(smem_raw + Tiles::kSlotOffset);
  auto* s_key_last = reinterpret_cast<int32_t*>(smem_raw + Tiles::kKeyLastOffset);
  const int bias_bytes = p.bias_is_fp32 ? 4 : 2;
  // Element offset of a query-invariant bias's row for batch b and the head of row0's first row.
  auto bias_row_offset = [&](const WarpRows& row0, int b) {
    int i0, head0;
    row0.row_of(0, 0, i0, head0);
    return b * p.bias_stride[0] + (head0 / p.bias_head_group) * p.bias_stride[1];
  };
  // The query-invariant bias row of a tile's head, when it may be staged (null otherwise).
  auto staged_bias_row = [&](int m, int h, int b) -> const uint8_t* {
    const WarpRows row0(p, m, kBlockM, h, b, 0);
    if (kGathered || !row0.bias_rows_shared || p.bias_stride[3] != 1) return nullptr;
    const uint8_t* row =
        static_cast<const uint8_t*>(p.bias) + bias_row_offset(row0, b) * bias_bytes;
    return reinterpret_cast<uintptr_t>(row) % 16 == 0 ? row : nullptr;
  };
  auto bias_staged = [&](const uint8_t* bias_row, int n_block) {
    return !kGathered && bias_row != nullptr && (n_block + 1) * kBlockN <= p.seqlen_k;
  };
  // Gathered tiles: the bias row of the tile's head, read by slot.
  auto gathered_bias_row = [&](int m, int h, int b) -> const float* {
    if (!kGathered || p.bias == nullptr) return nullptr;
    return static_cast<const float*>(p.bias) + bias_row_offset(WarpRows(p, m, kBlockM, h, b, 0), b);
  };
  constexpr bool check_v = kCheckV;
  static_assert(!kLean || (!kStagedBias && !kGathered && !kCheckV),
                "the lean walk has no staged bias, gathered tiles or V check");
  static_assert(kLean || kLeanBias, "kLeanBias is the lean walks' (one instantiation otherwise)");

  if (threadIdx.x < Tiles::kProducerThreads) {
    // Producer warpgroup: K/V tile `it` (counted over the CTA's tiles) into stage it % kStages
    // once both consumers released the tile that used it before, then an arrival on its "full"
    // barrier when the copies have landed.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(
        kGathered ? Tiles::kGatheredProducerRegisters : Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    auto producers_sync = [] { asm volatile("bar.sync 2, %0;\n" ::"n"(kLoaders) : "memory"); };
    const auto k_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_k, false);
    const auto v_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_vt, true);
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    auto* s_q = reinterpret_cast<uint16_t*>(smem_q);
    auto* s_k = reinterpret_cast<uint16_t*>(smem_k);
    auto* s_v = reinterpret_cast<uint16_t*>(smem_v);
    int tile = order.first();
    int it = 0;
#pragma unroll 1
    for (int t = 0;; ++t) {
      // Tile t's number, once the consumers are done with tile t - 1's number and Q.
      if (t > 0) mbarrier_wait(q_empty, (t - 1) & 1);
      if (threadIdx.x == 0) {
        s_tile[0] = tile;
        mbarrier_arrive(tile_full);
      }
      if (tile >= order.total) break;
      int m, split, h, b;
      order.decode(tile, m, split, h, b);
      // Q rows: never GQA-packed here (use_sm90_forward), so tile row r is query m kBlockM + r.
      load_rows_async<kHeadDim, kBlockM, kLoaders>(
          s_q, q_dst.first, q_dst.step,
          static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s,
          m * kBlockM, p.seqlen_q, p.head_dim, q_dst.half);
      mbarrier_arrive_on_copies(q_full);

      const int hk = h / p.group;
      const List list(p, b, h / p.map.head_group, m, split);
      const int tiles = list.end - list.begin;
      const uint8_t* bias_row = staged_bias_row(m, h, b);
      const float* gathered_bias = gathered_bias_row(m, h, b);
      const int32_t* key_last = kGathered ? p.row_end.key_last_row(b, h) : nullptr;
      const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
      const auto* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
      int n_next = tiles > 0 ? list.at(list.begin) : 0;
      // Steps: the walk runs a step ahead, so that each step knows whether it is the last.
      std::conditional_t<kPaired, PairedWalk, std::conditional_t<kKeyPairs, KeyPairWalk, NoList>>
          walk(p, b, h / p.map.head_group, m, split);
      int walk_status = 0;
      bool walk_more = false, done = false;
      if constexpr (kSteps) walk_more = walk.next(n_next, walk_status);
#pragma unroll 1
      for (int j = 0; kSteps ? !done : j < tiles; ++j, ++it) {
        const int stage = it % kStages;
        int n_block = n_next, status = 0;
        if constexpr (kSteps) {
          status = walk_status;
          if (!walk_more) {  // a tile without steps: one empty step
            n_block = -1;
            status = kStepLast;
          } else if (!(walk_more = walk.next(n_next, walk_status))) {
            status |= kStepLast;
          }
          done = status & kStepLast;
        } else {
          n_next = j + 1 < tiles ? list.at(list.begin + j + 1) : 0;
        }
        // Key pairs: a step with one half listed copies that half alone, the other zero (cp.async
        // zero fill; its V must not be stale or unwritten shared memory, which P = 0 would not
        // cancel if it held a NaN).
        [[maybe_unused]] const bool both_halves = (status & kStepHalves) == kStepHalves;
        if (it >= kStages) mbarrier_wait(&empty_bar[stage], (it / kStages - 1) & 1);
        if constexpr (kSteps) {
          if (threadIdx.x == 0) {
            s_step[stage] = make_int2(n_block, status);
            mbarrier_arrive(&full_bar[stage]);
          }
          if (n_block < 0) {  // the ring (both rings) takes the step, without data
            mbarrier_arrive(&full_bar[stage]);
            if constexpr (kPaired) {
              if (it >= kStages) mbarrier_wait(&empty_v[stage], (it / kStages - 1) & 1);
              mbarrier_arrive(&full_v[stage]);
            }
            continue;
          }
        }
        // The lean walks' tiles are whole but for a 128-key step's second half at the keys' end.
        if (kLean ? kLeanBias : bias_staged(bias_row, n_block)) {
          copy_key_bias_async<kBlockN>(bias_row, n_block, bias_bytes,
                                       s_bias + stage * Tiles::kBiasStageBytes,
                                       p.seqlen_k - n_block * kBlockN);
        }
        if constexpr (kGathered) {
          static_assert(kLoaders == 2 * kBlockN, "two producer threads per column");
          stage_gathered_columns<kBlockN>(
              list.slots + n_block * kBlockN, key_last, gathered_bias, p.bias_stride[3],
              s_slot + stage * kBlockN, s_key_last + stage * kBlockN,
              reinterpret_cast<float*>(s_bias + stage * Tiles::kBiasStageBytes));
          load_gathered_rows_async<kHeadDim, kBlockN, kLoaders>(
              s_k + stage * kStageElems, k_dst, s_v + stage * kStageElems, v_dst, k,
              p.k_stride_s, v, p.v_stride_s, list.slots + n_block * kBlockN, p.head_dim);
        }
        if constexpr (kStagedBias) {
          load_bias_tile_async<kBlockM, kLoaders>(
              s_staged_bias + stage * Tiles::kStagedBiasStageElems,
              static_cast<const uint16_t*>(p.bias) + b * p.bias_stride[0] +
                  (h / p.bias_head_group) * p.bias_stride[1] + n_block * kBlockN,
              p.bias_stride[2], m * kBlockM, p.seqlen_q, p.seqlen_k - n_block * kBlockN);
        }
        // A tile that needs no V check comes by TMA where the call has tensor maps (one thread
        // issues its 64 x 64 boxes; rows past the keys and columns past the head dim are zeros,
        // as cp.async's zero fill gives); a partial tile that checks V is copied with cp.async,
        // whose completion the producer waits for before scanning it. The consumers derive the
        // same choice before their fence: the two conditions must stay alike. (One shared lambda
        // for both changed ptxas's spills, 184 -> 194 bytes at D = 128, unmeasured on a card.)
        bool fast;
        if constexpr (kPaired) {
          fast = !(status & kStepPartialAny) || !check_v;
        } else {
          fast = list.begin + j < list.n_full || !check_v;
        }
        if constexpr (!kGathered) {
          if (Tiles::kTmaKv && fast && tma.enabled && (!kKeyPairs || both_halves)) {
            if (threadIdx.x == 0) {
              mbarrier_expect_tx(&full_bar[stage], (kPaired ? 1 : 2) * kStageElems * 2);
              // Box (c, r): columns [64 c, 64 c + 64) of the tile's keys [64 r, 64 r + 64).
#pragma unroll
              for (int c = 0; c < kHeadDim / 64; ++c)
#pragma unroll
                for (int r = 0; r < kBlockN / 64; ++r) {
                  const int at = stage * kStageElems + c * kBlockN * 64 + r * 64 * 64;
                  tma_load_4d(smem_k + at, tma.k, 64 * c, n_block * kBlockN + 64 * r, hk, b,
                              &full_bar[stage]);
                  if constexpr (!kPaired) {
                    tma_load_4d(smem_v + at, tma.v, 64 * c, n_block * kBlockN + 64 * r, hk, b,
                                &full_bar[stage]);
                  }
                }
            }
          } else if constexpr (kKeyPairs) {
            // Half r: rows [64 r, 64 r + 64) of every 64-column block, 64 x 64 elements in.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int limit = (status >> r) & 1 ? p.seqlen_k : 0;
              const int at = stage * kStageElems + r * 64 * 64;
              load_rows_async<kHeadDim, 64, kLoaders>(s_k + at, k_dst.first, k_dst.step, k,
                                                      p.k_stride_s, n_block * kBlockN + 64 * r,
                                                      limit, p.head_dim, k_dst.half);
              load_rows_async<kHeadDim, 64, kLoaders>(s_v + at, v_dst.first, v_dst.step, v,
                                                      p.v_stride_s, n_block * kBlockN + 64 * r,
                                                      limit, p.head_dim, v_dst.half);
            }
          } else {
            load_rows_async<kHeadDim, kBlockN, kLoaders>(
                s_k + stage * kStageElems, k_dst.first, k_dst.step, k, p.k_stride_s,
                n_block * kBlockN, p.seqlen_k, p.head_dim, k_dst.half);
            if constexpr (!kPaired) {
              load_rows_async<kHeadDim, kBlockN, kLoaders>(
                  s_v + stage * kStageElems, v_dst.first, v_dst.step, v, p.v_stride_s,
                  n_block * kBlockN, p.seqlen_k, p.head_dim, v_dst.half);
            }
          }
        }
        // Paired tiles: K (and the bias) complete on the K ring; V, once its slot is free, on
        // the V ring.
        uint64_t* v_full = &full_bar[stage];
        if constexpr (kPaired) {
          mbarrier_arrive_on_copies(&full_bar[stage]);
          v_full = &full_v[stage];
          if (it >= kStages) mbarrier_wait(&empty_v[stage], (it / kStages - 1) & 1);
          if (Tiles::kTmaKv && fast && tma.enabled) {
            if (threadIdx.x == 0) {
              mbarrier_expect_tx(v_full, kStageElems * 2);
#pragma unroll
              for (int c = 0; c < kHeadDim / 64; ++c) {
                tma_load_4d(smem_v + stage * kStageElems + c * kBlockN * 64, tma.v, 64 * c,
                            n_block * kBlockN, hk, b, v_full);
              }
            }
          } else {
            load_rows_async<kHeadDim, kBlockN, kLoaders>(
                s_v + stage * kStageElems, v_dst.first, v_dst.step, v, p.v_stride_s,
                n_block * kBlockN, p.seqlen_k, p.head_dim, v_dst.half);
          }
        }
        if (fast) {
          mbarrier_arrive_on_copies(v_full);
          continue;
        }
        // A partial tile: its V rows holding NaN / Inf are marked in s_nonfinite[stage] and
        // zeroed before the consumers see the stage (add_nonfinite_keys). The producer waits for
        // its own copies here, on partial tiles only. Each thread scans the chunks it copied:
        // rows threadIdx.x / kChunks + k * kRowsPerPass (both halves at D = 256).
        constexpr int kChunks = gmma_load_chunks(kHeadDim), kRowsPerPass = kLoaders / kChunks;
        constexpr int kHalves = gmma_load_halves(kHeadDim);
        if (threadIdx.x == 0) s_nonfinite[stage] = 0;
        cp_async_fence();
        cp_async_wait<0>();
        producers_sync();
        uint16_t* sv = s_v + stage * kStageElems;
        uint64_t mine = 0;
#pragma unroll 1
        for (int k = 0; k < kBlockN / kRowsPerPass; ++k) {
#pragma unroll
          for (int hh = 0; hh < kHalves; ++hh) {
            const uint4 x = *reinterpret_cast<const uint4*>(sv + v_dst.first + k * v_dst.step +
                                                            hh * v_dst.half);
            if (chunk_nonfinite<Elt>(x)) {
              mine |= 1ull << (int(threadIdx.x) / kChunks + k * kRowsPerPass);
            }
          }
        }
        if (mine) atomicOr(&s_nonfinite[stage], static_cast<unsigned long long>(mine));
        producers_sync();
        const uint64_t nonfinite = s_nonfinite[stage];
        if (nonfinite != 0) {
#pragma unroll 1
          for (int k = 0; k < kBlockN / kRowsPerPass; ++k) {
            if ((nonfinite >> (int(threadIdx.x) / kChunks + k * kRowsPerPass)) & 1) {
#pragma unroll
              for (int hh = 0; hh < kHalves; ++hh) {
                *reinterpret_cast<uint4*>(sv + v_dst.first + k * v_dst.step + hh * v_dst.half) =
                    make_uint4(0, 0, 0, 0);
              }
            }
          }
          fence_async_shared();  // the zeros, before the consumers' wgmma reads them
        }
        mbarrier_arrive(v_full);
      }
      // The next tile, fetched by one thread for the warpgroup (two slots: a slot is written
      // again only after every producer thread passed the barrier that follows its read).
      if (threadIdx.x == 0) s_tile[1 + (t & 1)] = order.next();
      producers_sync();
      tile = s_tile[1 + (t & 1)];
    }
    cp_async_wait<0>();
    return;
  }

  // Consumer warpgroups: 64 rows each, no barrier between them.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(
      kGathered ? Tiles::kGatheredConsumerRegisters : Tiles::kConsumerRegisters));
  const int wg = uniform_warpgroup(Tiles::kProducerThreads);  // warp-uniform
  const int ct = wg * 128 + int(threadIdx.x % 128u);  // 0 .. kConsumerThreads - 1
  const int warp = ct / 32;  // consumer warp w holds rows 16 w .. 16 w + 15
  auto* s_q = reinterpret_cast<uint16_t*>(smem_q);

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaO mma_o;
  // The smem operands' descriptors depend on the warpgroup alone: the slices are taken at its
  // first thread, a warp-uniform index, so that they are computed in uniform registers.
  auto thr_s = mma_s.get_thread_slice(wg * 128);
  auto thr_o = mma_o.get_thread_slice(wg * 128);
  // Q (the thread's A fragments of S = Q K^T) in registers. An RS A fragment of k-block kb holds,
  // in register order (v0, v1, v2), row 16 warp + g + 8 v1 and column 16 kb + 8 v2 + 2 t + v0:
  // the mma.sync A layout, so each (v1, v2) pair of values is one 32-bit shared-memory read. At
  // D = 256 the fragments are descriptors of Q in shared memory.
  auto tSrQ = [&] {
    if constexpr (Tiles::kQInRegisters) {
      return make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHeadDim / 16>>>{});
    } else {
      return thr_s.partition_fragment_A(
          make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{}));
    }
  }();
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  static_assert(decltype(size(tSrS))::value == kNTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tOrO))::value == kDTiles * 4, "one 16-row C fragment per warp");
  // P as the A operand of the RS wgmma: the C fragment of key columns 16 kk .. 16 kk + 15 is, value
  // for value, the A fragment of k-block kk (both layouts are ((2, 2, 2), ...) over the same rows
  // and columns), so the conversion is an element-wise cast in register order.
  Tensor tOrP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>>{});
  auto o_at = [&](int, int d, int e) -> float& { return tOrO(4 * d + e); };
  // Software pipeline, per warpgroup: iteration j issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1}
  // (both asynchronous), waits for S_j only, and runs the softmax of tile j while the tensor cores
  // work on P_{j-1} V_{j-1}; then it waits for that product, releases stage j - 1 to the producer
  // and rescales O for tile j. The two consumer warpgroups never wait for each other.
  auto issue_pv = [&](int stage) {
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrO);
    }
    warpgroup_commit_batch();
  };
  const bool release_lane = ct % 32 == 0;
  int it = 0;  // K/V tiles consumed so far, over every tile of the CTA
#pragma unroll 1
  for (int t = 0;; ++t) {
    mbarrier_wait(tile_full, t & 1);
    const int tile = s_tile[0];
    if (tile >= order.total) break;
    int m, split, h, b;
    order.decode(tile, m, split, h, b);
    const int hk = h / p.group;
    const List list(p, b, h / p.map.head_group, m, split);
    const int tiles = list.end - list.begin;
    const WarpRows wr(p, m, kBlockM, h, b, warp * 16);
    // Whether the tile's whole key tiles need no element work before the softmax (no softcap,
    // no bias, the scale folded into its exp2): decided once here, so that such a key tile skips
    // the logits' chain of parameter checks (a constant load and a branch each; docs/perf.md,
    // twenty-first session).
    const bool plain = p.softcap_in == 0.0f && !wr.prescaled && p.bias == nullptr;
    const uint8_t* bias_row = staged_bias_row(m, h, b);
    const float* gathered_bias = gathered_bias_row(m, h, b);
    // Whether a whole key tile's only element work is its staged query-invariant bias (no
    // softcap, no prescaled scores, no per-row top-k): then add_column_bias alone, without
    // logits' checks.
    const bool column_bias = !wr.prescaled && p.row_topk.key == nullptr &&
                             (kGathered ? gathered_bias != nullptr : bias_row != nullptr);

    // Q into registers; then the producer may copy the next tile's Q over it. At D = 256 the
    // products read it from shared memory until the tile's last S.
    mbarrier_wait(q_full, t & 1);
    if constexpr (!Tiles::kQInRegisters) {
      fence_async_shared();  // the producer's cp.async writes, before wgmma reads them
    } else {
      const int row = warp * 16 + wr.g;
      auto* q_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tSrQ.data()));
#pragma unroll
      for (int kb = 0; kb < kHeadDim / 16; ++kb)
#pragma unroll
        for (int v2 = 0; v2 < 2; ++v2)
#pragma unroll
          for (int v1 = 0; v1 < 2; ++v1) {
            const int col = 16 * kb + 8 * v2 + 2 * wr.t;
            q_regs[4 * kb + 2 * v2 + v1] =
                *reinterpret_cast<const uint32_t*>(s_q + gmma_offset(layout_q, row + 8 * v1, col));
          }
      __syncwarp();
      if (release_lane) mbarrier_arrive(q_empty);
    }

    float row_max[1][2] = {{-INFINITY, -INFINITY}}, row_sum[1][2] = {{0.0f, 0.0f}};
    // The thread's two rows' visible ends (compacted row bounds: a load each; the lean walk's
    // causal bounds), the same every tile.
    int row_end[1][2] = {{0, 0}};
    if constexpr (kGathered || kLean) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        int i, head;
        wr.row_of(0, r, i, head);
        row_end[0][r] = visible_end(p, b, head, i);
      }
    }
    clear(tOrO);

    int n = tiles > 0 ? list.at(list.begin) : 0;
    int n_next = tiles > 1 ? list.at(list.begin + 1) : 0;
    // Paired tiles (the loop's j counts the CTA's steps, some of which are the other plan tile's
    // alone): this warpgroup's step bits, the P V still to issue (its stage, the phase its V
    // completes in, whether cp.async wrote that V), and the steps the tile took.
    [[maybe_unused]] const int plan_shift = 2 * (warp / 4);
    [[maybe_unused]] bool pending = false, pending_fence = false;
    [[maybe_unused]] int pending_stage = 0;
    [[maybe_unused]] uint32_t pending_parity = 0;
    int steps = tiles;
    // Key pairs: the step's status (kStepHalves, kStepDrops), and whether the tile had a step
    // with keys (a tile without publishes one empty step).
    [[maybe_unused]] int pair_status = 0;
    [[maybe_unused]] bool walked = false;
#pragma unroll 1
    for (int j = 0; kSteps || j < tiles; ++j) {
      const int stage = (it + j) % kStages;
      const int n_after = j + 2 < tiles ? list.at(list.begin + j + 2) : 0;
      mbarrier_wait(&full_bar[stage], ((it + j) / kStages) & 1);
      // Paired tiles: whether the key tile is partial to this warpgroup's rows, and to any of
      // the CTA's (the stage's step record).
      [[maybe_unused]] bool partial_mine = false, partial_any = false, last = false;
      if constexpr (kPaired) {
        const int2 record = s_step[stage];
        n = record.x;
        const int mine = (record.y >> plan_shift) & 3;
        partial_mine = mine == kStepPartial;
        partial_any = record.y & kStepPartialAny;
        last = record.y & kStepLast;
        // The pending P V's V (it is issued below, after this tile's S).
        if (pending) mbarrier_wait(&full_v[pending_stage], pending_parity);
        if (mine == 0) {
          // Not this plan tile's: the P V still pending goes first (its V slot must be released
          // before the producer can fill the next one), then the stage goes back unread, on
          // both rings (V once it landed: an arrival must not count towards the slot's
          // previous use).
          if (pending) {
            if (pending_fence) fence_async_shared();
            issue_pv(pending_stage);
            warpgroup_wait<0>();
            warpgroup_fence_operand(tOrO);
            if (release_lane) mbarrier_arrive(&empty_v[pending_stage]);
            pending = false;
          }
          mbarrier_wait(&full_v[stage], ((it + j) / kStages) & 1);
          __syncwarp();  // every lane has read the step record
          if (release_lane) {
            mbarrier_arrive(&empty_bar[stage]);
            mbarrier_arrive(&empty_v[stage]);
          }
          if (last) {
            steps = j + 1;
            break;
          }
          continue;
        }
        // A partial tile's non-finite V keys are read after the softmax (s_nonfinite).
        if (check_v && partial_any) mbarrier_wait(&full_v[stage], ((it + j) / kStages) & 1);
      } else if constexpr (kKeyPairs) {
        const int2 record = s_step[stage];
        n = record.x;
        pair_status = record.y;
        last = record.y & kStepLast;
        if (n < 0) {  // a tile without keys: its one step goes back unread
          __syncwarp();  // every lane has read the record
          if (release_lane) mbarrier_arrive(&empty_bar[stage]);
          steps = j + 1;
          break;
        }
        walked = true;
      }
      // The producer's cp.async writes (the generic proxy), before wgmma reads them. A tile that
      // came by TMA was written by the async proxy and completed on the mbarrier: no fence (1.6%
      // of the dense D = 128 forward without a mask, docs/perf.md). The producer's `fast` and
      // TMA test, restated: a tile cp.async wrote must be fenced.
      bool by_tma;
      if constexpr (kPaired) {
        by_tma = Tiles::kTmaKv && tma.enabled && (!partial_any || !check_v);
      } else if constexpr (kKeyPairs) {  // a step of one half came by cp.async
        by_tma = Tiles::kTmaKv && tma.enabled && (pair_status & kStepHalves) == kStepHalves;
      } else {
        by_tma = Tiles::kTmaKv && tma.enabled && !kGathered &&
                 (list.begin + j < list.n_full || !check_v);
      }
      if (!by_tma || (kPaired && pending_fence)) fence_async_shared();

      warpgroup_fence_operand(tSrS);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
        gemm(mma_s, tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      const int prev_stage = kPaired ? pending_stage : (it + j + kStages - 1) % kStages;
      const bool has_prev = kPaired ? pending : j > 0;
      if (kPaired ? pending : j > 0) {
        issue_pv(prev_stage);
        // S_j (groups retire in order); at D = 256 P_{j-1} V_{j-1} too (kSoftmaxAfterPv).
        warpgroup_wait<Tiles::kSoftmaxAfterPv ? 0 : 1>();
      } else {
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(tSrS);
      // Q in shared memory over one plan tile (kEarlyQ): after the tile's last S the producer may
      // copy the next tile's Q while this one's softmax, P V and write-out run.
      if constexpr (kEarlyQ) {
        if ((kKeyPairs ? last : j + 1 == tiles) && release_lane) mbarrier_arrive(q_empty);
      }
      // Paired tiles: P_{j-1} V_{j-1} is done, and V_{j-1}'s slot goes back.
      if constexpr (kPaired) {
        if (has_prev && release_lane) mbarrier_arrive(&empty_v[prev_stage]);
      }

      float s[1][kNTiles][4];
#pragma unroll
      for (int c = 0; c < kNTiles; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][c][e] = tSrS(4 * c + e);
      const bool partial = kPaired      ? partial_mine
                           : kKeyPairs ? (pair_status & kStepDrops) != 0
                                       : list.begin + j >= list.n_full;
      if constexpr (kLean) {
        // Every key tile whole, the bias (if any) staged with it: its values, then a partial
        // tile's causal bound.
        if constexpr (kLeanBias) {
          add_column_bias<Elt>(s[0], s_bias + stage * Tiles::kBiasStageBytes, p.bias_is_fp32,
                               wr.t, wr.bias_factor);
        }
        if (partial) drop_keys_from<kNTiles>(s[0], n * kBlockN, row_end[0], wr.t);
        if constexpr (kKeyPairs) {
          if ((pair_status & kStepHalves) != kStepHalves) {
            drop_halves<kNTiles>(s[0], pair_status & kStepHalves);
          }
        }
      } else if (plain && !partial && (kGathered || (n + 1) * kBlockN <= p.seqlen_k)) {
        // A whole tile of plain scores: nothing to add or drop (the scale is in the exp2).
      } else if (column_bias && !partial && (kGathered || bias_staged(bias_row, n))) {
        add_column_bias<Elt>(s[0], s_bias + stage * Tiles::kBiasStageBytes, p.bias_is_fp32, wr.t,
                             wr.bias_factor);
      } else if constexpr (kGathered) {
        wr.logits<1, kNTiles, Elt>(
            s, 0, partial,
            gathered_bias != nullptr ? s_bias + stage * Tiles::kBiasStageBytes : nullptr, nullptr,
            s_key_last + stage * kBlockN, row_end, s_slot + stage * kBlockN);
      } else {
        wr.logits<1, kNTiles, Elt>(
            s, n * kBlockN, partial,
            bias_staged(bias_row, n) ? s_bias + stage * Tiles::kBiasStageBytes : nullptr,
            kStagedBias ? s_staged_bias + stage * Tiles::kStagedBiasStageElems : nullptr);
      }
      // Paired tiles: K_j's slot (with the tile's bias) goes back once the warp's logits read it.
      if constexpr (kPaired) {
        __syncwarp();
        if (release_lane) mbarrier_arrive(&empty_bar[stage]);
      }
      float correction[1][2];
      // (The lean walks never prescale: their scale, not WarpRows' select of it per step.)
      softmax_step(s, kLean ? p.scale_log2 : wr.exp_scale, row_max, row_sum, correction);
      if constexpr (Tiles::kPinSoftmax) {
        pin_before_wait(&s_tile[3], row_sum[0][0] + row_sum[0][1], ct == 0);
      }

      warpgroup_wait<0>();  // P_{j-1} V_{j-1}: tOrP, tOrO and stage j - 1 are free again
      warpgroup_fence_operand(tOrO);
      if (!kPaired && has_prev && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);
      auto* p_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
#pragma unroll
      for (int c = 0; c < kNTiles; ++c) {
        p_regs[2 * c] = Elt::pack(s[0][c][0], s[0][c][1]);
        p_regs[2 * c + 1] = Elt::pack(s[0][c][2], s[0][c][3]);
      }
      rescale_rows<1, kDTiles>(o_at, correction);
      // A partial tile's non-finite V keys, zeroed in the stage: at D = 256 also where the tile is
      // whole to these rows but partial to the other plan tile's.
      bool check_tile;
      if constexpr (kPaired) {
        check_tile = check_v && partial_any;
      } else {
        check_tile = check_v && list.begin + j >= list.n_full;
      }
      if (check_tile) {
        const uint64_t nonfinite = s_nonfinite[stage];
        if (nonfinite != 0) {
          const auto* v_head =
              static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
          if constexpr (kGathered) {  // tile column c is slot s_slot[c]
            add_nonfinite_keys<1, kNTiles, kDTiles, Elt>(nonfinite, s, o_at, v_head,
                                                         p.v_stride_s, p.head_dim,
                                                         s_slot + stage * kBlockN);
          } else {
            add_nonfinite_keys<1, kNTiles, kDTiles, Elt>(
                nonfinite, s, o_at, v_head + int64_t(n) * kBlockN * p.v_stride_s, p.v_stride_s,
                p.head_dim);
          }
        }
      }
      n = n_next;
      n_next = n_after;
      if constexpr (kKeyPairs) {
        if (last) {
          steps = j + 1;
          break;
        }
      }
      if constexpr (kPaired) {
        pending = true;
        pending_stage = stage;
        pending_parity = ((it + j) / kStages) & 1;
        pending_fence = !by_tma;
        if (last) {
          steps = j + 1;
          break;
        }
      }
    }
    // The last tile's P V, then its stage goes back.
    if (kPaired ? pending : kKeyPairs ? walked : tiles > 0) {
      const int last_stage = kPaired ? pending_stage : (it + steps - 1) % kStages;
      if constexpr (kPaired) {
        mbarrier_wait(&full_v[last_stage], pending_parity);
        if (pending_fence) fence_async_shared();
      }
      issue_pv(last_stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      if (release_lane) mbarrier_arrive(kPaired ? &empty_v[last_stage] : &empty_bar[last_stage]);
    }
    // Q in shared memory: every S of the tile has been waited for (kEarlyQ: released at the last
    // one, unless the tile had none).
    if (!Tiles::kQInRegisters && release_lane &&
        (!kEarlyQ || !(kKeyPairs ? walked : tiles > 0))) {
      mbarrier_arrive(q_empty);
    }
    it += steps;
    float o[1][kDTiles][4];
#pragma unroll
    for (int d = 0; d < kDTiles; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][d][e] = tOrO(4 * d + e);
    wr.write<kHeadDim, 1, Elt>(o, row_max, row_sum, split);
  }
}

// kCheckV: whether partial tiles check their V tile for NaN / Inf. They must unless the call knows
// V has none (ForwardParams::v_nonfinite: the V check ahead of a persistent launch, or a compacted
// call's gather, both on the device). Such a call launches both instantiations (launch_forward),
// and each returns at once unless the flag calls for it: compiled without the check, the walk is
// 4-6% faster on block selections (1-4% on dense GQA) even where no tile would run it (H200,
// docs/perf.md, thirty-first session); one kernel holding both walks behind a runtime branch got
// about half of that.
//
// kLean: a walk for calls whose partial tiles drop keys by causality alone and whose every key
// tile is whole, with no bias or a query-invariant one staged with its tile (lean_forward_call,
// which the host decides from the call's features): their logits are the staged bias's fma and
// one compare per element on partial tiles, not WarpRows::logits, whose general paths (mask,
// softcap, per-row top-k, bias reads through strides) more than doubled the walk's code and,
// compiled in though never run, cost block selections 3-11% of their forward (H200,
// docs/perf.md, thirty-first and thirty-second sessions). Without the V check only.
//
// kBand: the lean walk over query blocks of causality's band of its own shape (sm90_band_rows;
// 128-key tiles where sm90_forward_wide; BandList); for calls whose plan lists nothing else
// (band_forward_call).
//
// kLeanBias (the lean walks'; true otherwise): whether the call has a bias, which
// lean_forward_call allows only query-invariant and with every row aligned, so that each of its
// tiles is staged and added: one walk adds it to every tile, the other has no bias code. A
// runtime branch on the tile's bias row in their place cost the dense D = 128 band walk 16
// register copies of S per step at the branch's join, and a compare and a branch (SASS,
// forty-first session); over the 64-key tiles the D = 64 walks had before the forty-fifth
// session, the split measured 7-9% slower (forty-second session).
template <int kHeadDim, class Elt, bool kStagedBias, bool kGathered = false, bool kCheckV = true,
          bool kLean = false, bool kBand = false, bool kLeanBias = true>
__global__ void __launch_bounds__(
    Sm90WalkTiles<kHeadDim, Elt, kLean, kBand>::kThreads, 1)
    forward_kernel_sm90(const __grid_constant__ ForwardParams p,
                        const __grid_constant__ KvTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if ((p.v_nonfinite == nullptr || *p.v_nonfinite != 0) != kCheckV) return;
  forward_sm90_cta<kHeadDim, Elt, kStagedBias, kGathered, kCheckV, kLean, kBand, kLeanBias>(p, tma);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

}  // namespace fsa::detail::cuda
