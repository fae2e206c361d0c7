#pragma once
// Hopper backward passes at kernel head dim 256: the dK/dV pass (dkdv_kernel_sm90_wide), then
// the dQ pass below (dq_kernel_sm90_wide).
//
// dK/dV pass: the block lists, work order, shares and element passes of dkdv_kernel_sm90
// (backward_kernel_sm90.cuh), with the work of a step split differently between the two consumer
// warpgroups.
//
// At D = 128 each consumer warpgroup holds dK and dV of the whole 64-key tile (2 x 64 fp32 per
// thread) and the two take alternate query steps. At D = 256 those accumulators alone would take
// 256 registers per thread, so here consumer warpgroup w holds dK and dV columns 128 w .. 128 w +
// 127 (2 x 64 fp32), and both work on every step. Per 64-query step (the plan's query tile at
// D = 256, one per stage):
//
//   x^T  = K Q_w^T    SS wgmma, 64 keys x the warpgroup's 32 queries (32 w ..), K = head dim
//   dP^T = V dO_w^T   SS wgmma, likewise
//   element passes -> P^T, dS^T of those 32 queries (column sums of dS for BiasGrad::kColumns)
//   P^T, dS^T -> shared memory (16-bit, (64 keys x 64 queries) K-major); both warpgroups meet
//   dV[:, 128 w ..] += P^T dO[:, 128 w ..]   SS wgmma over all 64 queries
//   dK[:, 128 w ..] += dS^T Q[:, 128 w ..]   SS wgmma over all 64 queries
//
// A step's products are issued before the next step's x^T and dP^T and retire under them, so the
// element passes of step j + 1 run while the tensor cores still work on step j. The shared P^T
// and dS^T tiles are single: a warpgroup writes step j + 1's once both have retired step j's
// products (a named barrier), and both meet again before reading them.
//
// A Q / dO stage is stored as two (32 queries x head dim) K-major tiles, one per warpgroup's x^T /
// dP^T (the B operand of 32 rows), and the same bytes are read as the (N = 128 columns, K =
// queries) MN-major B operand of dK / dV (the view the D = 128 pass uses, with the head dim in
// halves of 128 as a mode of its own).
//
// Shared memory: K and V 64 KB, two stages of Q and dO 128 KB, P^T and dS^T 16 KB, the stages'
// statistics 1 KB; a staged 16-bit bias adds 2 x 8 KB (225 KB in all).
//
// Not here: per-row top-k's dK/dV groups (BlockMapParams::dkv_slots, gathered K / V rows) and
// softcap; those calls run the sm80 pass (launch_sm90_dkdv).

#include "cuda/backward_kernel_sm90.cuh"

namespace fsa::detail::cuda {

template <class Elt>
struct Sm90DkvWideTiles {
  static constexpr int kHeadDim = 256;
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static_assert(kBlockM == 64 && kBlockN == 64, "one 64-query step per query tile, 64 keys");
  static constexpr int kHalf = 64;     // queries per step (DkvWorkCursor's half: the whole tile)
  static constexpr int kHalves = kBlockM / kHalf;
  static constexpr int kQuarter = 32;  // queries per consumer warpgroup in x^T and dP^T
  static constexpr int kCols = 128;    // dK / dV columns per consumer warpgroup
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  static_assert(kConsumerWarpGroups * kQuarter == kHalf && kConsumerWarpGroups * kCols == kHeadDim,
                "the warpgroups split a step's queries and the head dim");
  // A consumer holds dK and dV (2 x 64 fp32), x^T and dP^T (2 x 16); the producer copies
  // 256-column rows in two 128-column halves (at 40 registers it spilled 4 bytes under per-row
  // top-k). 128 * 56 + 256 * 224 = 64512, the launch allotment of 168 per thread at 384 threads.
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters = 224;
  static constexpr int kStages = 2;

