#pragma once
// Hopper fused backward: one pass computes dK, dV and dQ (five products per kept entry, where the
// dK/dV pass and the dQ pass of backward_kernel_sm90.cuh run seven), for kernel head dims 64 and
// 128.
//
// CTA (pair P of the plan's 64-key tiles, kv head hk, batch b) = one producer warpgroup + two
// consumer warpgroups; consumer w owns key tile 2P + w (16 key rows per warp, as the dK/dV pass).
// Both walk the same work: over the G query heads of hk, the query tiles that either key tile
// lists (BackwardParams::pair_list, built by pair_lists_kernel), in 64-query halves. The producer
// copies the two K and V tiles once, then streams each half's Q, dO, LSE, rowdot (and a staged
// 16-bit bias's 64 x 128 tile) through kStages cp.async stages. Per half, each consumer:
//
//   x^T  = K_w Q^T    SS wgmma (64 keys x 64 queries, K = head dim)
//   dP^T = V_w dO^T   SS wgmma
//   element passes -> P^T, dS^T (as the dK/dV pass; a warpgroup whose tile does not list the
//                     half's query tile skips them and its products, and its dS is zero; under
//                     softcap "dS" below is dX = dS (1 - t^2), and the column sums take dS)
//   dV  += P^T dO     RS wgmma
//   dK  += dS^T Q     RS wgmma
//   dS^T -> shared memory; both warpgroups meet (named barrier)
//   D = 128: dQ_w = dS K[:, 64 w .. 64 w + 63]   SS wgmma over both tiles' dS (K = 128 keys)
//            dQ_w -> shared memory (fp32, in fragment order); both meet again; one thread adds
//            the 64 x 128 tile into BackwardParams::dq_accum with one bulk reduction (TMA unit).
//   D = 64:  warpgroup j % 2 alone, for half j: dQ = dS K   SS wgmma over both tiles (all 64
//            columns: a 32-column half would sit inside one 128-byte swizzle atom of K), into
//            its own 64 x 64 tile of shared memory, which one of its threads adds into dq_accum;
//            the other warpgroup goes on to half j + 1 (dS is double-buffered by half).
//
// A 128-key CTA halves the reductions per entry against a 64-key one: at 64 keys, 4 bytes per
// (query, column) per key tile bound the pass at about 1.5 TB/s of fp32 sums into L2 on H200
// (docs/perf.md, fourteenth session). dq_convert_kernel then scales the sums into dq.
//
// Not for: deterministic=True (the sums' order varies), dQ-pass bias-gradient duties, per-row
// top-k; launch_backward keeps the two passes for those (fused_backward says where else).

#include "cuda/backward_kernel_sm90.cuh"
#include "cuda/experiments.h"

namespace fsa::detail::cuda {

// The kernel head dims with a fused backward.
constexpr bool has_fused_backward(int head_dim) { return head_dim == 64 || head_dim == 128; }

template <int kHeadDim_, class Elt>
struct Sm90FusedTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(has_fused_backward(kHeadDim), "the fused backward covers head dims 64 and 128");
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile: two per CTA
  static_assert(kBlockN == 64, "one consumer warpgroup owns one of the plan's key tiles");
  static constexpr int kHalf = 64;  // queries per step
  static constexpr int kHalves = kBlockM / kHalf;
  // dQ: at D = 128 warpgroup w computes columns 64 w .. 64 w + 63 over both key tiles; at D = 64
  // (kAlternate) warpgroup j % 2 computes all of half j's dQ over both key tiles (a 32-column half
  // would sit inside one 128-byte swizzle atom of K), and reduces it from its own tile of smem_dq,
  // while the other goes on to half j + 1. dS is then double-buffered by half: a warpgroup may
  // write half j + 1's dS while the other's products of half j still read that half's.
  static constexpr bool kAlternate = kHeadDim == 64;
  static constexpr int kDqCols = 64;  // dQ columns per warpgroup
  static_assert(kDqCols == (kAlternate ? kHeadDim : kHeadDim / 2),
                "a warpgroup's dQ columns are one 128-byte swizzle atom of K");
  static constexpr int kDsBuffers = kAlternate ? 2 : 1;  // of two tiles each
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // A consumer holds dK and dV (2 x 64 fp32 at D = 128), x^T and dP^T (2 x 32), P^T and dS^T
  // (2 x 16) and, once x^T and dP^T are dead, dQ (32): the dK/dV pass's split, 128 * 24 + 256 *
  // 240 = 64512.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static constexpr int kStages = 2;  // both consumers read every stage

