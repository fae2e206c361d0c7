#pragma once
// Hopper backward passes at kernel head dim 256: the dK/dV pass (dkdv_kernel_sm90_wide), then the
// dQ pass (dq_kernel_sm90_wide). The block lists, work order, shares, element passes and dbias
// duties are those of dkdv_kernel_sm90 and dq_kernel_sm90 (backward_kernel_sm90.cuh); what
// differs is how the two consumer warpgroups share a step, because at D = 256 the accumulators of
// a whole 64-row tile (dK and dV, or dQ) take 128 fp32 registers per thread each.
//
// Not here: per-row top-k over compacted keys (gathered K / V rows: the dK/dV pass's groups and
// the dQ pass's gathered tiles); those calls run the sm80 passes (launch_sm90_dkdv,
// sm90_dq_kernel).

#include "cuda/backward_kernel_sm90.cuh"
#include "cuda/experiments.h"
#include "cuda/tma.h"

namespace fsa::detail::cuda {

// ------------------------------------------------------------------------------------------------
// dK/dV pass (dkdv_kernel_sm90_wide): CTA (64-key tile n, kv head hk, batch b) = one producer
// warpgroup + two consumer warpgroups in two roles. Warpgroup 1 holds dV (64 keys x 256 columns,
// 128 fp32 per thread) and warpgroup 0 holds dK; per 64-query step (the plan's query tile at
// D = 256; stage s):
//
//   warpgroup 1:  x^T  = K Q^T      SS wgmma (64 keys x 64 queries, K = head dim)
//                 element passes -> P^T (fp32) into shared memory for warpgroup 0
//                 dV  += P^T dO     RS wgmma (P^T from registers, N = 256)
//   warpgroup 0:  dP^T = V dO^T     SS wgmma
//                 P^T from shared memory -> dS^T (column sums for BiasGrad::kColumns)
//                 dK  += dS^T Q     RS wgmma
//
// Both warpgroups on every product instead (each computing x^T and dP^T for 32 of the step's
// queries, then dK and dV for 128 of the columns, with P^T and dS^T passed through shared memory
// in 16 bits: 03157c5) read about 370 KB of shared memory per step against 290 here (x^T and
// dP^T at N = 64; dV and dK with their A operands in registers), and measured 8.8 against
// 8.1 ms for the pass at (1, 16384, 16, 16, 256) causal on H200 (docs/perf.md). The warpgroups
// meet only where P^T passes: two fp32 buffers (by step parity) with named barriers "full"
// (warpgroup 1 wrote it) and "empty" (warpgroup 0 read it), so warpgroup 1 may run a step ahead.
// The P^T values pass in fragment order (thread ct of one warpgroup to thread ct of the other:
// x^T and dP^T have the same C layout), so dS^T is computed from the fp32 P^T as in the other
// passes.
//
// Shared memory: K and V 64 KB, two stages of Q and dO 128 KB, two fp32 P^T tiles 32 KB and the
// stages' statistics: 225 KB, no room for a staged bias (launch_sm90_dkdv clears bias_staged:
// the element pass reads such a bias from global memory).
//
// With two stages of 64 KB, the pass waits on its copies: the producer refills stage j - 1 once
// both warpgroups' RS products of step j - 1 retired, and step j + 1 needs it. So the producer
// copies Q and dO by TMA (one thread, (64 x 64) boxes; QdoTensorMaps, else cp.async), and a
// warpgroup gives the stage back as soon as its RS product retires, before waiting for the next
// S product. On H200 at (1, 16384, 16, 16, 256) causal (docs/perf.md): the early release 8.02 ->
// 7.80 ms, TMA 7.88 -> 7.35 ms; running the RS product under the next step's element passes
// instead (the release after them) took 10.55 ms.
template <class Elt>
struct Sm90DkvWideTiles {
  static constexpr int kHeadDim = 256;
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static_assert(kBlockM == 64 && kBlockN == 64, "one 64-query step per query tile, 64 keys");
  static constexpr int kHalf = 64;  // queries per step (DkvWorkCursor's half: the whole tile)
  static constexpr int kHalves = kBlockM / kHalf;
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // A consumer holds dK or dV (128 fp32), x^T or dP^T (32) and the packed A operand (16).
  // 128 * 56 + 256 * 224 = 64512 (spills: 24 bytes at 40 / 232, 4 at 56 / 224, 52 at 72 / 216).
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters = 224;
  static constexpr int kStages = 2;
  static constexpr int kPBuffers = 2;