  using T = typename CuteElement<Elt>::type;
  // K and V tiles (keys x head dim), K-major: the A operands of x^T and dP^T.
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::_1>{}));
  // Q / dO: sub-tile 2 s + w holds queries 32 w .. 32 w + 31 of stage s (queries x head dim),
  // K-major: the B operand of warpgroup w's x^T and dP^T ...
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kQuarter>, cute::Int<kHeadDim>, cute::Int<2 * kStages>>{}));
  // ... and the same bytes as (N = 128 columns, K = 32 queries, column half, sub-tile), MN-major:
  // the B operand of dK / dV. (Both put the 64-column blocks after the 32 rows, the halves after
  // them, then the sub-tiles.)
  using SmemLayoutQt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kCols>, cute::Int<kQuarter>, cute::_2, cute::Int<2 * kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3, cute::_4>{}));
  // P^T and dS^T of a step (keys x queries), K-major: the A operands of dV and dK.
  using SmemLayoutP = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHalf>>{}));
  using ShapeS = cute::Shape<cute::_64, cute::Int<kQuarter>, cute::Int<kHeadDim>>;
  using TiledMmaS =
      decltype(cute::make_tiled_mma(cute::GMMA::ss_op_selector<T, T, float, ShapeS>()));
  using TiledMmaKV = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kCols>, cute::Int<kHalf>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  static constexpr int kSmemKV = int(cute::cosize_v<SmemLayoutKV>);  // elements, each of K and V
  static constexpr int kSmemQ = int(cute::cosize_v<SmemLayoutQ>);    // elements, each of Q and dO
  static constexpr int kSmemP = int(cute::cosize_v<SmemLayoutP>);    // elements, each of P^T, dS^T
  static_assert(kSmemQ == kStages * kHalf * kHeadDim && kSmemQ == int(cute::cosize_v<SmemLayoutQt>),
                "stages are contiguous tiles, viewed two ways");
  static constexpr int kSubTileElems = kQuarter * kHeadDim;
  // Per stage, the step's raw LSE and rowdot (fp32, 64 each), after the tiles.
  static constexpr int kStatsOffset = (2 * kSmemKV + 2 * kSmemQ + 2 * kSmemP) * 2;
  static constexpr int kBarrierOffset = kStatsOffset + kStages * 2 * kHalf * 4;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8;
  // A staged bias (Params::bias_staged) after the barriers, as in Sm90DkvTiles: per stage its
  // (64 queries x 64 keys) tile, SmemTile<64>.
  static constexpr int kBiasOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kBiasStageElems = kHalf * kBlockN;
  static constexpr int smem_bytes(bool staged_bias) {
    return staged_bias ? kBiasOffset + kStages * kBiasStageElems * 2 : kSmemBytes;
  }
  static_assert(smem_bytes(true) <= 227 * 1024, "fits an SM's opt-in shared memory");
};