  using T = typename CuteElement<Elt>::type;
  // One 64-key tile of K or V (keys x head dim), K-major: the A operand of x^T or dP^T. Tile w of
  // each at w * kTileElems.
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::_1>{}));
  static constexpr int kTileElems = kBlockN * kHeadDim;
  // 64 columns of a K tile as the (N = head dim, K = keys) MN-major B operand of dQ: column block
  // c of tile w starts at w * kTileElems + c * 64 * kBlockN (the K-major tile stores its 64-column
  // atoms one after the other; at D = 64 the tile is one block), and inside it key k, column d is
  // at k * 64 + d, as here.
  using SmemLayoutKt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kDqCols>, cute::Int<kBlockN>>{}, cute::Step<cute::_2, cute::_1>{}));
  // Q / dO halves per stage, as in the dK/dV pass (one copy, two views).
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHalf>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutQt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kHalf>, cute::Int<kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  // A warpgroup's dS (64 queries x its 64 keys), the MN-major A operand of dQ (queries
  // contiguous: a thread's two adjacent queries of one key are one 32-bit store of its dS^T
  // fragment). Tile w of buffer u at (2 u + w) * kDsElems.
  using SmemLayoutDs = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHalf>, cute::Int<kBlockN>, cute::Int<2 * kDsBuffers>>{}));
  static constexpr int kDsElems = kHalf * kBlockN;
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kHalf>, cute::Int<kHeadDim>>>()));
  using TiledMmaKV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kHalf>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
  using TiledMmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kDqCols>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::MN, cute::GMMA::Major::MN>()));
  static_assert(int(cute::cosize_v<SmemLayoutKV>) == kTileElems, "dense key tiles");
  static_assert(int(cute::cosize_v<SmemLayoutDs>) == 2 * kDsBuffers * kDsElems, "dense dS tiles");

  // Shared memory (bytes): K and V (2 tiles each), the Q / dO stages, dS (2 tiles per buffer), dQ
  // (fp32, 64 x 128: at D = 128 the one 64 x 128 tile, at D = 64 one 64 x 64 tile per warpgroup),
  // per stage LSE and rowdot, the barriers; then a staged bias's stages.
  static constexpr int kStageElems = kHalf * kHeadDim;
  static constexpr int kOffV = 2 * kTileElems * 2;
  static constexpr int kOffQ = 2 * kOffV;
  static constexpr int kOffDo = kOffQ + kStages * kStageElems * 2;
  static constexpr int kOffDs = kOffDo + kStages * kStageElems * 2;
  static constexpr int kOffDq = kOffDs + kDsBuffers * 2 * kDsElems * 2;
  static constexpr int kDqTileFloats = kHalf * kHeadDim;  // one bulk reduction
  static constexpr int kDqSmemFloats = kHalf * 128;
  static_assert(kDqSmemFloats >= (kAlternate ? 2 : 1) * kDqTileFloats, "dQ's tiles fit");
  static constexpr int kOffStats = kOffDq + kDqSmemFloats * 4;
  static constexpr int kOffBarriers = kOffStats + kStages * 2 * kHalf * 4;
  // The softmax pin experiment's word (pin_probabilities), allocated only when it is built.
  static constexpr int kOffPin = kOffBarriers + 2 * kStages * 8;
  static constexpr int kSmemBytes = kOffPin + ((FSA_SM90_SOFTMAX_PIN & 4) ? 8 : 0);
  static constexpr int kOffBias = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kBiasStageElems = 2 * kHalf * kBlockN;  // two SmemTile<64> per stage
  static constexpr int smem_bytes(bool staged_bias) {
    return staged_bias ? kOffBias + kStages * kBiasStageElems * 2 : kSmemBytes;
  }
  static_assert(smem_bytes(true) <= 227 * 1024, "fits an sm_90 CTA's shared memory");
  static_assert(kOffDs % 1024 == 0 && kOffDq % 16 == 0, "swizzled tiles 1024-byte aligned");
};