  using T = typename CuteElement<Elt>::type;
  // K / V, Q / dO stages (and Q / dO as the MN-major B operand of dK / dV), the SS product x^T or
  // dP^T (N = 64) and the RS product dV or dK (N = 256).
  using Gmma = DkvGmmaTiles<T, kBlockN, kHalf, kHeadDim, kStages>;
  using SmemLayoutKV = typename Gmma::SmemLayoutKV;
  using SmemLayoutQ = typename Gmma::SmemLayoutQ;
  using SmemLayoutQt = typename Gmma::SmemLayoutQt;
  using TiledMmaS = typename Gmma::TiledMmaS;
  using TiledMmaKV = typename Gmma::TiledMmaKV;
  static constexpr int kSmemKV = Gmma::kSmemKV, kSmemQ = Gmma::kSmemQ;
  // P^T buffers: 64 x 64 fp32 each, in fragment order (value i of thread ct at i * 128 + ct).
  static constexpr int kPOffset = (2 * kSmemKV + 2 * kSmemQ) * 2;
  static constexpr int kPFloats = kBlockN * kHalf;
  // Per stage, the step's raw LSE and rowdot (fp32, 64 each).
  static constexpr int kStatsOffset = kPOffset + kPBuffers * kPFloats * 4;
  static constexpr int kBarrierOffset = kStatsOffset + kStages * 2 * kHalf * 4;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8;
  static_assert(kSmemBytes <= 227 * 1024, "fits an SM's opt-in shared memory");
};

// kRowTopK == (p.row_topk.key != null), as in dkdv_kernel_sm90. Never with a staged bias.
// kSoftcap == (p.softcap_in != 0): warpgroup 1 caps the logits (softcap_pass) and hands over each
// entry's P^T and slope 1 - t^2 as one fp16 pair in the P^T buffer's 32 bits (no room for a
// second buffer; P in [0, 1] keeps 11 bits), warpgroup 0 takes dS^T for the column sums and dX^T
// = dS^T (1 - t^2) for dK.
template <class Elt, bool kRowTopK, bool kSoftcap = false>
__global__ void __launch_bounds__(Sm90DkvWideTiles<Elt>::kThreads, 1)
    dkdv_kernel_sm90_wide(const __grid_constant__ BackwardParams p,
                          const __grid_constant__ QdoTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tiles = Sm90DkvWideTiles<Elt>;
  using T = typename Tiles::T;
  constexpr int kHeadDim = Tiles::kHeadDim, kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kHalf = Tiles::kHalf, kStages = Tiles::kStages;
  constexpr int kCTiles = kHalf / 8, kDTiles = kHeadDim / 8;
  constexpr int kStageElems = kHalf * kHeadDim;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);
  T* smem_v = smem_k + Tiles::kSmemKV;
  T* smem_q = smem_v + Tiles::kSmemKV;
  T* smem_do = smem_q + Tiles::kSmemQ;
  float* s_p = reinterpret_cast<float*>(smem_raw + Tiles::kPOffset);
  float* s_lse = reinterpret_cast<float*>(smem_raw + Tiles::kStatsOffset);  // (kStages, kHalf)
  float* s_rdot = s_lse + kStages * kHalf;                                 // (kStages, kHalf)
  // Both consumer warpgroups read every stage: its "empty" waits for their eight warps.
  uint64_t* full_bar =
      init_stage_barriers<kStages, Tiles::kProducerThreads, Tiles::kConsumerThreads>(
          smem_raw + Tiles::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;

  // Key tile n and this CTA's share of its query work, as in dkdv_kernel_sm90.
  const DkvCta cta = dkv_cta(p);
  const int hk = cta.hk, b = cta.b;
  const int n = [&] {
    const DkvShares shares = dkv_shares(p, hk, b);
    const int rank = cta.x >> shares.log2;
    return rank < shares.tiles ? dkv_unit(p, hk, b, rank, p.map.n_blocks) : -1;
  }();
  if (n < 0) return;
  const int key0 = n * kBlockN;

  if (threadIdx.x < Tiles::kProducerThreads) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    const typename Tiles::SmemLayoutKV layout_kv;
    const typename Tiles::SmemLayoutQ layout_q;
    const auto kv_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_kv, false);
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    const auto* k_rows = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    const auto* v_rows = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
    load_rows_async<kHeadDim, kBlockN, kLoaders>(reinterpret_cast<uint16_t*>(smem_k), kv_dst.first,
                                                 kv_dst.step, k_rows, p.k_stride_s, key0,
                                                 p.seqlen_k, p.head_dim, kv_dst.half);
    load_rows_async<kHeadDim, kBlockN, kLoaders>(reinterpret_cast<uint16_t*>(smem_v), kv_dst.first,
                                                 kv_dst.step, v_rows, p.v_stride_s, key0,
                                                 p.seqlen_k, p.head_dim, kv_dst.half);
    auto* s_q = reinterpret_cast<uint16_t*>(smem_q);
    auto* s_do = reinterpret_cast<uint16_t*>(smem_do);
    DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
    for (int j = 0; !cur.done(); ++j, cur.advance()) {
      const int stage = j % kStages, h = cur.h;
      const int q0 = cur.m() * kBlockM;
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      load_step_rows_async<kHeadDim, kLoaders>(p, tma, s_q + stage * kStageElems,
                                               s_do + stage * kStageElems, q_dst, b, h, q0,
                                               &full_bar[stage]);
      load_step_stats_async(p, b, h, q0, s_lse + stage * kHalf, s_rdot + stage * kHalf);
      mbarrier_arrive_on_copies(&full_bar[stage]);
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tiles::kConsumerRegisters));
  // (Not uniform_warpgroup: with the warpgroup's roles then known warp-uniform, ptxas spilled
  // 56 bytes here and the pass grew 144 instructions, at a D = 256 backward that meets its bar
  // by 1-4%; compiled 2026-12-05, not measured.)
  const int wg = (int(threadIdx.x) - Tiles::kProducerThreads) / 128;
  const int ct = int(threadIdx.x) % 128;
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;
  // P^T buffer q: named barrier 1 + q "full" (warpgroup 1 arrives, 0 waits), 3 + q "empty"
  // (warpgroup 0 arrives, 1 waits).
  auto bar_sync = [](int id) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(Tiles::kConsumerThreads) : "memory");
  };
  auto bar_arrive = [](int id) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(Tiles::kConsumerThreads) : "memory");
  };

  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tiles::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{});
  Tensor sDo = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQt{});
  Tensor sDot = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQt{});

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaKV mma_kv;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_kv = mma_kv.get_thread_slice(ct);
  // Warpgroup 1: x^T = K Q^T, dV += P^T dO; warpgroup 0: dP^T = V dO^T, dK += dS^T Q.
  Tensor tSrA = thr_s.partition_fragment_A(wg == 1 ? sK : sV);      // (MMA, 1, MMA_K, 1)
  Tensor tSrB = thr_s.partition_fragment_B(wg == 1 ? sQ : sDo);     // (MMA, 1, MMA_K, stage)
  Tensor tKVrB = thr_kv.partition_fragment_B(wg == 1 ? sDot : sQt);  // (MMA, 1, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kHalf>>{});  // x^T or dP^T
  Tensor tAcc = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // dV or dK
  static_assert(decltype(size(tSrS))::value == kCTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tAcc))::value == kDTiles * 4, "one 16-row C fragment per warp");
  // P^T or dS^T as the RS A operand (see dkdv_kernel_sm90).
  Tensor tA = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  auto* a_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tA.data()));
  clear(tAcc);

  const int key_row[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  // Warpgroup 0 alone sums columns of dS: every head's sums zeroed first, then stored.
  ColumnSums<true> col;
  const ColumnSums<true>::Rows col_rows{b, t, {key_row[0], key_row[1]}};
  if (wg == 0) col.zero_heads(p, col_rows, hk);

  auto issue_s = [&](int stage) {
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(tSrA); ++kb) {
      gemm(mma_s, tSrA(_, _, kb, 0), tSrB(_, _, kb, stage), tSrS);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  auto issue_kv = [&](int stage) {
    warpgroup_fence_operand(tAcc);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tA); ++kb) {
      gemm(mma_kv, tA(_, _, kb), tKVrB(_, _, kb, stage), tAcc);
    }
    warpgroup_commit_batch();
  };

  // Per step j: this warpgroup's S product (its previous RS product retires with it: stage j - 1
  // goes back), then its element passes and the P^T handoff, then its RS product.
  const bool release_lane = lane == 0;
  auto& s = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrS.data()));
  DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
  const bool by_key_row = KeyRowBias::applies(p);
  int j = 0;
  for (; !cur.done(); ++j, cur.advance()) {
    const int stage = j % kStages, h = cur.h, buffer = j % Tiles::kPBuffers;
    const int q0 = cur.m() * kBlockM;
    float* p_tile = s_p + buffer * Tiles::kPFloats;
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    // What cp.async wrote must be fenced before wgmma reads it: K and V (complete with stage
    // 0), and Q and dO without tensor maps. By TMA (the async proxy, complete on the mbarrier)
    // they need no fence.
    if (j == 0 || !tma.enabled) fence_async_shared();
    issue_s(stage);
    if (j > 0) {
      warpgroup_wait<1>();  // step j - 1's RS product: its stage goes back
      if (release_lane) mbarrier_arrive(&empty_bar[(j - 1) % kStages]);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tAcc);
    if (wg == 1) {
      const bool check =
          cur.partial() || key0 + kBlockN > p.seqlen_k || q0 + kHalf > p.seqlen_q;
      const DkvIndex ix{{key_row[0], key_row[1]}, q0, t};
      uint32_t slope[kSoftcap ? 2 * kCTiles : 1];
      if constexpr (kSoftcap) softcap_pass(s, slope, p.softcap_in, p.softcap_out);
      if (by_key_row) {
        KeyRowBias::scale_add<Elt, !kSoftcap>(p, b, h, key_row, s);
      } else {
        if constexpr (!kSoftcap) scale_pass(s, p.scale_log2);
        if (p.bias) bias_pass<Elt>(p, b, h, s, ix);
      }
      if (check) drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
      probabilities_t(s, s_lse + stage * kHalf, t);
      if (j >= Tiles::kPBuffers) bar_sync(3 + buffer);  // warpgroup 0 read step j - 2's
#pragma unroll
      for (int c = 0; c < kCTiles; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kSoftcap) {
            const float2 f = Fp16::unpack(slope[2 * c + e / 2]);
            reinterpret_cast<uint32_t*>(p_tile)[(4 * c + e) * 128 + ct] =
                Fp16::pack(s[c][e], e % 2 == 0 ? f.x : f.y);
          } else {
            p_tile[(4 * c + e) * 128 + ct] = s[c][e];
          }
        }
      bar_arrive(1 + buffer);
    } else {
      col.switch_to(p, col_rows, h);
      bar_sync(1 + buffer);  // warpgroup 1 wrote step j's
      if constexpr (kSoftcap) {
        // dS^T from the fp16 P^T, its column sums, then dX^T with the slopes beside it.
        const auto* pairs = reinterpret_cast<const uint32_t*>(p_tile);
        const float* rdot = s_rdot + stage * kHalf;
#pragma unroll
        for (int c = 0; c < kCTiles; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[c][e] = ds_entry(Fp16::unpack(pairs[(4 * c + e) * 128 + ct]).x, s[c][e],
                               rdot[c * 8 + 2 * t + (e & 1)]);
          }
        if (p.bias_grad == BiasGrad::kColumns) col.add(s);
#pragma unroll
        for (int c = 0; c < kCTiles; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[c][e] = slope_entry(s[c][e], Fp16::unpack(pairs[(4 * c + e) * 128 + ct]).y);
          }
        bar_arrive(3 + buffer);
      } else {
        ds_t_shared(s, p_tile, ct, s_rdot + stage * kHalf, t);
        bar_arrive(3 + buffer);
        if (p.bias_grad == BiasGrad::kColumns) col.add(s);
      }
    }
    pack_pairs<Elt>(a_regs, s);
    issue_kv(stage);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(tAcc);
  // Warpgroup 1 waits for warpgroup 0's reads of the last two P^T buffers (their "empty"
  // arrivals), so that no named barrier is left half-arrived.
  if (wg == 1) {
    for (int k = j > Tiles::kPBuffers ? j - Tiles::kPBuffers : 0; k < j; ++k) {
      bar_sync(3 + k % Tiles::kPBuffers);
    }
  } else {
    col.flush(p, col_rows);
  }
  write_dkdv_rows<Elt, kDTiles>(p, cta, hk, b, key_row, t, tAcc, tAcc, 0, wg == 0, wg == 1);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