// kRowTopK == (p.row_topk.key != null), as in dkdv_kernel_sm90.
template <class Elt, bool kRowTopK>
__global__ void __launch_bounds__(Sm90DkvWideTiles<Elt>::kThreads, 1)
    dkdv_kernel_sm90_wide(const __grid_constant__ BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tiles = Sm90DkvWideTiles<Elt>;
  using T = typename Tiles::T;
  constexpr int kHeadDim = Tiles::kHeadDim, kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kHalf = Tiles::kHalf, kQuarter = Tiles::kQuarter, kStages = Tiles::kStages;
  constexpr int kCTiles = kQuarter / 8, kDTiles = Tiles::kCols / 8;
  constexpr int kStageElems = kHalf * kHeadDim;

  // Dynamic shared memory starts 1024-byte aligned (no static shared memory); every tile below is
  // a multiple of 1024 bytes.
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);
  T* smem_v = smem_k + Tiles::kSmemKV;
  T* smem_q = smem_v + Tiles::kSmemKV;
  T* smem_do = smem_q + Tiles::kSmemQ;
  T* smem_p = smem_do + Tiles::kSmemQ;
  T* smem_ds = smem_p + Tiles::kSmemP;
  float* s_lse = reinterpret_cast<float*>(smem_raw + Tiles::kStatsOffset);  // (kStages, kHalf)
  float* s_rdot = s_lse + kStages * kHalf;                                 // (kStages, kHalf)
  auto* s_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kBiasOffset);
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
    const int tile = cta.x >> shares.log2;
    return tile < shares.tiles ? tile : -1;
  }();
  if (n < 0) return;
  const int key0 = n * kBlockN;

  if (threadIdx.x < Tiles::kProducerThreads) {
    // Producer: K and V first (their copies complete before stage 0's arrival), then step j into
    // stage j % kStages once both consumers released what used it before.
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
    const int c = int(threadIdx.x) % kHalf;  // threads 0-63: LSE, 64-127: rowdot
    const bool loads_lse = int(threadIdx.x) < kHalf;
    DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
    for (int j = 0; !cur.done(); ++j, cur.advance()) {
      const int stage = j % kStages, h = cur.h;
      const int q0 = cur.m() * kBlockM;
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      const auto* q_rows =
          static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
      const auto* do_rows =
          static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h;
#pragma unroll 1
      for (int w = 0; w < Tiles::kConsumerWarpGroups; ++w) {  // the two 32-query sub-tiles
        const int at = stage * kStageElems + w * Tiles::kSubTileElems;
        load_rows_async<kHeadDim, kQuarter, kLoaders>(s_q + at, q_dst.first, q_dst.step, q_rows,
                                                      p.q_stride_s, q0 + w * kQuarter, p.seqlen_q,
                                                      p.head_dim, q_dst.half);
        load_rows_async<kHeadDim, kQuarter, kLoaders>(s_do + at, q_dst.first, q_dst.step, do_rows,
                                                      p.do_stride_s, q0 + w * kQuarter, p.seqlen_q,
                                                      p.head_dim, q_dst.half);
      }
      // Raw statistics, zero past Sq (those queries are dropped by the consumers' drop pass).
      const int i = q0 + c;
      const bool valid = i < p.seqlen_q;
      const float* src = loads_lse ? p.lse + b * p.lse_stride_b + h * p.lse_stride_h +
                                         int64_t(valid ? i : 0) * p.lse_stride_s
                                   : p.rowdot + (int64_t(b) * p.num_heads + h) * p.seqlen_q +
                                         (valid ? i : 0);
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
          *reinterpret_cast<const uint32_t*>(src),
          *reinterpret_cast<uint32_t*>((loads_lse ? s_lse : s_rdot) + stage * kHalf + c), valid);
      if (p.bias_staged) {  // rows = the step's queries, columns = this CTA's keys
        load_bias_tile_async<kHalf, kLoaders>(
            s_bias + stage * Tiles::kBiasStageElems,
            static_cast<const uint16_t*>(p.bias) + b * p.bias_stride[0] +
                (h / p.bias_head_group) * p.bias_stride[1] + key0,
            p.bias_stride[2], q0, p.seqlen_q, p.seqlen_k - key0);
      }
      mbarrier_arrive_on_copies(&full_bar[stage]);
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tiles::kConsumerRegisters));
  // Consumer warpgroup wg, thread ct within it; its queries of a step start at qw.
  const int wg = (int(threadIdx.x) - Tiles::kProducerThreads) / 128;
  const int ct = int(threadIdx.x) % 128;
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;
  const int qw = wg * kQuarter;
  // Both consumer warpgroups: named barrier 1 (setup), 2 (the shared P^T / dS^T tiles are free),
  // 3 (both warpgroups wrote theirs).
  auto consumers_sync = [](auto id) {
    asm volatile("bar.sync %0, %1;\n" ::"n"(decltype(id)::value), "n"(Tiles::kConsumerThreads)
                 : "memory");
  };

  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tiles::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{});
  Tensor sDo = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQt{});
  Tensor sDot = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQt{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Tiles::SmemLayoutP{});
  Tensor sDs = make_tensor(make_smem_ptr(smem_ds), typename Tiles::SmemLayoutP{});

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaKV mma_kv;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_kv = mma_kv.get_thread_slice(ct);
  Tensor tSrK = thr_s.partition_fragment_A(sK);        // (MMA, 1, MMA_K, 1)
  Tensor tSrV = thr_s.partition_fragment_A(sV);        // (MMA, 1, MMA_K, 1)
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);        // (MMA, 1, MMA_K, sub-tile)
  Tensor tSrDo = thr_s.partition_fragment_B(sDo);      // (MMA, 1, MMA_K, sub-tile)
  Tensor tKVrP = thr_kv.partition_fragment_A(sP);      // (MMA, 1, MMA_K)
  Tensor tKVrDs = thr_kv.partition_fragment_A(sDs);    // (MMA, 1, MMA_K)
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);    // (MMA, 1, MMA_K, half, sub-tile)
  Tensor tKVrDot = thr_kv.partition_fragment_B(sDot);  // (MMA, 1, MMA_K, half, sub-tile)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kQuarter>>{});   // x^T
  Tensor tSrDp = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kQuarter>>{});  // dP^T
  Tensor tdK = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<Tiles::kCols>>{});
  Tensor tdV = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<Tiles::kCols>>{});
  static_assert(decltype(size(tSrS))::value == kCTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tdK))::value == kDTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size<2>(tKVrP))::value == 2 * decltype(size<2>(tKVrQt))::value,
                "a sub-tile holds half of a step's k-blocks");
  clear(tdK);
  clear(tdV);

  // The thread's two key rows, 8 apart.
  const int key_row[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  // Both warpgroups sum columns of the same keys: the first zeroes every head's sums, then each
  // adds its own (two fp32 additions onto zero, which commute exactly: deterministic).
  ColumnSums<true> col;
  const ColumnSums<true>::Rows col_rows{b, t, {key_row[0], key_row[1]}};
  if (wg == 0) col.zero_heads(p, col_rows, hk);
  consumers_sync(Int<1>{});

  auto issue_s = [&](auto& acc, const auto& a, const auto& bop, int sub) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) {
      gemm(mma_s, a(_, _, kb, 0), bop(_, _, kb, sub), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // dV or dK += A^T-tile x (the stage's rows, this warpgroup's 128 columns): k-blocks 0, 1 in the
  // stage's first sub-tile, 2, 3 in its second.
  constexpr int kSubKBlocks = decltype(size<2>(tKVrQt))::value;
  auto issue_kv = [&](auto& acc, const auto& a, const auto& bop, int stage) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) {
      gemm(mma_kv, a(_, _, kb), bop(_, _, kb % kSubKBlocks, wg, 2 * stage + kb / kSubKBlocks), acc);
    }
    warpgroup_commit_batch();
  };
  // Writes a warpgroup's 64 x 32 block of P^T or dS^T (C fragment x, columns qw ..) as 16-bit
  // pairs into its tile.
  const typename Tiles::SmemLayoutP layout_p;
  auto store_t = [&](T* tile, const float (&x)[kCTiles][4]) {
    auto* out = reinterpret_cast<uint16_t*>(tile);
#pragma unroll
    for (int c = 0; c < kCTiles; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = gmma_offset(layout_p, warp * 16 + g + 8 * r, qw + 8 * c + 2 * t);
        *reinterpret_cast<uint32_t*>(out + off) = Elt::pack(x[c][2 * r], x[c][2 * r + 1]);
      }
  };

  // Per step j: x^T and dP^T issued while step j - 1's dV and dK are still in flight; the
  // element passes of x^T (up to P^T) while dP^T is computed, then dS^T; once both warpgroups
  // retired step j - 1's products, P^T and dS^T into shared memory; once both wrote them, dV and
  // dK of step j.
  const bool release_lane = lane == 0;
  DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
  int prev_stage = -1;  // the previous step's stage, released once its products retire
  for (int j = 0; !cur.done(); ++j, cur.advance()) {
    const int stage = j % kStages, h = cur.h;
    const int q0 = cur.m() * kBlockM;
    const bool check = cur.partial() || key0 + kBlockN > p.seqlen_k || q0 + kHalf > p.seqlen_q;
    col.switch_to<true>(p, col_rows, h);
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    fence_async_shared();  // the producer's cp.async writes, before wgmma reads them
    issue_s(tSrS, tSrK, tSrQ, 2 * stage + wg);
    issue_s(tSrDp, tSrV, tSrDo, 2 * stage + wg);
    warpgroup_wait<1>();  // step j - 1's dV and dK, and x^T
    warpgroup_fence_operand(tSrS);
    if (prev_stage >= 0 && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);
    prev_stage = stage;

    // The element passes work in place on the accumulators (flat index 4 c + e = s[c][e]).
    auto& s = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrS.data()));
    const DkvIndex ix{{key_row[0], key_row[1]}, q0 + qw, t};
    scale_pass(s, p.scale_log2);
    if (p.bias_staged) {
      // Entry (key row, query column) is element (query, key) of the staged tile.
      add_staged_bias<Elt, true>(s, s_bias + stage * Tiles::kBiasStageElems, warp * 16, kLog2e,
                                 qw);
    } else if (p.bias) {
      bias_pass<Elt>(p, b, h, s, ix);
    }
    if (check) drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
    probabilities_t(s, s_lse + stage * kHalf + qw, t);
    warpgroup_wait<0>();  // dP^T
    warpgroup_fence_operand(tSrDp);
    auto& ds = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrDp.data()));
    ds_t(ds, s, s_rdot + stage * kHalf + qw, t);
    if (p.bias_grad == BiasGrad::kColumns) col.add(ds);
    consumers_sync(Int<2>{});  // both warpgroups' step j - 1 products retired
    store_t(smem_p, s);
    store_t(smem_ds, ds);
    fence_async_shared();  // the st.shared above, before the other warpgroup's wgmma reads them
    consumers_sync(Int<3>{});
    issue_kv(tdV, tKVrP, tKVrDot, stage);
    issue_kv(tdK, tKVrDs, tKVrQt, stage);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(tdK);
  warpgroup_fence_operand(tdV);
  col.flush<true>(p, col_rows);
  write_dkdv_rows<Elt, kDTiles, kHeadDim>(p, cta, hk, b, key_row, t, tdK, tdV, wg * Tiles::kCols);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