// The fused pass's work lists (BackwardParams::pair_list): CTA (pair P, list L) merges the
// transposed full and partial lists of key tiles 2P and 2P + 1 into one ascending list of query
// tiles with flags. Grid (n_pairs, lists), kThreads threads, m_blocks int32 of dynamic shared
// memory.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) pair_lists_kernel(
    const __grid_constant__ BackwardParams p, int32_t* pair_list, int32_t* pair_count) {
  constexpr int kWarps = kThreads / 32;
  extern __shared__ int32_t flags[];  // per query tile
  __shared__ int32_t warp_counts[kWarps];
  const int pair = int(blockIdx.x), list = int(blockIdx.y);
  const int m_blocks = p.map.m_blocks, n_blocks = p.map.n_blocks;
  for (int m = int(threadIdx.x); m < m_blocks; m += blockDim.x) flags[m] = 0;
  __syncthreads();
  // A compacted key mask's tiles past its count list nothing.
  const int tiles = p.map.kept_count != nullptr
                        ? (p.map.kept_count[list] + p.map.block_n - 1) / p.map.block_n
                        : n_blocks;
  for (int w = 0; w < 2 && 2 * pair + w < min(tiles, n_blocks); ++w) {
    const int64_t col = int64_t(list) * n_blocks + 2 * pair + w;
    const int n_full = p.map.full_count_t[col], n_partial = p.map.partial_count_t[col];
    for (int i = int(threadIdx.x); i < n_full; i += blockDim.x) {
      atomicOr(&flags[p.map.full_index_t[col * m_blocks + i]], 1 << (2 * w));
    }
    for (int i = int(threadIdx.x); i < n_partial; i += blockDim.x) {
      atomicOr(&flags[p.map.partial_index_t[col * m_blocks + i]], 3 << (2 * w));
    }
  }
  __syncthreads();
  const int64_t at = int64_t(list) * p.n_pairs + pair;
  int32_t* out = pair_list + at * m_blocks;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  int base = 0;
  for (int m0 = 0; m0 < m_blocks; m0 += kThreads) {
    const int m = m0 + int(threadIdx.x);
    const int f = m < m_blocks ? flags[m] : 0;
    const uint32_t ballot = __ballot_sync(0xffffffffu, f != 0);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int k = 0; k < kWarps; ++k) {
      offset += k < warp ? warp_counts[k] : 0;
      total += warp_counts[k];
    }
    if (f != 0) out[offset + __popc(ballot & ((1u << lane) - 1))] = m << 4 | f;
    base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) pair_count[at] = base;
}

// The fused pass's work: over the G query heads of kv head hk, this CTA's share of each head's
// pair list (as DkvWorkCursor shares a key tile's list), in kHalves halves per query tile. A
// half whose first query is past seqlen_q (the last query tile's second half when seqlen_q % 128
// is 1 .. 64) is not a step: it has no query, and dq_accum (64-row tiles) has no tile for it.
template <int kHalves, int kHalf>
struct PairCursor {
  const BackwardParams* p;
  int pair, mb, h_end;
  int h, idx, end, half;
  const int32_t* list;

  __device__ void load_head() {
    const int64_t at = (int64_t(mb) * p->map.map_heads + h / p->map.head_group) * p->n_pairs + pair;
    const int count = p->pair_count[at];
    const int log2 = dkv_shares(*p, h / p->group, mb).log2;
    const int split = dkv_cta(*p).x & ((1 << log2) - 1);
    idx = (count * split) >> log2;
    end = (count * (split + 1)) >> log2;
    list = p->pair_list + at * p->map.m_blocks;
  }
  __device__ void skip_empty_heads() {
    while (idx >= end && h + 1 < h_end) {
      ++h;
      half = 0;
      load_head();
    }
  }
  __device__ PairCursor(const BackwardParams& params, int pair_index, int hk, int b)
      : p(&params), pair(pair_index), mb(params.map.map_batch == 1 ? 0 : b),
        h_end((hk + 1) * params.group), h(hk * params.group), half(0) {
    load_head();
    skip_empty_heads();
  }
  __device__ bool done() const { return idx >= end; }
  __device__ int entry() const { return list[idx]; }  // m << 4 | flags
  __device__ void advance() {
    if (++half == kHalves || ((entry() >> 4) * kHalves + half) * kHalf >= p->seqlen_q) {
      half = 0;
      ++idx;
      skip_empty_heads();
    }
  }
};

// Adds `bytes` of shared memory at `src` into global fp32 at `dst` (TMA unit, bulk group).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, int bytes) {
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
      "cp.async.bulk.commit_group;\n" ::"l"(dst),
      "r"(smem_address(src)), "r"(bytes)
      : "memory");
}
// Waits until the bulk groups this thread committed have read their shared memory (kRead) or
// completed.
template <bool kRead>
__device__ __forceinline__ void bulk_wait_all() {
  if constexpr (kRead) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  } else {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
}