// ------------------------------------------------------------------------------------------------
// dQ pass (dq_kernel_sm90_wide): CTA (64-query tile m, head h, batch b) = one producer warpgroup
// + two consumer warpgroups; consumer w holds dQ columns 128 w .. 128 w + 127 (64 fp32). The
// producer copies the tile's Q and dO once (they complete with the first stage), then streams the
// list's 64-key K and V tiles (and a staged 16-bit bias's 64 x 64 tile) through kStages stages.
// Per key tile:
//
//   x  = Q K_w^T     RS wgmma (Q from registers), 64 queries x the warpgroup's 32 keys (32 w ..)
//   dP = dO V_w^T    SS wgmma
//   element passes -> dS of those 32 keys, dbias duties (per entry: the warpgroup's keys)
//   dS -> shared memory (16-bit, (64 queries x 64 keys) K-major); both warpgroups meet
//   dQ[:, 128 w ..] += dS K[:, 128 w ..]   SS wgmma over all 64 keys, K read as the MN-major
//                                          (columns x keys) view of its stage
//
// The K and V tiles come by TMA where the call has tensor maps (one producer thread, a (64
// columns x 32 keys) box per sub-tile and column block: a stage is 16 of them), so the consumers'
// fence before their products is the first stage's alone (Q and dO come by cp.async with it):
// the dense causal (1, 16384, 16, 16, 256) backward 1.7% faster than with cp.async, 0.97x cuDNN's
// rate (H100, docs/perf.md, forty-fifth session).
//
// A tile's dQ product is issued before the next tile's x and dP and retires under them. The dS
// tile is single: a warpgroup writes tile j + 1's once both retired tile j's dQ (a named
// barrier), and both meet again before reading it. kRows sums each row's dS over both
// warpgroups' keys: the second hands its partial sums to the first through shared memory at the
// end (a fixed order: deterministic).
template <class Elt>
struct Sm90DqWideTiles {
  static constexpr int kHeadDim = 256;
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static_assert(kBlockM == 64 && kBlockN == 64, "64 queries per CTA, 64 keys per tile");
  static constexpr int kQuarter = 32;  // keys per consumer warpgroup in x and dP
  static constexpr int kCols = 128;    // dQ columns per consumer warpgroup
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // A consumer holds dQ (64 fp32), x and dP (2 x 16); at 40 the producer spilled 8 bytes.
  // 128 * 56 + 256 * 224 = 64512.
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters = 224;
  static constexpr int kStages = 2;