// ------------------------------------------------------------------------------------------------
// Hopper dQ pass at kernel head dim 256 (dq_kernel_sm90_wide): the block lists, element passes
// and dbias duties of dq_kernel_sm90, split between the consumer warpgroups as the dK/dV pass
// above splits its work. CTA (64-query tile m, head h, batch b) = one producer warpgroup + two
// consumer warpgroups; consumer w holds dQ columns 128 w .. 128 w + 127 (64 fp32). The producer
// copies the tile's Q and dO once (they complete with the first stage), then streams the list's
// 64-key K and V tiles (and a staged 16-bit bias's 64 x 64 tile) through kStages stages. Per key
// tile:
//
//   x  = Q K_w^T     SS wgmma, 64 queries x the warpgroup's 32 keys (32 w ..), K = head dim
//   dP = dO V_w^T    SS wgmma
//   element passes -> dS of those 32 keys, dbias duties (per entry: the warpgroup's keys)
//   dS -> shared memory (16-bit, (64 queries x 64 keys) K-major); both warpgroups meet
//   dQ[:, 128 w ..] += dS K[:, 128 w ..]   SS wgmma over all 64 keys, K read as the MN-major
//                                          (columns x keys) view of its stage
//
// issued before the next tile's x and dP, as in the dK/dV pass. kRows sums each row's dS over
// both warpgroups' keys: the second hands its partial sums to the first through shared memory at
// the end (a fixed order: deterministic).
//
// Not here: per-row top-k over compacted keys (gathered tiles) and softcap, which run the sm80
// pass (sm90_dq_kernel).
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
  // the B operand of warpgroup w's x and dP; K's bytes also as the (N = 128 columns, K = 32 keys,
  // column half, sub-tile) MN-major B operand of dQ (see Sm90DkvWideTiles::SmemLayoutQt).
  using SmemLayoutK = typename Sm90DkvWideTiles<Elt>::SmemLayoutQ;
  using SmemLayoutKt = typename Sm90DkvWideTiles<Elt>::SmemLayoutQt;
  // dS of a key tile (queries x keys), K-major: the A operand of dQ.
  using SmemLayoutDs = typename Sm90DkvWideTiles<Elt>::SmemLayoutP;
  using TiledMmaS = typename Sm90DkvWideTiles<Elt>::TiledMmaS;
  using TiledMmaDq = typename Sm90DkvWideTiles<Elt>::TiledMmaKV;

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