// kLean: the pass for calls whose entries causality alone drops, with no bias or a query-invariant
// one that is not staged (lean_fused_call, the host's choice): the per-key bias's values held per
// head (KeyRowBiasHeld) and, where a half needs a check, one compare pair per entry against each
// key row's interval of queries (keep_query_interval), as the lean dK/dV pass; the general
// element passes (mask, row bounds, staged or general bias) stay out of its code. kSoftcap ==
// (p.softcap_in != 0): the cap and dX = dS (1 - t^2) for dK and the dS tile of dQ (softcap_pass,
// apply_slope), never lean. kFinite: the lean pass's twin without guards (probabilities_t,
// BackwardParams::nonfinite).
template <int kHeadDim, class Elt, bool kLean = false, bool kSoftcap = false, bool kFinite = false>
__global__ void __launch_bounds__(Sm90FusedTiles<kHeadDim, Elt>::kThreads, 1)
    dkdvq_kernel_sm90(const __grid_constant__ BackwardParams p,
                      const __grid_constant__ QdoTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  static_assert(!kFinite || kLean, "the guard-free twin is the lean pass's");
  if constexpr (kLean) {
    if (pair_twin_runs<kFinite>(p)) return;
  }
  using Tiles = Sm90FusedTiles<kHeadDim, Elt>;
  using T = typename Tiles::T;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kHalf = Tiles::kHalf;
  constexpr int kStages = Tiles::kStages, kStageElems = Tiles::kStageElems;
  constexpr int kCTiles = kHalf / 8, kDTiles = kHeadDim / 8;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);
  T* smem_v = reinterpret_cast<T*>(smem_raw + Tiles::kOffV);
  T* smem_q = reinterpret_cast<T*>(smem_raw + Tiles::kOffQ);
  T* smem_do = reinterpret_cast<T*>(smem_raw + Tiles::kOffDo);
  T* smem_ds = reinterpret_cast<T*>(smem_raw + Tiles::kOffDs);
  float* smem_dq = reinterpret_cast<float*>(smem_raw + Tiles::kOffDq);
  float* s_lse = reinterpret_cast<float*>(smem_raw + Tiles::kOffStats);  // (kStages, kHalf)
  float* s_rdot = s_lse + kStages * kHalf;                              // (kStages, kHalf)
  auto* s_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kOffBias);
  // A stage is released by the eight consumer warps, once their products reading it retired.
  uint64_t* full_bar = init_stage_barriers<kStages, Tiles::kProducerThreads,
                                           Tiles::kConsumerThreads>(smem_raw + Tiles::kOffBarriers);
  uint64_t* empty_bar = full_bar + kStages;

  // Pair P = dkv_order[x >> log2 of the shares (DkvShares)] (x >> log2 itself without an
  // order); past a compacted key mask's count (its tiles' pairs) nothing is read or written.
  const DkvCta cta = dkv_cta(p);
  const int hk = cta.hk, b = cta.b;
  const DkvShares shares = dkv_shares(p, hk, b);
  const int rank = cta.x >> shares.log2;
  if (rank >= p.n_pairs) return;
  const int pair = dkv_unit(p, hk, b, rank, p.n_pairs);
  if (pair >= (shares.tiles + 1) / 2) return;
  const int key0 = pair * 2 * kBlockN;

  if (threadIdx.x < Tiles::kProducerThreads) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    const typename Tiles::SmemLayoutKV layout_kv;
    const typename Tiles::SmemLayoutQ layout_q;
    const auto kv_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_kv, false);
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    const auto* k_rows = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    const auto* v_rows = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
    // Rows past a compacted list's count are zeros: dQ multiplies both tiles' K by dS, and a zero
    // dS does not clear a non-finite K (slots past the count hold whatever the buffer held).
    const int key_limit = p.map.kept_count != nullptr ? min(p.seqlen_k, kept_count_of(p, hk, b))
                                                      : p.seqlen_k;
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      load_rows_async<kHeadDim, kBlockN, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_k) + w * Tiles::kTileElems, kv_dst.first, kv_dst.step,
          k_rows, p.k_stride_s, key0 + w * kBlockN, key_limit, p.head_dim);
      load_rows_async<kHeadDim, kBlockN, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_v) + w * Tiles::kTileElems, kv_dst.first, kv_dst.step,
          v_rows, p.v_stride_s, key0 + w * kBlockN, key_limit, p.head_dim);
    }
    auto* s_q = reinterpret_cast<uint16_t*>(smem_q);
    auto* s_do = reinterpret_cast<uint16_t*>(smem_do);
    PairCursor<Tiles::kHalves, Tiles::kHalf> cur(p, pair, hk, b);
    for (int j = 0; !cur.done(); ++j, cur.advance()) {
      const int stage = j % kStages, h = cur.h;
      const int q0 = (cur.entry() >> 4) * kBlockM + cur.half * kHalf;
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      load_step_rows_async<kHeadDim, kLoaders>(p, tma, s_q + stage * kStageElems,
                                               s_do + stage * kStageElems, q_dst, b, h, q0,
                                               &full_bar[stage]);
      load_step_stats_async<kFinite>(p, b, h, q0, s_lse + stage * kHalf, s_rdot + stage * kHalf);
      if (!kLean && p.bias_staged) {  // rows = the half's queries, columns = each tile's keys
#pragma unroll 1
        for (int w = 0; w < 2; ++w) {
          const int tile_key0 = key0 + w * kBlockN;
          load_bias_tile_async<kHalf, kLoaders>(
              s_bias + stage * Tiles::kBiasStageElems + w * kHalf * kBlockN,
              static_cast<const uint16_t*>(p.bias) + b * p.bias_stride[0] +
                  (h / p.bias_head_group) * p.bias_stride[1] + tile_key0,
              p.bias_stride[2], q0, p.seqlen_q, p.seqlen_k - tile_key0);
        }
      }
      mbarrier_arrive_on_copies(&full_bar[stage]);
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tiles::kConsumerRegisters));
  const int wg = uniform_warpgroup(Tiles::kProducerThreads);
  const int ct = int(threadIdx.x) % 128;
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;
  auto consumers_sync = [] {  // both consumer warpgroups (named barrier 1)
    asm volatile("bar.sync 1, %0;\n" ::"n"(Tiles::kConsumerThreads) : "memory");
  };
  auto own_sync = [wg] {  // this consumer warpgroup (named barrier 2 + wg)
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
  };
  // The thread that issues the bulk reductions of dQ: one per warpgroup at D = 64, where each
  // reduces the halves it computes from its own tile of smem_dq.
  const bool reducer = (Tiles::kAlternate || wg == 0) && ct == 0;
  float* dq_tile = smem_dq + wg * (kHalf * Tiles::kDqCols);

  Tensor sK = make_tensor(make_smem_ptr(smem_k + wg * Tiles::kTileElems),
                          typename Tiles::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v + wg * Tiles::kTileElems),
                          typename Tiles::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{});
  Tensor sDo = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQt{});
  Tensor sDot = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQt{});

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaKV mma_kv;
  typename Tiles::TiledMmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_kv = mma_kv.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(ct);
  Tensor tSrK = thr_s.partition_fragment_A(sK);        // (MMA, 1, MMA_K, 1)
  Tensor tSrV = thr_s.partition_fragment_A(sV);        // (MMA, 1, MMA_K, 1)
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);        // (MMA, 1, MMA_K, stage)
  Tensor tSrDo = thr_s.partition_fragment_B(sDo);      // (MMA, 1, MMA_K, stage)
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tKVrDot = thr_kv.partition_fragment_B(sDot);  // (MMA, MMA_N, MMA_K, stage)
  // dQ's operands: dS of key tile u (A: tile 2 buffer + u) and this warpgroup's 64 columns of K
  // tile u (B), u = 0, 1 (at D = 64 every column: K tile u itself).
  Tensor tDqrDs = thr_dq.partition_fragment_A(
      make_tensor(make_smem_ptr(smem_ds), typename Tiles::SmemLayoutDs{}));  // (.., tile)
  const int k_cols = Tiles::kAlternate ? 0 : wg * Tiles::kDqCols * kBlockN;
  Tensor tDqrK0 = thr_dq.partition_fragment_B(
      make_tensor(make_smem_ptr(smem_k + k_cols), typename Tiles::SmemLayoutKt{}));
  Tensor tDqrK1 = thr_dq.partition_fragment_B(
      make_tensor(make_smem_ptr(smem_k + Tiles::kTileElems + k_cols),
                  typename Tiles::SmemLayoutKt{}));
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kHalf>>{});   // x^T
  Tensor tSrDp = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kHalf>>{});  // dP^T
  Tensor tdK = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tdV = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tDq = partition_fragment_C(mma_dq, Shape<Int<kHalf>, Int<Tiles::kDqCols>>{});
  static_assert(decltype(size(tSrS))::value == kCTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tdK))::value == kDTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tDq))::value == 32, "one 16-row C fragment per warp");
  Tensor tP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  Tensor tDs = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  auto* p_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tP.data()));
  auto* ds_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tDs.data()));
  clear(tdK);
  clear(tdV);

  // Key rows (seqlen_k for a tile past the count's tiles: not written, not summed; its list is
  // empty, pair_lists_kernel).
  const int tile_key0 = key0 + wg * kBlockN;
  const bool tile_in = 2 * pair + wg < shares.tiles;
  const int key_row[2] = {tile_in ? tile_key0 + warp * 16 + g : p.seqlen_k,
                          tile_in ? tile_key0 + warp * 16 + g + 8 : p.seqlen_k};
  // Each warpgroup owns its keys' column sums: zeroed for every head, then added to (two fp32
  // additions onto zero: deterministic).
  ColumnSums<true> col;
  const ColumnSums<true>::Rows col_rows{b, t, {key_row[0], key_row[1]}};
  col.zero_heads(p, col_rows, hk);

  auto issue_ss = [&](auto& acc, const auto& a, const auto& bop, int stage) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) {
      gemm(mma_s, a(_, _, kb, 0), bop(_, _, kb, stage), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  auto issue_rs = [&](auto& acc, const auto& a, const auto& bop, int stage) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) gemm(mma_kv, a(_, _, kb), bop(_, _, kb, stage), acc);
    warpgroup_commit_batch();
  };

  const bool release_lane = lane == 0;
  PairCursor<Tiles::kHalves, Tiles::kHalf> cur(p, pair, hk, b);
  const bool by_key_row = KeyRowBias::applies(p);
  std::conditional_t<kLean, KeyRowBiasHeld, KeyRowBias> key_bias;
  // The lean pass's queries kept by each key row (the same over every head and query tile).
  int keep_lo[2] = {0, 0}, keep_hi[2] = {0, 0};
  if constexpr (kLean) {
#pragma unroll
    for (int r = 0; r < 2; ++r) causal_query_interval(p, key_row[r], keep_lo[r], keep_hi[r]);
  }
  for (int j = 0; !cur.done(); ++j, cur.advance()) {
    const int stage = j % kStages, h = cur.h;
    // Half j's dS buffer, and whether this warpgroup computes its dQ (both: at D = 128 each its
    // own columns).
    const int buffer = Tiles::kAlternate ? j & 1 : 0;
    const bool computes_dq = !Tiles::kAlternate || (j & 1) == wg;
    T* ds_tile = smem_ds + (2 * buffer + wg) * Tiles::kDsElems;
    const int entry = cur.entry();
    const bool active = (entry >> (2 * wg)) & 1;
    const int q0 = (entry >> 4) * kBlockM + cur.half * kHalf;
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    // What cp.async wrote, before wgmma reads it: K and V (complete with stage 0), and Q and dO
    // without tensor maps (by TMA they need no fence).
    if (j == 0 || !tma.enabled) fence_async_shared();
    if (active) {
      const bool check = ((entry >> (2 * wg + 1)) & 1) || tile_key0 + kBlockN > p.seqlen_k ||
                         q0 + kHalf > p.seqlen_q;
      col.switch_to<true>(p, col_rows, h);
      issue_ss(tSrS, tSrK, tSrQ, stage);
      issue_ss(tSrDp, tSrV, tSrDo, stage);
      warpgroup_wait<1>();  // x^T
      warpgroup_fence_operand(tSrS);
      auto& s = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrS.data()));
      const DkvIndex ix{{key_row[0], key_row[1]}, q0, t};
      uint32_t slope[kSoftcap ? 2 * kCTiles : 1];
      const float scale_left = key_row_logits<Elt, kLean, false, kSoftcap>(
          p, b, h, key_row, by_key_row, key_bias,
          s_bias + stage * Tiles::kBiasStageElems + wg * kHalf * kBlockN, warp * 16, check,
          keep_lo, keep_hi, ix, s, slope);
      probabilities_t<kFinite>(s, s_lse + stage * kHalf, t, scale_left);
      if constexpr ((FSA_SM90_SOFTMAX_PIN & 4) && kLean) {
        pin_probabilities<Elt>(s, smem_raw + Tiles::kOffPin, ct == 0 && wg == 0);
      }
      warpgroup_wait<0>();  // dP^T
      warpgroup_fence_operand(tSrDp);
      pack_pairs<Elt>(p_regs, s);
      auto& ds = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrDp.data()));
      ds_t<kFinite>(ds, s, s_rdot + stage * kHalf, t);
      if (p.bias_grad == BiasGrad::kColumns) col.add(ds);  // dbias takes dS, dK and dQ dX
      if constexpr (kSoftcap) apply_slope(ds, slope);
      pack_pairs<Elt>(ds_regs, ds);
      issue_rs(tdV, tP, tKVrDot, stage);
      issue_rs(tdK, tDs, tKVrQt, stage);
      // dS^T's entry (key row, query pair) is the pair (query, key) of the dS tile. Every read of
      // the tile (the dQ products of the last half that used this buffer) retired before a
      // warpgroup that issued them passed the barrier after them (D = 128: the last barrier below;
      // D = 64: the next half's first barrier). Key k's 64
      // queries are its 128-byte row, whose 16-byte chunk c holds queries 8 (c ^ (k % 8)) .. + 7
      // (gmma_offset's swizzle): here k % 8 = g, so query pair (8 c + 2 t) of key row r is at
      // ds_row ^ (c << 4) + 1024 r. (As gmma_offset calls, ptxas kept the 16 offsets across the
      // loop and spilled them.)
      if constexpr (FSA_SM90_DS_STSM) {
        // By stmatrix (FSA_SM90_DS_STSM): the 8 x 8 tile of key rows 8 r .. 8 r + 7 (of the
        // warp's 16) and queries 8 c .. 8 c + 7 is, value for value, stmatrix's fragment (thread
        // (g, t): row g, columns 2 t, 2 t + 1), and each of its rows one swizzled 16-byte chunk.
        // Instruction q stores registers 4 q .. 4 q + 3, the tiles c = 2 q + i / 2, r = i % 2
        // (consecutive registers: a quad of other ones took ptxas 14 moves); lane l gives the
        // address of row l % 8 of tile i = l / 8: chunk (2 q + i / 2) ^ (l % 8), i.e.
        // ((i / 2) ^ (l % 8)) ^ 2 q.
        static_assert(kCTiles == 8, "four instructions of four tiles");
        const int row = lane % 8, tile = lane / 8;
        const uint32_t at = smem_address(ds_tile) + (warp * 16 + row) * 128 + 1024 * (tile & 1) +
                            (((tile >> 1) ^ row) << 4);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                           at ^ (32 * q)),
                       "r"(ds_regs[4 * q]), "r"(ds_regs[4 * q + 1]), "r"(ds_regs[4 * q + 2]),
                       "r"(ds_regs[4 * q + 3])
                       : "memory");
        }
      } else {
        const uint32_t ds_row =
            smem_address(ds_tile) + (warp * 16 + g) * 128 + (g << 4) + 4 * t;
#pragma unroll
        for (int c = 0; c < kCTiles; ++c)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"((ds_row ^ (c << 4)) + 1024 * r),
                         "r"(ds_regs[2 * c + r])
                         : "memory");
          }
      }
    } else {
      // This tile does not list the half's query tile: no products, and its dS is zero.
#pragma unroll
      for (int k = 0; k < Tiles::kDsElems / 8 / 128; ++k) {
        reinterpret_cast<uint4*>(ds_tile)[k * 128 + ct] = make_uint4(0, 0, 0, 0);
      }
    }
    fence_async_shared();
    // The last dQ tile this thread reduced from its warpgroup's smem_dq was read out.
    if (reducer && computes_dq) bulk_wait_all<true>();
    consumers_sync();  // both dS tiles written; the dQ tile free
    if (computes_dq) {
      warpgroup_fence_operand(tDq);
      warpgroup_arrive();
      mma_dq.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int kb = 0; kb < size<2>(tDqrDs); ++kb) {
          gemm(mma_dq, tDqrDs(_, _, kb, 2 * buffer + u), (u == 0 ? tDqrK0 : tDqrK1)(_, _, kb),
               tDq);
          mma_dq.accumulate_ = GMMA::ScaleOut::One;
        }
      warpgroup_commit_batch();
      // dV and dK retired (issued before dQ, which reads K and dS, not the stage): the stage
      // goes back before dQ retires (D = 64 backward 7.90 -> 7.62 ms on H200; docs/perf.md).
      warpgroup_wait<1>();
      if (release_lane) mbarrier_arrive(&empty_bar[stage]);
      warpgroup_wait<0>();  // dQ: both dS tiles are free
      warpgroup_fence_operand(tDq);
    } else {
      warpgroup_wait<0>();  // dV and dK: the stage is free
      if (release_lane) mbarrier_arrive(&empty_bar[stage]);
    }
    if (computes_dq) {
      // Thread ct's value 4 d + e at 512 d + 4 ct + e of its warpgroup's tile (dq_convert_kernel
      // reads this order).
#pragma unroll
      for (int d = 0; d < Tiles::kDqCols / 8; ++d) {
        reinterpret_cast<float4*>(dq_tile)[d * 128 + ct] =
            make_float4(tDq(4 * d), tDq(4 * d + 1), tDq(4 * d + 2), tDq(4 * d + 3));
      }
      fence_async_shared();
      if constexpr (Tiles::kAlternate) {
        own_sync();  // the warpgroup's dQ tile written
      } else {
        consumers_sync();  // both warpgroups' columns written
      }
      if (reducer) {
        const int64_t tile =
            (int64_t(b) * p.num_heads + h) * ((p.seqlen_q + kHalf - 1) / kHalf) + q0 / kHalf;
        bulk_reduce_add_f32(p.dq_accum + tile * Tiles::kDqTileFloats,
                            Tiles::kAlternate ? dq_tile : smem_dq, Tiles::kDqTileFloats * 4);
      }
    }
  }
  if (reducer) bulk_wait_all<false>();
  warpgroup_fence_operand(tdK);
  warpgroup_fence_operand(tdV);
  col.flush<true>(p, col_rows);
  write_dkdv_rows<Elt, kDTiles>(p, cta, hk, b, key_row, t, tdK, tdV);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