  using T = typename CuteElement<Elt>::type;
  // Q and dO of the CTA's rows (queries x head dim), K-major: the A operands of x and dP.
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::_1>{}));
  // K / V: sub-tile 2 s + w holds keys 32 w .. 32 w + 31 of stage s (keys x head dim), K-major:
  // the B operand of warpgroup w's x and dP ...
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kQuarter>, cute::Int<kHeadDim>, cute::Int<2 * kStages>>{}));
  // ... and K's bytes as (N = 128 columns, K = 32 keys, column half, sub-tile), MN-major: the B
  // operand of dQ. Both put the 64-column blocks after the 32 rows, the halves after them, then
  // the sub-tiles (checked on the host with CuTe: the same offset for every element).
  using SmemLayoutKt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kCols>, cute::Int<kQuarter>, cute::_2, cute::Int<2 * kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3, cute::_4>{}));
  // dS of a key tile (queries x keys), K-major: the A operand of dQ.
  using SmemLayoutDs = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  // x = Q K_w^T with Q from registers (loaded once per CTA: 64 per thread), dP = dO V_w^T with
  // both from shared memory. With both SS, the two products read 96 KB of shared memory per
  // warpgroup and key tile, more than the tensor cores' time for them at 128 B per cycle (Q in
  // registers: the pass 7.84 -> 7.45 ms at (1, 16384, 16, 16, 256) causal on H200).
  using ShapeS = cute::Shape<cute::_64, cute::Int<kQuarter>, cute::Int<kHeadDim>>;
  using TiledMmaX =
      decltype(cute::make_tiled_mma(cute::GMMA::rs_op_selector<T, T, float, ShapeS>()));
  using TiledMmaS =
      decltype(cute::make_tiled_mma(cute::GMMA::ss_op_selector<T, T, float, ShapeS>()));
  using TiledMmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kCols>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  static constexpr int kSmemQ = int(cute::cosize_v<SmemLayoutQ>);   // elements, each of Q and dO
  static constexpr int kSmemK = int(cute::cosize_v<SmemLayoutK>);   // elements, each of K and V
  static constexpr int kSmemDs = int(cute::cosize_v<SmemLayoutDs>);
  static_assert(kSmemK == kStages * kBlockN * kHeadDim, "stages are contiguous tiles");
  static constexpr int kSubTileElems = kQuarter * kHeadDim;
  // kRows: the second warpgroup's per-thread partial row sums (2 fp32 per thread).
  static constexpr int kRowsOffset = (2 * kSmemQ + 2 * kSmemK + kSmemDs) * 2;
  static constexpr int kBarrierOffset = kRowsOffset + 128 * 2 * 4;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8;
  // A staged bias (Params::bias_staged) after the barriers: per stage its (64 queries x 64 keys)
  // tile, SmemTile<64>, loaded and released with the stage's K and V.
  static constexpr int kBiasOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kBiasStageElems = kBlockM * kBlockN;
  static constexpr int smem_bytes(bool staged_bias) {
    return staged_bias ? kBiasOffset + kStages * kBiasStageElems * 2 : kSmemBytes;
  }
  static_assert(smem_bytes(true) <= 227 * 1024, "fits an SM's opt-in shared memory");
};