// kDuty == dq_bias_duty(p), kRowTopK == (p.row_topk.key != null), as in dq_kernel_sm90; the
// staged bias is a runtime branch here (no spills either way).
template <class Elt, DqBiasDuty kDuty, bool kRowTopK>
__global__ void __launch_bounds__(Sm90DqWideTiles<Elt>::kThreads, 1)
    dq_kernel_sm90_wide(const __grid_constant__ BackwardParams p) {
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
  const int64_t list_row =
      (int64_t(p.map.map_batch == 1 ? 0 : b) * p.map.map_heads + h / p.map.head_group) *
          p.map.m_blocks + m;
  const int n_full = p.map.full_count[list_row];
  const int total = n_full + p.map.partial_count[list_row];
  const int32_t* full_list = p.map.full_index + list_row * p.map.n_blocks;
  const int32_t* partial_list = p.map.partial_index + list_row * p.map.n_blocks;
  auto block_at = [&](int it) { return it < n_full ? full_list[it] : partial_list[it - n_full]; };

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
      const int n = block_at(j);
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
#pragma unroll 1
      for (int w = 0; w < Tiles::kConsumerWarpGroups; ++w) {  // the two 32-key sub-tiles
        const int at = stage * kStageElems + w * Tiles::kSubTileElems;
        const int key = n * kBlockN + w * kQuarter;
        load_rows_async<kHeadDim, kQuarter, kLoaders>(s_k + at, k_dst.first, k_dst.step, k,
                                                      p.k_stride_s, key, p.seqlen_k, p.head_dim,
                                                      k_dst.half);
        load_rows_async<kHeadDim, kQuarter, kLoaders>(s_v + at, k_dst.first, k_dst.step, v,
                                                      p.v_stride_s, key, p.seqlen_k, p.head_dim,
                                                      k_dst.half);
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
  const int wg = (int(threadIdx.x) - Tiles::kProducerThreads) / 128;
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

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(ct);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);      // (MMA, 1, MMA_K, 1)
  Tensor tSrDo = thr_s.partition_fragment_A(sDo);    // (MMA, 1, MMA_K, 1)
  Tensor tSrK = thr_s.partition_fragment_B(sK);      // (MMA, 1, MMA_K, sub-tile)
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
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    i_row[r] = row0 + warp * 16 + g + 8 * r;
    const bool valid = i_row[r] < p.seqlen_q;
    const int i = min(i_row[r], p.seqlen_q - 1);
    lse2[r] = valid ? p.lse[b * p.lse_stride_b + h * p.lse_stride_h + int64_t(i) * p.lse_stride_s] *
                          kLog2e
                    : -INFINITY;
    rdot[r] = valid ? p.rowdot[(int64_t(b) * p.num_heads + h) * p.seqlen_q + i] : 0.0f;
  }

  auto issue_s = [&](auto& acc, const auto& a, const auto& bop, int sub) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(a); ++kb) {
      gemm(mma_s, a(_, _, kb, 0), bop(_, _, kb, sub), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
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
    const int n = block_at(j);
    const bool check = j >= n_full || (n + 1) * kBlockN > p.seqlen_k || row0 + kBlockM > p.seqlen_q;
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    fence_async_shared();  // the producer's cp.async writes, before wgmma reads them
    issue_s(tSrS, tSrQ, tSrK, 2 * stage + wg);
    issue_s(tSrDp, tSrDo, tSrV, 2 * stage + wg);
    warpgroup_wait<1>();  // dQ_{j-1} and x_j
    warpgroup_fence_operand(tSrS);
    if (j > 0 && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);

    auto& s = *reinterpret_cast<float(*)[kNTiles][4]>(raw_pointer_cast(tSrS.data()));
    const DqIndex ix{{i_row[0], i_row[1]}, n * kBlockN + kw, t};
    scale_pass(s, p.scale_log2);
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
    uint32_t ds_pairs[kNTiles][2];
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) ds_pairs[c][r] = Elt::pack(ds[c][2 * r], ds[c][2 * r + 1]);
    if constexpr (kDuty == DqBiasDuty::kFp32) {
      dq_pass_dbias<Elt>(p, b, h, i_row, n * kBlockN + kw, t, ds, row_grad);
    } else if constexpr (kDuty == DqBiasDuty::kPacked) {
#pragma unroll
      for (int c = 0; c < kNTiles; ++c)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          store_dbias_pair16(p, b, h, i_row[r], n * kBlockN + kw + c * 8 + 2 * t, ds_pairs[c][r]);
        }
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