// The fused pass's epilogue: dq = scale * dq_accum in the caller's layout and dtype. One thread
// per pair of adjacent values of dq_accum (columns c, c + 1 of one row).
//
// dq_accum's order inside a (b, h, 64-query) tile is the one the pass's warpgroups hold it in, so
// that their shared-memory stores (float4, thread-major) and the bulk reduction need no
// reordering: warpgroup w holds columns 64 w .. 64 w + 63 (at D = 64 one warpgroup holds all of
// them, w = 0), and its thread ct = 32 warp + 4 g + t holds rows 16 warp + g + 8 r, columns 64 w +
// 8 d + 2 t + e as its value 4 d + 2 r + e, at 4096 w + 512 d + 4 ct + 2 r + e.
template <class Elt, int kHeadDim>
__global__ void __launch_bounds__(256) dq_convert_kernel(const __grid_constant__ BackwardParams p) {
  static_assert(has_fused_backward(kHeadDim), "warpgroups of 64 dQ columns");
  constexpr int kTilePairs = 64 * kHeadDim / 2;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tile = index / kTilePairs;  // (b H + h) tiles + m64
  const int within = int(index % kTilePairs) * 2;
  const int tiles = (p.seqlen_q + 63) / 64;
  if (tile >= int64_t(p.batch) * p.num_heads * tiles) return;
  // within = 4096 w + 512 d + 4 ct + 2 rh (+ e = 0, 1).
  const int w = within / 4096, d = within % 4096 / 512, ct = within % 512 / 4, rh = within % 4 / 2;
  const int r = ct / 32 * 16 + ct % 32 / 4 + 8 * rh;
  const int c = w * 64 + d * 8 + 2 * (ct % 4);
  const int i = int(tile % tiles) * 64 + r;
  const int bh = int(tile / tiles), h = bh % p.num_heads, b = bh / p.num_heads;
  if (i >= p.seqlen_q || c >= p.head_dim) return;
  const float2 v = *reinterpret_cast<const float2*>(p.dq_accum + tile * (64 * kHeadDim) + within);
  auto* out = static_cast<typename Elt::Storage*>(p.dq) + b * p.dq_stride_b + h * p.dq_stride_h +
              int64_t(i) * p.dq_stride_s + c;
  const uint32_t packed = Elt::pack(v.x * p.scale, v.y * p.scale);
  if (c + 1 < p.head_dim && (reinterpret_cast<uintptr_t>(out) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(out) = packed;
    return;
  }
  *reinterpret_cast<uint16_t*>(out) = uint16_t(packed & 0xffffu);
  if (c + 1 < p.head_dim) *reinterpret_cast<uint16_t*>(out + 1) = uint16_t(packed >> 16);
}

}  // namespace fsa::detail::cuda