// kDuty == dq_bias_duty(p), kRowTopK == (p.row_topk.key != null), kSoftcap == (p.softcap_in !=
// 0), as in dq_kernel_sm90; the staged bias is a runtime branch here (no spills either way).
template <class Elt, DqBiasDuty kDuty, bool kRowTopK, bool kSoftcap = false>
__global__ void __launch_bounds__(Sm90DqWideTiles<Elt>::kThreads, 1)
    dq_kernel_sm90_wide(const __grid_constant__ BackwardParams p,
                        const __grid_constant__ KvTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tiles = Sm90DqWideTiles<Elt>;
  using T = typename Tiles::T;
  constexpr int kHeadDim = Tiles::kHeadDim, kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kQuarter = Tiles::kQuarter, kStages = Tiles::kStages;
  constexpr int kNTiles = kQuarter / 8, kDTiles = Tiles::kCols / 8;
  constexpr int kStageElems = kBlockN * kHeadDim;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_do = smem_q + Tiles::kSmemQ;
  T* smem_k = smem_do + Tiles::kSmemQ;
  T* smem_v = smem_k + Tiles::kSmemK;
  T* smem_ds = smem_v + Tiles::kSmemK;
  auto* s_rows = reinterpret_cast<float*>(smem_raw + Tiles::kRowsOffset);
  auto* s_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kBiasOffset);
  uint64_t* full_bar =
      init_stage_barriers<kStages, Tiles::kProducerThreads, Tiles::kConsumerThreads>(
          smem_raw + Tiles::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;

  const int m = p.map.m_blocks - 1 - int(blockIdx.x);  // longest causal rows start first
  const DqHead head = dq_cta_head(p);
  const int b = head.b, h = head.h, hk = h / p.group;
  const int row0 = m * kBlockM;
  const DqTileList list(p, b, h, m);
  const int n_full = list.n_full, total = list.total;
  const bool by_tma = tma.enabled;  // K and V (producer, consumers)

  if (threadIdx.x < Tiles::kProducerThreads) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    const typename Tiles::SmemLayoutQ layout_q;
    const typename Tiles::SmemLayoutK layout_k;
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    const auto k_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_k, false);
    const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    const auto* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
    auto* s_k = reinterpret_cast<uint16_t*>(smem_k);
    auto* s_v = reinterpret_cast<uint16_t*>(smem_v);
    if (total > 0) {
      load_rows_async<kHeadDim, kBlockM, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_q), q_dst.first, q_dst.step,
          static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s,
          row0, p.seqlen_q, p.head_dim, q_dst.half);
      load_rows_async<kHeadDim, kBlockM, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_do), q_dst.first, q_dst.step,
          static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h,
          p.do_stride_s, row0, p.seqlen_q, p.head_dim, q_dst.half);
    }
    for (int j = 0; j < total; ++j) {
      const int stage = j % kStages;
      const int n = list.at(j);
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      if (by_tma) {
        if (threadIdx.x == 0) {
          mbarrier_expect_tx(&full_bar[stage], 2 * kStageElems * 2);
          // Sub-tile w's column block c: keys [32 w, 32 w + 32) of the tile, columns [64 c,
          // 64 c + 64), 32 x 64 elements in (SmemLayoutK: the 64-column blocks after the rows).
#pragma unroll
          for (int w = 0; w < Tiles::kConsumerWarpGroups; ++w)
#pragma unroll
            for (int c = 0; c < kHeadDim / 64; ++c) {
              const int at = stage * kStageElems + w * Tiles::kSubTileElems + c * kQuarter * 64;
              const int key = n * kBlockN + w * kQuarter;
              tma_load_4d(s_k + at, tma.k, 64 * c, key, hk, b, &full_bar[stage]);
              tma_load_4d(s_v + at, tma.v, 64 * c, key, hk, b, &full_bar[stage]);
            }
        }
      } else {
#pragma unroll 1
        for (int w = 0; w < Tiles::kConsumerWarpGroups; ++w) {  // the two 32-key sub-tiles
          const int at = stage * kStageElems + w * Tiles::kSubTileElems;
          const int key = n * kBlockN + w * kQuarter;
          load_rows_async<kHeadDim, kQuarter, kLoaders>(s_k + at, k_dst.first, k_dst.step, k,
                                                        p.k_stride_s, key, p.seqlen_k,
                                                        p.head_dim, k_dst.half);
          load_rows_async<kHeadDim, kQuarter, kLoaders>(s_v + at, k_dst.first, k_dst.step, v,
                                                        p.v_stride_s, key, p.seqlen_k,
                                                        p.head_dim, k_dst.half);
        }
      }
      if (p.bias_staged) {
        load_bias_tile_async<kBlockM, kLoaders>(
            s_bias + stage * Tiles::kBiasStageElems,
            static_cast<const uint16_t*>(p.bias) + b * p.bias_stride[0] +
                (h / p.bias_head_group) * p.bias_stride[1] + n * kBlockN,
            p.bias_stride[2], row0, p.seqlen_q, p.seqlen_k - n * kBlockN);
      }
      mbarrier_arrive_on_copies(&full_bar[stage]);
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tiles::kConsumerRegisters));
  const int wg = uniform_warpgroup(Tiles::kProducerThreads);
  const int ct = int(threadIdx.x) % 128;
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;  // rows 16 warp ..
  const int kw = wg * kQuarter;  // this warpgroup's keys of a tile
  // Both consumer warpgroups: named barrier 1 (the dS tile is free), 2 (both wrote theirs), 3
  // (the row sums' handoff).
  auto consumers_sync = [](auto id) {
    asm volatile("bar.sync %0, %1;\n" ::"n"(decltype(id)::value), "n"(Tiles::kConsumerThreads)
                 : "memory");
  };

  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{});
  Tensor sDo = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tiles::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutKt{});
  Tensor sDs = make_tensor(make_smem_ptr(smem_ds), typename Tiles::SmemLayoutDs{});

  typename Tiles::TiledMmaX mma_x;
  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaDq mma_dq;
  auto thr_x = mma_x.get_thread_slice(ct);
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(ct);
  Tensor tXrQ = thr_x.partition_fragment_A(sQ);      // registers (MMA, 1, MMA_K, 1)
  Tensor tXrK = thr_x.partition_fragment_B(sK);      // (MMA, 1, MMA_K, sub-tile)
  Tensor tSrDo = thr_s.partition_fragment_A(sDo);    // (MMA, 1, MMA_K, 1)
  Tensor tSrV = thr_s.partition_fragment_B(sV);      // (MMA, 1, MMA_K, sub-tile)
  Tensor tDqrDs = thr_dq.partition_fragment_A(sDs);  // (MMA, 1, MMA_K)
  Tensor tDqrKt = thr_dq.partition_fragment_B(sKt);  // (MMA, 1, MMA_K, half, sub-tile)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kQuarter>>{});   // x
  Tensor tSrDp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kQuarter>>{});  // dP
  Tensor tDq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<Tiles::kCols>>{});
  static_assert(decltype(size(tSrS))::value == kNTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tDq))::value == kDTiles * 4, "one 16-row C fragment per warp");
  constexpr int kSubKBlocks = decltype(size<2>(tDqrKt))::value;
  static_assert(decltype(size<2>(tDqrDs))::value == 2 * kSubKBlocks,
                "a sub-tile holds half of a tile's k-blocks");
  clear(tDq);

  int i_row[2];
  float lse2[2], rdot[2], row_grad[2] = {0.0f, 0.0f};
  dq_row_stats(p, b, h, row0 + warp * 16 + g, i_row, lse2, rdot);

  auto issue_s = [&](auto& mma, auto& acc, const auto& a, const auto& bop, int sub) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) {
      gemm(mma, a(_, _, kb, 0), bop(_, _, kb, sub), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // Q into registers once it has landed (with the first stage): the A fragment of k-block kb holds
  // rows (g, g + 8) x columns 16 kb + (2 t, 2 t + 8) (+ 1), as in forward_kernel_sm90.
  if (total > 0) {
    mbarrier_wait(&full_bar[0], 0);
    const typename Tiles::SmemLayoutQ layout_q;
    const auto* s_q = reinterpret_cast<const uint16_t*>(smem_q);
    auto* q_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tXrQ.data()));
#pragma unroll
    for (int kb = 0; kb < kHeadDim / 16; ++kb)
#pragma unroll
      for (int v2 = 0; v2 < 2; ++v2)
#pragma unroll
        for (int v1 = 0; v1 < 2; ++v1) {
          q_regs[4 * kb + 2 * v2 + v1] = *reinterpret_cast<const uint32_t*>(
              s_q + gmma_offset(layout_q, warp * 16 + g + 8 * v1, 16 * kb + 8 * v2 + 2 * t, 0));
        }
  }
  // dQ += dS x (the stage's keys, this warpgroup's 128 columns): k-blocks 0, 1 in the stage's
  // first sub-tile, 2, 3 in its second.
  auto issue_dq = [&](int stage) {
    warpgroup_fence_operand(tDq);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tDqrDs); ++kb) {
      gemm(mma_dq, tDqrDs(_, _, kb),
           tDqrKt(_, _, kb % kSubKBlocks, wg, 2 * stage + kb / kSubKBlocks), tDq);
    }
    warpgroup_commit_batch();
  };
  const typename Tiles::SmemLayoutDs layout_ds;

  // Per key tile j: x_j and dP_j issued while dQ_{j-1} is in flight; the element passes of x_j
  // under dP_j; once both warpgroups retired dQ_{j-1}, dS_j into shared memory; once both wrote
  // theirs, dQ_j.
  const bool release_lane = lane == 0;
  for (int j = 0; j < total; ++j) {
    const int stage = j % kStages, prev_stage = (j + kStages - 1) % kStages;
    const int n = list.at(j);
    const bool check = j >= n_full || (n + 1) * kBlockN > p.seqlen_k || row0 + kBlockM > p.seqlen_q;
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    // The producer's cp.async writes, before wgmma reads them (by TMA: Q and dO's, with the
    // first stage).
    if (j == 0 || !by_tma) fence_async_shared();
    issue_s(mma_x, tSrS, tXrQ, tXrK, 2 * stage + wg);
    issue_s(mma_s, tSrDp, tSrDo, tSrV, 2 * stage + wg);
    warpgroup_wait<1>();  // dQ_{j-1} and x_j
    warpgroup_fence_operand(tSrS);
    if (j > 0 && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);

    auto& s = *reinterpret_cast<float(*)[kNTiles][4]>(raw_pointer_cast(tSrS.data()));
    const DqIndex ix{{i_row[0], i_row[1]}, n * kBlockN + kw, t};
    uint32_t slope[kSoftcap ? 2 * kNTiles : 1];
    if constexpr (kSoftcap) {
      softcap_pass(s, slope, p.softcap_in, p.softcap_out);
    } else {
      scale_pass(s, p.scale_log2);
    }
    if (p.bias_staged) {
      add_staged_bias<Elt, false>(s, s_bias + stage * Tiles::kBiasStageElems, warp * 16, kLog2e,
                                  kw);
    } else if (p.bias) {
      bias_pass<Elt, kDuty == DqBiasDuty::kNone>(p, b, h, s, ix);
    }
    if (check) drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
    // P (exact zeros for dropped entries and empty rows).
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float l2 = lse2[e / 2];
        const bool keep = s[c][e] != -INFINITY && l2 != -INFINITY;
        s[c][e] = keep ? fast_exp2(s[c][e] - l2) : 0.0f;
      }
    warpgroup_wait<0>();  // dP_j
    warpgroup_fence_operand(tSrDp);
    // dS = P (dP - rowdot), 0 where P = 0 even when dP is not finite (NaN / Inf stored in V at a
    // dropped key).
    auto& ds = *reinterpret_cast<float(*)[kNTiles][4]>(raw_pointer_cast(tSrDp.data()));
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ds[c][e] = s[c][e] != 0.0f ? s[c][e] * (ds[c][e] - rdot[e / 2]) : 0.0f;
      }
    // The dbias duty takes dS, dQ += dX K the packed dX (as in dq_kernel_sm90).
    if constexpr (kSoftcap) {
      dq_pass_duty<Elt, kDuty>(p, b, h, i_row, n * kBlockN + kw, t, ds, row_grad,
                               [&](int c, int r) {
                                 return Elt::pack(ds[c][2 * r], ds[c][2 * r + 1]);
                               });
      apply_slope(ds, slope);
    }
    uint32_t ds_pairs[kNTiles][2];
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) ds_pairs[c][r] = Elt::pack(ds[c][2 * r], ds[c][2 * r + 1]);
    if constexpr (!kSoftcap) {
      dq_pass_duty<Elt, kDuty>(p, b, h, i_row, n * kBlockN + kw, t, ds, row_grad,
                               [&](int c, int r) { return ds_pairs[c][r]; });
    }
    consumers_sync(Int<1>{});  // both warpgroups' dQ_{j-1} retired
    auto* out = reinterpret_cast<uint16_t*>(smem_ds);
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = gmma_offset(layout_ds, warp * 16 + g + 8 * r, kw + 8 * c + 2 * t);
        *reinterpret_cast<uint32_t*>(out + off) = ds_pairs[c][r];
      }
    fence_async_shared();  // the st.shared above, before the other warpgroup's wgmma reads them
    consumers_sync(Int<2>{});
    issue_dq(stage);
    // kFp32 retires dQ_j here: left in flight under the next tile's products, ptxas serialized
    // every wgmma of that instantiation (C7515; with the duty placed before or after the pack, or
    // on a copy of dS, alike). The other duties keep the overlap.
    if constexpr (kDuty == DqBiasDuty::kFp32) warpgroup_wait<0>();
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(tDq);

  // kRows: the second warpgroup's partial row sums into the first's (same thread, same rows).
  const bool rows = p.bias_grad == BiasGrad::kRows;
  if (rows && wg == 1) {
    s_rows[2 * ct] = row_grad[0];
    s_rows[2 * ct + 1] = row_grad[1];
  }
  if (rows) consumers_sync(Int<3>{});
  if (rows && wg == 0) {
    row_grad[0] += s_rows[2 * ct];
    row_grad[1] += s_rows[2 * ct + 1];
  }
  dq_pass_write<Elt, kDTiles>(p, b, h, i_row, t, row_grad,
                              [&](int d, int e) { return tDq(4 * d + e); }, wg * Tiles::kCols,
                              wg == 0);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

}  // namespace fsa::detail::cuda
