#pragma once
// Hopper backward passes (dkdv_kernel_sm90, then dq_kernel_sm90 below). dK/dV pass: warpgroup
// MMA (wgmma, sm_90a) over the same transposed block lists, work order and element passes as
// dkdv_kernel (backward_kernel.cuh), for kernel head dims 64 and 128 (head dim 256:
// backward_wide_sm90.cuh).
//
// CTA (64-key tile n, kv head hk, batch b) = one producer warpgroup + two consumer warpgroups
// (per-row top-k over compacted keys: group n of the plan's dK/dV groups of slots, gathered by
// slot, with the group's own query-tile lists; BlockMapParams::dkv_slots, core/dkv_order.h).
// The producer copies the K and V tiles once, then streams the 64-query halves of the work list
// (Q, dO, LSE, rowdot, and a staged 16-bit bias's 64 x 64 tile) through kStages cp.async stages,
// announcing each on a "full" mbarrier. The consumers share the key tile and take alternate halves
// (half j: warpgroup j % 2, stage j % kStages), each with its own dK and dV accumulators, so one's
// element passes run under the other's products; at the end the second adds its dK and dV into
// the first's through shared memory (a fixed order: results stay deterministic). Per half, a
// consumer (owning the 64 key rows, 16 per warp, as in dkdv_kernel) runs:
//
//   x^T  = K Q^T    SS wgmma (64 keys x 64 queries, K = head dim)
//   dP^T = V dO^T   SS wgmma
//   element passes -> P^T, dS^T (column sums of dS for BiasGrad::kColumns), dX^T (= dS^T
//                     without softcap, dS^T (1 - t^2) with it: kSoftcap, softcap_pass)
//   dV  += P^T dO   RS wgmma: P^T from registers, dO as the MN-major (head dim x queries) operand
//   dK  += dX^T Q   RS wgmma, Q likewise
//
// A Q / dO stage is stored once, K-major (queries x head dim) with the 128-byte swizzle; the
// MN-major operand view (head dim x queries) built from the MN atom tiled queries-first addresses
// the same bytes (checked on the host with CuTe: &k_major(q, d) == &mn_major(d, q) for every
// element), so both GEMMs read one copy.

#include "cuda/backward_kernel.cuh"
#include "cuda/forward_kernel_sm90.cuh"

namespace fsa::detail::cuda {

// The shared-memory tiles and products of a dK/dV pass whose CTA holds kKeys keys and streams
// kQueries-query steps through kStages stages:
//   SmemLayoutKV  K and V (keys x head dim), K-major: the A operands of x^T = K Q^T, dP^T = V dO^T;
//   SmemLayoutQ   Q / dO per stage (queries x head dim), K-major: those products' B operands ...
//   SmemLayoutQt  ... and the same bytes as the (N = head dim, K = queries) MN-major B operand of
//                 dV += P^T dO and dK += dS^T Q (checked on the host with CuTe: &k_major(q, d) ==
//                 &mn_major(d, q) for every element);
//   TiledMmaS     SS, 64 keys x kQueries, K = head dim;  TiledMmaKV  RS, 64 keys x head dim.
template <class T, int kKeys, int kQueries, int kHeadDim, int kStages>
struct DkvGmmaTiles {
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kKeys>, cute::Int<kHeadDim>, cute::_1>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kQueries>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutQt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kQueries>, cute::Int<kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using TiledMmaS = decltype(cute::make_tiled_mma(cute::GMMA::ss_op_selector<
                             T, T, float,
                             cute::Shape<cute::_64, cute::Int<kQueries>, cute::Int<kHeadDim>>>()));
  using TiledMmaKV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kQueries>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
  static constexpr int kSmemKV = int(cute::cosize_v<SmemLayoutKV>);  // elements, each of K and V
  static constexpr int kSmemQ = int(cute::cosize_v<SmemLayoutQ>);    // elements, each of Q and dO
  static_assert(kSmemQ == kStages * kQueries * kHeadDim &&
                    kSmemQ == int(cute::cosize_v<SmemLayoutQt>),
                "stages are contiguous tiles, viewed two ways");
};

template <int kHeadDim_, class Elt>
struct Sm90DkvTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the sm90 dK/dV pass covers head dims 64, 128");
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static_assert(kBlockN == 64, "one consumer warpgroup owns the plan's key tile");
  static constexpr int kHalf = 64;  // queries per step, as in dkdv_kernel
  static constexpr int kHalves = kBlockM / kHalf;
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // One CTA per SM: a consumer holds dK and dV (2 x 64 fp32 at D = 128), x^T and dP^T (2 x 32)
  // and the two bf16 A operands (2 x 16); at 216 registers ptxas spilled and serialized the
  // wgmma. setmaxnreg moves registers within the CTA's launch allocation (168 per thread at 384
  // threads): 128 * (168 - 24) = 256 * (240 - 168). The producer spills a little at 24 (64 bytes
  // at D = 128); consumers at 232 spilled 148.
  static constexpr int kCtasPerSm = 1;
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  // Stages of (Q, dO) halves: 4 x 32.5 KiB + K and V = 162 KiB at D = 128. Even, so that each
  // consumer warpgroup always uses the same stages.
  static constexpr int kStages = 4;
  static_assert(kStages % kConsumerWarpGroups == 0, "half j: warpgroup j % 2, stage j % kStages");
  // The second consumer's dK and dV (fp32, thread-major) for the first to add, over the Q / dO
  // stages once both are done with them.
  static_assert(2 * 64 * kHeadDim * 4 <= 2 * kStages * kHalf * kHeadDim * 2,
                "the dK / dV exchange fits in the stages");

  using T = typename CuteElement<Elt>::type;
  using Gmma = DkvGmmaTiles<T, kBlockN, kHalf, kHeadDim, kStages>;
  using SmemLayoutKV = typename Gmma::SmemLayoutKV;
  using SmemLayoutQ = typename Gmma::SmemLayoutQ;
  using SmemLayoutQt = typename Gmma::SmemLayoutQt;
  using TiledMmaS = typename Gmma::TiledMmaS;
  using TiledMmaKV = typename Gmma::TiledMmaKV;
  static constexpr int kSmemKV = Gmma::kSmemKV, kSmemQ = Gmma::kSmemQ;
  // Per stage, the half's raw LSE and rowdot (fp32, 64 each), after the tiles.
  static constexpr int kStatsOffset = (2 * kSmemKV + 2 * kSmemQ) * 2;
  static constexpr int kBarrierOffset = kStatsOffset + kStages * 2 * kHalf * 4;
  // The softmax pin experiment's word (pin_probabilities), allocated only when it is built.
  static constexpr int kPinOffset = kBarrierOffset + 2 * kStages * 8;
  static constexpr int kSmemBytes = kPinOffset + ((FSA_SM90_SOFTMAX_PIN & 2) ? 8 : 0);
  // A staged bias (Params::bias_staged) lives after the barriers, so that launches without one
  // keep their shared memory (and the L1 that the rest of the carveout leaves) as it was. Per
  // stage its (64 queries x 64 keys) tile, SmemTile<64>.
  static constexpr int kBiasOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kBiasStageElems = kHalf * kBlockN;
  static constexpr int smem_bytes(bool staged_bias) {
    return staged_bias ? kBiasOffset + kStages * kBiasStageElems * 2 : kSmemBytes;
  }
};

// Per-row top-k over compacted keys (BlockMapParams::dkv_slots): the 64 slots of group n that CTA
// (n, kv head hk, batch b) runs, -1 past the list's count; null on every other path, where CTA n
// runs the key tile n.
__device__ __forceinline__ const int32_t* dkv_group_slots(const BackwardParams& p, int n, int hk,
                                                          int b) {
  if (p.map.dkv_slots == nullptr) return nullptr;
  return p.map.dkv_slots + int64_t(map_list_of(p, hk, b)) * p.map.n_blocks * 64 + n * 64;
}

// A consumer thread's dK (scaled) and dV rows at the end of a dK/dV pass: its two key rows
// (key_row, seqlen_k and past: none) of the 64-row C fragments tdK and tdV (values 4 d + 2 r + e:
// row r, columns 8 d + 2 t + e). Into the share's fp32 rows when the key tile's query work is
// split (DkvShares; dkv_reduce_kernel sums them), else into dk and dv. The fragments cover
// columns col0 .. col0 + 8 kDTiles - 1 of rows kHeadDim wide (the D = 256 split pass: 128
// columns per consumer warpgroup); write_k / write_v = false leaves that gradient to another
// warpgroup (the D = 256 pass in roles).
template <class Elt, int kDTiles, int kHeadDim = kDTiles * 8, class Acc>
__device__ __forceinline__ void write_dkdv_rows(const BackwardParams& p, const DkvCta& cta, int hk,
                                                int b, const int (&key_row)[2], int t,
                                                const Acc& tdK, const Acc& tdV, int col0 = 0,
                                                bool write_k = true, bool write_v = true) {
  const DkvShares shares = dkv_shares(p, hk, b);
  if (shares.log2 > 0) {  // this share's dK (scaled) and dV in fp32, summed by dkv_reduce_kernel
    const int64_t per = int64_t(p.batch) * p.dkv_rows * p.num_kv_heads * kHeadDim;
    const int row0 = (cta.x & ((1 << shares.log2) - 1)) * shares.stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_row[r];
      if (key >= p.seqlen_k) continue;
      float* krow = p.dkv_partial +
                    ((int64_t(b) * p.dkv_rows + row0 + key) * p.num_kv_heads + hk) * kHeadDim;
      float* vrow = krow + per;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        const int c = col0 + d * 8 + 2 * t;
        if (write_k) {
          *reinterpret_cast<float2*>(krow + c) =
              make_float2(tdK(4 * d + 2 * r) * p.scale, tdK(4 * d + 2 * r + 1) * p.scale);
        }
        if (write_v) {
          *reinterpret_cast<float2*>(vrow + c) =
              make_float2(tdV(4 * d + 2 * r), tdV(4 * d + 2 * r + 1));
        }
      }
    }
    return;
  }
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
      const uint32_t kp = Elt::pack(tdK(4 * d + 2 * r) * p.scale, tdK(4 * d + 2 * r + 1) * p.scale);
      const uint32_t vp = Elt::pack(tdV(4 * d + 2 * r), tdV(4 * d + 2 * r + 1));
      if (c < p.head_dim) {
        if (write_k) *reinterpret_cast<uint16_t*>(krow + c) = uint16_t(kp & 0xffffu);
        if (write_v) *reinterpret_cast<uint16_t*>(vrow + c) = uint16_t(vp & 0xffffu);
      }
      if (c + 1 < p.head_dim) {
        if (write_k) *reinterpret_cast<uint16_t*>(krow + c + 1) = uint16_t(kp >> 16);
        if (write_v) *reinterpret_cast<uint16_t*>(vrow + c + 1) = uint16_t(vp >> 16);
      }
    }
  }
}

// The dK/dV passes' element steps on x^T and dP^T (rows: keys; column 8 c + 2 t + (e & 1) of
// the thread's entry s[c][e]: a query of the half, whose raw LSE and rowdot are lse[] and rdot[]):
//   probabilities_t: P^T = exp2(scale x^T - LSE log2(e)), exact zeros for dropped entries and
//     empty rows; `scale` is what key_row_logits left to apply (one fma per entry either way);
//   ds_t: dS^T = P^T (dP^T - rowdot) (dX without softcap), 0 where P = 0 even when dP is not
//     finite (NaN / Inf stored in V at a dropped key; as a branch on partial tiles only, ptxas
//     spilled in both passes); each column's rowdot read once, a pair per 64-bit load (taken by
//     reference, it was read once per entry, under the entry's P != 0);
//   pack_pairs: the 16-bit pairs of a 64-column C fragment, which are, value for value, the A
//     fragment of a 64-row RS wgmma over those columns.
// kFinite: the lean passes' twins without the per-entry guards, for calls whose V, rowdot and
// LSE hold no NaN / Inf that could reach them (BackwardParams::nonfinite) and whose scale is
// positive; `lse` is then BackwardParams::lse_log2's stage (load_step_stats_async). The values
// are the guarded ones (bit for bit but the sign of a dS that is zero with P != 0): an empty
// row's LSE (-inf) taken as +inf makes exp2 of its every entry exp2(-inf) = 0, as a dropped
// entry's x = -inf does (-inf times a positive scale, minus a finite or infinite LSE), and with
// dP and rowdot finite P = 0 gives dS = fma(0, dP - rowdot, +0) = +0.
template <bool kFinite = false, int kC>
__device__ __forceinline__ void probabilities_t(float (&s)[kC][4], const float* lse, int t,
                                                float scale = 1.0f) {
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float l = lse[c * 8 + 2 * t + (e & 1)];
      if constexpr (kFinite) {
        s[c][e] = fast_exp2(fmaf(s[c][e], scale, -l));  // l: lse_log2, -inf as +inf
      } else {
        const float lse2 = l * kLog2e;
        const bool keep = s[c][e] != -INFINITY && lse2 != -INFINITY;
        s[c][e] = keep ? fast_exp2(fmaf(s[c][e], scale, -lse2)) : 0.0f;
      }
    }
}
__device__ __forceinline__ float ds_entry(float pt, float dpt, float rdot) {
  return pt != 0.0f ? pt * (dpt - rdot) : 0.0f;
}
template <bool kFinite = false, int kC>
__device__ __forceinline__ void ds_t(float (&ds)[kC][4], const float (&pt)[kC][4],
                                     const float* rdot, int t) {
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const float2 r = *reinterpret_cast<const float2*>(rdot + c * 8 + 2 * t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float rd = e & 1 ? r.y : r.x;
      ds[c][e] = kFinite ? fmaf(pt[c][e], ds[c][e] - rd, 0.0f) : ds_entry(pt[c][e], ds[c][e], rd);
    }
  }
}
// Whether the other instantiation of a lean pass's pair does this call's work
// (BackwardParams::nonfinite): the one without guards (kFinite) where the flag reads 0, the
// guarded one where it does not. Without a flag only the guarded one is launched, and runs.
template <bool kFinite>
__device__ __forceinline__ bool pair_twin_runs(const BackwardParams& p) {
  return p.nonfinite != nullptr && (*p.nonfinite == 0) != kFinite;
}
// ds_t with P^T read from shared memory as it goes: fp32 in fragment order (value 4 c + e of
// warpgroup thread ct at pt[(4 c + e) * 128 + ct]), so that no register array holds it.
template <int kC>
__device__ __forceinline__ void ds_t_shared(float (&ds)[kC][4], const float* pt, int ct,
                                            const float* rdot, int t) {
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ds[c][e] = ds_entry(pt[(4 * c + e) * 128 + ct], ds[c][e], rdot[c * 8 + 2 * t + (e & 1)]);
    }
}
// The backward's counterpart of pin_before_wait (bits 2, 4 and 8 of FSA_SM90_SOFTMAX_PIN, an
// experiment, in the lean passes only: the general ones spilled more with it): P^T's
// 16-bit pairs folded by XOR into one word and stored before the wait for dP^T, so that every
// exp2 of the step is issued while dP^T is computed (in the D = 128 bf16 build 12 of the lean
// dK/dV pass's 32 otherwise follow the wait).
template <class Elt, int kC>
__device__ __forceinline__ void pin_probabilities(const float (&pt)[kC][4], const void* word,
                                                  bool writer) {
  uint32_t folded = 0;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    folded ^= Elt::pack(pt[c][0], pt[c][1]) ^ Elt::pack(pt[c][2], pt[c][3]);
  }
  pin_before_wait(word, __uint_as_float(folded), writer);
}
template <class Elt, int kC>
__device__ __forceinline__ void pack_pairs(uint32_t* regs, const float (&x)[kC][4]) {
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    regs[2 * c] = Elt::pack(x[c][0], x[c][1]);
    regs[2 * c + 1] = Elt::pack(x[c][2], x[c][3]);
  }
}

// Softcap (Params::softcap_in != 0; the passes' kSoftcap instantiations): the logits' scale step
// becomes the cap, s = c tanh(scale x / c) log2(e) (a bias is added after it, SPEC's order), and
// the slope 1 - t^2 of dX = dS (1 - t^2) is kept per entry as fp16 pairs laid out as pack_pairs'
// (slope[2 c + r]: entries (c, 2 r) and (c, 2 r + 1)). The slope lies in [0, 1], where fp16 keeps
// 11 bits, more than the 16-bit dX it scales. softcap_tanh, as the forward's: its LSE came from
// the same logits.
template <int kC>
__device__ __forceinline__ void softcap_pass(float (&s)[kC][4], uint32_t* slope, float in,
                                             float out) {
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float t0 = softcap_tanh(s[c][2 * r] * in), t1 = softcap_tanh(s[c][2 * r + 1] * in);
      s[c][2 * r] = t0 * out;
      s[c][2 * r + 1] = t1 * out;
      slope[2 * c + r] = Fp16::pack(1.0f - t0 * t0, 1.0f - t1 * t1);
    }
}
// dX = dS (1 - t^2) in place, from softcap_pass's slopes; 0 where dS is (a dropped entry whose
// raw product was not finite has a NaN slope).
__device__ __forceinline__ float slope_entry(float ds, float slope) {
  return ds != 0.0f ? ds * slope : 0.0f;
}
template <int kC>
__device__ __forceinline__ void apply_slope(float (&ds)[kC][4], const uint32_t* slope) {
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 f = Fp16::unpack(slope[2 * c + r]);
      ds[c][2 * r] = slope_entry(ds[c][2 * r], f.x);
      ds[c][2 * r + 1] = slope_entry(ds[c][2 * r + 1], f.y);
    }
}

// A dK/dV producer thread's share of a 64-query step's raw statistics (cp.async): threads 0-63
// copy the LSE (kFinite: lse_log2), threads 64-127 the rowdot of query q0 + threadIdx.x % 64 into
// the stage's s_lse / s_rdot, zero past Sq (those queries are dropped by the consumers' drop
// pass).
template <bool kFinite = false>
__device__ __forceinline__ void load_step_stats_async(const BackwardParams& p, int b, int h, int q0,
                                                      float* s_lse, float* s_rdot) {
  const int c = int(threadIdx.x % 64u);
  const bool loads_lse = threadIdx.x < 64u;
  const int i = q0 + c;
  const bool valid = i < p.seqlen_q;
  const int64_t row = (int64_t(b) * p.num_heads + h) * p.seqlen_q + (valid ? i : 0);
  const float* src = !loads_lse ? p.rowdot + row
                     : kFinite  ? p.lse_log2 + row
                                : p.lse + b * p.lse_stride_b + h * p.lse_stride_h +
                                     int64_t(valid ? i : 0) * p.lse_stride_s;
  cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
      *reinterpret_cast<const uint32_t*>(src),
      *reinterpret_cast<uint32_t*>((loads_lse ? s_lse : s_rdot) + c), valid);
}

// A dK/dV producer's copy of one step's Q and dO rows q0 .. q0 + 63 of head h into their stage
// tiles (K-major, 128-byte swizzle: 8 KB blocks of 64 x 64). By TMA where the call has tensor
// maps (thread 0 issues the boxes, whose bytes complete on `full`), else by cp.async (q_dst: the
// stage layout's GmmaLoadOffsets); either way rows past Sq and columns past the head dim are
// zeros.
template <int kHeadDim, int kLoaders>
__device__ __forceinline__ void load_step_rows_async(const BackwardParams& p,
                                                     const QdoTensorMaps& tma, uint16_t* s_q,
                                                     uint16_t* s_do, const GmmaLoadOffsets& q_dst,
                                                     int b, int h, int q0, uint64_t* full) {
  constexpr int kRows = 64;
  if (tma.enabled) {
    if (threadIdx.x == 0) {
      mbarrier_expect_tx(full, 2 * kRows * kHeadDim * 2);
#pragma unroll
      for (int c = 0; c < kHeadDim / 64; ++c) {
        tma_load_4d(s_q + c * kRows * 64, tma.q, 64 * c, q0, h, b, full);
        tma_load_4d(s_do + c * kRows * 64, tma.dout, 64 * c, q0, h, b, full);
      }
    }
    return;
  }
  load_rows_async<kHeadDim, kRows, kLoaders>(
      s_q, q_dst.first, q_dst.step,
      static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s, q0,
      p.seqlen_q, p.head_dim, q_dst.half);
  load_rows_async<kHeadDim, kRows, kLoaders>(
      s_do, q_dst.first, q_dst.step,
      static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h,
      p.do_stride_s, q0, p.seqlen_q, p.head_dim, q_dst.half);
}

// The element passes of x^T up to its probabilities, the rows being keys (`key_row`, as in ix;
// the sm90 dK/dV pass and the fused pass): the per-key bias's fma (`key_bias`: KeyRowBias, or
// KeyRowBiasHeld in the lean passes) where it applies, else the scale and a staged bias
// (`staged`, the tile's rows from `staged_row0`) or a general one; then, on a step that needs
// them, the drops: each key row's interval of queries [keep_lo, keep_hi] in the lean passes
// (kLean), drop_pass otherwise. kSoftcap: the cap in place of the scale (softcap_pass, its slopes
// into `slope`), the bias added after it. Returns the scale still to apply, which
// probabilities_t folds into its fma with the LSE: the lean passes' without a per-key bias (a
// multiply per entry fewer; their drops set -inf, which probabilities_t turns into 0 whatever the
// scale), else 1.
template <class Elt, bool kLean, bool kRowTopK, bool kSoftcap = false, class KeyBias, int kN>
__device__ __forceinline__ float key_row_logits(const BackwardParams& p, int b, int h,
                                                const int (&key_row)[2], bool by_key_row,
                                                KeyBias& key_bias, const uint16_t* staged,
                                                int staged_row0, bool check,
                                                const int (&keep_lo)[2], const int (&keep_hi)[2],
                                                const DkvIndex& ix, float (&s)[kN][4],
                                                uint32_t* slope = nullptr) {
  static_assert(!(kLean && kSoftcap), "the lean passes have no softcap");
  if constexpr (kSoftcap) softcap_pass(s, slope, p.softcap_in, p.softcap_out);
  float scale_left = 1.0f;
  if (by_key_row) {
    key_bias.template scale_add<Elt, !kSoftcap>(p, b, h, key_row, s);
  } else if constexpr (kLean) {  // (the lean passes' bias, if any, is KeyRowBias's)
    scale_left = p.scale_log2;
  } else {
    if constexpr (!kSoftcap) scale_pass(s, p.scale_log2);
    if (p.bias_staged) {
      // Entry (key row, query column) is element (query, key) of the staged tile.
      add_staged_bias<Elt, true>(s, staged, staged_row0, kLog2e);
    } else if (p.bias) {
      bias_pass<Elt>(p, b, h, s, ix);
    }
  }
  if (check) {
    if constexpr (kLean) {
      keep_query_interval(s, keep_lo, keep_hi, ix);
    } else {
      drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
    }
  }
  return scale_left;
}

// kRowTopK == (p.row_topk.key != null), as in dq_kernel (backward_kernel.cuh). kLean: the pass
// for calls whose entries drop by causality alone, without a bias or with a query-invariant one
// that is not staged, over the key tiles themselves (lean_dkdv_call, the host's choice): its
// element passes are one fma or multiply per entry and, on partial tiles, one compare pair
// (causal_query_interval), where the general passes (mask, row bounds, staged or general bias,
// gathered slots) more than doubled the kernel's code (docs/perf.md, thirty-second session).
// kSoftcap == (p.softcap_in != 0): the cap and dX = dS (1 - t^2) (softcap_pass, apply_slope),
// never lean.
//
// kSlotRows (dkdv_kernel_sm90_slot_rows, with kLean): the lean pass over per-row top-k's dK/dV
// groups of compacted keys (BlockMapParams::dkv_slots), whose key rows are the group's slots
// (gathered) and keep the interval of queries [key_first, key_last] of each slot (RowEnd;
// slot_query_interval), held across the steps of a head.
template <int kHeadDim, class Elt, bool kRowTopK, bool kLean, bool kSoftcap, bool kSlotRows,
          bool kFinite>
__device__ __forceinline__ void dkdv_sm90_cta(const BackwardParams& p, const QdoTensorMaps& tma) {
  using namespace cute;
  static_assert(!kFinite || kLean, "the guard-free twins are the lean passes'");
  static_assert(!(kLean && kRowTopK), "the lean pass has no per-row top-k");
  static_assert(!(kLean && kSoftcap), "the lean pass has no softcap");
  static_assert(!kSlotRows || kLean, "the slot rows' pass is a lean one");
  using Tiles = Sm90DkvTiles<kHeadDim, Elt>;
  using T = typename Tiles::T;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kHalf = Tiles::kHalf;
  constexpr int kStages = Tiles::kStages;
  constexpr int kCTiles = kHalf / 8, kDTiles = kHeadDim / 8;
  constexpr int kStageElems = kHalf * kHeadDim;

  // Dynamic shared memory starts 1024-byte aligned (no static shared memory), as the 128-byte
  // swizzle needs; every tile below is a multiple of 1024 bytes.
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);
  T* smem_v = smem_k + Tiles::kSmemKV;
  T* smem_q = smem_v + Tiles::kSmemKV;
  T* smem_do = smem_q + Tiles::kSmemQ;
  float* s_lse = reinterpret_cast<float*>(smem_raw + Tiles::kStatsOffset);  // (kStages, kHalf)
  float* s_rdot = s_lse + kStages * kHalf;                                 // (kStages, kHalf)
  auto* s_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kBiasOffset);
  // A stage is released by the one consumer warpgroup that used it (its four warps).
  uint64_t* full_bar = init_stage_barriers<kStages, Tiles::kProducerThreads, 128>(
      smem_raw + Tiles::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;

  // Key tile n: the one of rank cta.x >> log2 in its list's order (dkv_unit); cta.x % 2^log2 is
  // this CTA's share of its query work (DkvShares, DkvWorkCursor). Past the tiles that hold work
  // (a compacted key mask's count) nothing is read or written.
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
    // Producer: K and V first (their copies complete before stage 0's arrival), then half j into
    // stage j % kStages once the consumer released what used it before.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    const typename Tiles::SmemLayoutKV layout_kv;
    const typename Tiles::SmemLayoutQ layout_q;
    const auto kv_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_kv, false);
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    const auto* k_rows = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    const auto* v_rows = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
    if (const int32_t* group = kLean && !kSlotRows ? nullptr : dkv_group_slots(p, n, hk, b)) {
      load_gathered_rows_async<kHeadDim, kBlockN, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_k), kv_dst, reinterpret_cast<uint16_t*>(smem_v), kv_dst,
          k_rows, p.k_stride_s, v_rows, p.v_stride_s, group, p.head_dim);
    } else {
      load_rows_async<kHeadDim, kBlockN, kLoaders>(reinterpret_cast<uint16_t*>(smem_k),
                                                   kv_dst.first, kv_dst.step, k_rows,
                                                   p.k_stride_s, key0, p.seqlen_k, p.head_dim);
      load_rows_async<kHeadDim, kBlockN, kLoaders>(reinterpret_cast<uint16_t*>(smem_v),
                                                   kv_dst.first, kv_dst.step, v_rows,
                                                   p.v_stride_s, key0, p.seqlen_k, p.head_dim);
    }
    auto* s_q = reinterpret_cast<uint16_t*>(smem_q);
    auto* s_do = reinterpret_cast<uint16_t*>(smem_do);
    DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
    for (int j = 0; !cur.done(); ++j, cur.advance()) {
      const int stage = j % kStages, h = cur.h;
      const int q0 = cur.m() * kBlockM + cur.half * kHalf;
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      load_step_rows_async<kHeadDim, kLoaders>(p, tma, s_q + stage * kStageElems,
                                               s_do + stage * kStageElems, q_dst, b, h, q0,
                                               &full_bar[stage]);
      load_step_stats_async<kFinite>(p, b, h, q0, s_lse + stage * kHalf, s_rdot + stage * kHalf);
      if (!kLean && p.bias_staged) {  // rows = the half's queries, columns = this CTA's keys
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
  // Consumer warpgroup wg, thread ct within it.
  const int wg = uniform_warpgroup(Tiles::kProducerThreads);
  const int ct = int(threadIdx.x) % 128;
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;
  auto consumers_sync = [] {  // both consumer warpgroups (named barrier 1)
    asm volatile("bar.sync 1, %0;\n" ::"n"(Tiles::kConsumerThreads) : "memory");
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
  Tensor tSrK = thr_s.partition_fragment_A(sK);     // (MMA, 1, MMA_K, 1)
  Tensor tSrV = thr_s.partition_fragment_A(sV);     // (MMA, 1, MMA_K, 1)
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);     // (MMA, 1, MMA_K, stage)
  Tensor tSrDo = thr_s.partition_fragment_B(sDo);   // (MMA, 1, MMA_K, stage)
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tKVrDot = thr_kv.partition_fragment_B(sDot);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kHalf>>{});   // x^T
  Tensor tSrDp = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kHalf>>{});  // dP^T
  Tensor tdK = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tdV = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  static_assert(decltype(size(tSrS))::value == kCTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tdK))::value == kDTiles * 4, "one 16-row C fragment per warp");
  // P^T and dS^T as RS A operands: the C fragment of query columns 16 kk .. 16 kk + 15 is, value
  // for value, the A fragment of k-block kk (see forward_kernel_sm90).
  Tensor tP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  Tensor tDs = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  auto* p_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tP.data()));
  auto* ds_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tDs.data()));
  clear(tdK);
  clear(tdV);

  // The thread's two key rows: of the key tile, or the group's slots (seqlen_k past the list's
  // count: such a row is dropped, and neither stored nor summed).
  int key_row[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  if (const int32_t* group = kLean && !kSlotRows ? nullptr : dkv_group_slots(p, n, hk, b)) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int slot = group[warp * 16 + g + 8 * r];
      key_row[r] = slot >= 0 ? slot : p.seqlen_k;
    }
  }
  // Both warpgroups sum columns of the same keys: the first zeroes every head's sums, then each
  // adds its own (two fp32 additions onto zero, which commute exactly: deterministic).
  ColumnSums<true> col;
  const ColumnSums<true>::Rows col_rows{b, t, {key_row[0], key_row[1]}};
  if (wg == 0) col.zero_heads(p, col_rows, hk);
  consumers_sync();

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

  // Per half j: issue x^T and dP^T, run the element passes of x^T (up to P^T) while dP^T is
  // computed, then dS^T, and issue dV and dK together (defining an A operand while another wgmma
  // was in flight made ptxas serialize them, C7513). The products of half j overlap the wait for
  // half j + 1's stage and the issue of its x^T and dP^T.
  const bool release_lane = lane == 0;
  DkvWorkCursor<Tiles::kHalves, true> cur(p, n, hk, b);
  const bool by_key_row = KeyRowBias::applies(p);
  // The lean pass holds the per-key bias's values across steps (KeyRowBiasHeld).
  std::conditional_t<kLean, KeyRowBiasHeld, KeyRowBias> key_bias;
  // The lean pass's queries kept by each key row (the same over every query tile; over every
  // head too but for the slot rows' intervals, which are read again when the head changes).
  int keep_lo[2] = {0, 0}, keep_hi[2] = {0, 0};
  if constexpr (kLean && !kSlotRows) {
#pragma unroll
    for (int r = 0; r < 2; ++r) causal_query_interval(p, key_row[r], keep_lo[r], keep_hi[r]);
  }
  [[maybe_unused]] int interval_head = -1;  // the head whose slot intervals keep_lo / hi hold
  int prev_stage = -1;  // this warpgroup's previous stage, released once its products retire
  for (int j = 0; !cur.done(); ++j, cur.advance()) {
    if (j % Tiles::kConsumerWarpGroups != wg) continue;
    const int stage = j % kStages, h = cur.h;
    if constexpr (kSlotRows) {
      if (h != interval_head) {
        interval_head = h;
        slot_query_interval(p, b, h, key_row, keep_lo, keep_hi);
      }
    }
    // The list's entry (a global read), used once the products are issued: its latency then
    // hides under them, where computing q0 here exposed it to every step (docs/perf.md,
    // thirty-third session).
    const int m = cur.m();
    const bool partial = cur.partial();
    col.switch_to<true>(p, col_rows, h);
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    // What cp.async wrote, before wgmma reads it: K and V (complete with stage 0, before this
    // warpgroup's first half), and Q and dO without tensor maps (by TMA they need no fence).
    if (j < Tiles::kConsumerWarpGroups || !tma.enabled) fence_async_shared();
    // The previous half's dV and dK products retire before x^T and dP^T are issued: with them in
    // flight too, ptxas ran out of registers and serialized every wgmma (C7512).
    warpgroup_wait<0>();
    if (prev_stage >= 0 && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);
    prev_stage = stage;
    issue_ss(tSrS, tSrK, tSrQ, stage);
    issue_ss(tSrDp, tSrV, tSrDo, stage);
    const int q0 = m * kBlockM + cur.half * kHalf;
    const bool check = partial || key0 + kBlockN > p.seqlen_k || q0 + kHalf > p.seqlen_q;
    warpgroup_wait<1>();  // x^T
    warpgroup_fence_operand(tSrS);

    // The element passes work in place on the accumulators (flat index 4 c + e = s[c][e]).
    auto& s = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrS.data()));
    const DkvIndex ix{{key_row[0], key_row[1]}, q0, t};
    uint32_t slope[kSoftcap ? 2 * kCTiles : 1];
    const float scale_left = key_row_logits<Elt, kLean, kRowTopK, kSoftcap>(
        p, b, h, key_row, by_key_row, key_bias, s_bias + stage * Tiles::kBiasStageElems,
        warp * 16, check, keep_lo, keep_hi, ix, s, slope);
    // P^T, then (dP^T retired) dS^T, each packed as the A operand of dV += P^T dO and dK += dX^T Q.
    probabilities_t<kFinite>(s, s_lse + stage * kHalf, t, scale_left);
    if constexpr ((FSA_SM90_SOFTMAX_PIN & 2) && kLean) {
      pin_probabilities<Elt>(s, smem_raw + Tiles::kPinOffset, ct == 0 && wg == 0);
    }
    warpgroup_wait<0>();  // dP^T
    warpgroup_fence_operand(tSrDp);
    pack_pairs<Elt>(p_regs, s);
    auto& ds = *reinterpret_cast<float(*)[kCTiles][4]>(raw_pointer_cast(tSrDp.data()));
    ds_t<kFinite>(ds, s, s_rdot + stage * kHalf, t);
    if (p.bias_grad == BiasGrad::kColumns) col.add(ds);  // dbias takes dS, dK dX
    if constexpr (kSoftcap) apply_slope(ds, slope);
    pack_pairs<Elt>(ds_regs, ds);
    issue_rs(tdV, tP, tKVrDot, stage);
    issue_rs(tdK, tDs, tKVrQt, stage);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(tdK);
  warpgroup_fence_operand(tdV);
  col.flush<true>(p, col_rows);

  // The second warpgroup's dK and dV into the first's, over the stages (every half was consumed,
  // so every copy into them has landed; the barrier waits for the last products reading them).
  consumers_sync();
  auto* exchange = reinterpret_cast<float*>(smem_q);
  constexpr int kAcc = kDTiles * 4;  // accumulator values per thread, each of dK and dV
  if (wg == 1) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      exchange[i * 128 + ct] = tdK(i);
      exchange[(kAcc + i) * 128 + ct] = tdV(i);
    }
  }
  consumers_sync();
  if (wg == 1) return;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    tdK(i) += exchange[i * 128 + ct];
    tdV(i) += exchange[(kAcc + i) * 128 + ct];
  }

  write_dkdv_rows<Elt, kDTiles>(p, cta, hk, b, key_row, t, tdK, tdV);
}

// The dK/dV pass (dkdv_sm90_cta) for every call but the slot rows' (below). kFinite: the lean
// pass's twin without guards (probabilities_t).
template <int kHeadDim, class Elt, bool kRowTopK, bool kLean = false, bool kSoftcap = false,
          bool kFinite = false>
__global__ void __launch_bounds__(Sm90DkvTiles<kHeadDim, Elt>::kThreads,
                                  Sm90DkvTiles<kHeadDim, Elt>::kCtasPerSm)
    dkdv_kernel_sm90(const __grid_constant__ BackwardParams p,
                     const __grid_constant__ QdoTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kLean) {
    if (pair_twin_runs<kFinite>(p)) return;
  }
  dkdv_sm90_cta<kHeadDim, Elt, kRowTopK, kLean, kSoftcap, false, kFinite>(p, tma);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

// The lean dK/dV pass over per-row top-k's dK/dV groups (dkdv_sm90_cta's kSlotRows; the host's
// lean_slot_rows_call): no mask, softcap, staged or general bias, so its element passes are the
// per-key bias's fma and one compare pair per entry against each slot's interval of queries,
// where the general pass (which such calls ran before) carries every other duty's code.
// kFinite: its twin without guards (probabilities_t).
template <int kHeadDim, class Elt, bool kFinite = false>
__global__ void __launch_bounds__(Sm90DkvTiles<kHeadDim, Elt>::kThreads,
                                  Sm90DkvTiles<kHeadDim, Elt>::kCtasPerSm)
    dkdv_kernel_sm90_slot_rows(const __grid_constant__ BackwardParams p,
                               const __grid_constant__ QdoTensorMaps tma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (pair_twin_runs<kFinite>(p)) return;
  dkdv_sm90_cta<kHeadDim, Elt, false, true, false, true, kFinite>(p, tma);
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

// ------------------------------------------------------------------------------------------------
// Hopper dQ pass: the same block lists, element passes and dbias duties as dq_kernel
// (backward_kernel.cuh), for kernel head dims 64 and 128.
//
// CTA (128-query tile m, head h, batch b) = one producer warpgroup + two consumer warpgroups of 64
// query rows each (as the forward). The producer copies the tile's Q and dO once (they complete
// with the first K/V stage), then streams the 64-key K and V tiles of the list through kStages
// cp.async stages (a staged 16-bit bias's 128 x 64 tiles through two slots of their own). Per key
// tile, each consumer warpgroup (no barrier between the two: one's element passes overlap the
// other's products):
//
//   x  = Q K^T      SS wgmma (64 queries x 64 keys, K = head dim)
//   dP = dO V^T     SS wgmma
//   element passes -> dS and its dbias duties, dX (= dS without softcap)
//   dQ += dX K      RS wgmma: dX from registers, K read as the MN-major (head dim x keys) operand
//                   of the same K stage (the layout view the dK/dV pass uses for Q and dO),
//                   issued after the next tile's x and dP
//
// Issued before them (as until the twenty-second session), ptxas gave the packed dS the registers
// of dP's accumulator at D = 64 and serialized every wgmma of the kernel (C7515, every
// instantiation): dP_{j+1} would overwrite what dQ_j was still reading. Issued after them, dS_j
// is live while dP_{j+1}'s accumulator is defined, so the two cannot share registers.
template <int kHeadDim_, class Elt>
struct Sm90DqTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the sm90 dQ pass covers head dims 64, 128");
  static constexpr int kBlockM = forward_block_m(kHeadDim);  // the plan's query tile
  static constexpr int kBlockN = forward_block_n(kHeadDim);  // the plan's key tile
  static_assert(kBlockM == 128 && kBlockN == 64, "two consumer warpgroups of 64 query rows");
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = kWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // 128 * 40 + 256 * 232 = 64512 <= 65536 (the forward's split). A consumer holds dQ (64 fp32 at
  // D = 128), x and dP (2 x 32) and the dS A operand (16).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  // Gathered tiles (the forward's split, for the same reason): 128 * 56 + 256 * 224 = 64512.
  static constexpr int kGatheredProducerRegisters = 56;
  static constexpr int kGatheredConsumerRegisters = 224;
  // Q, dO (2 x 32 KiB) + 4 stages of K and V (4 x 32 KiB) = 192 KiB at D = 128.
  static constexpr int kStages = 4;

  using T = typename CuteElement<Elt>::type;
  // Q and dO tiles (queries x head dim), K-major: the A operands of the two SS products.
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::_1>{}));
  // K / V stages (keys x head dim), K-major: the B operands of the SS products ...
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // ... and a K stage's bytes as the (N = head dim, K = keys) MN-major B operand of dQ += dS K.
  using SmemLayoutKt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<T>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>(),
      cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>{}));
  using TiledMmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<T, T, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>{}));

  static constexpr int kSmemQ = int(cute::cosize_v<SmemLayoutQ>);  // elements, each of Q and dO
  static constexpr int kSmemK = int(cute::cosize_v<SmemLayoutK>);  // elements, each of K and V
  static_assert(kSmemK == kStages * kBlockN * kHeadDim, "stages are contiguous tiles");
  // Barriers: "full" and "empty" per stage, then "bias empty" per bias slot (below).
  static constexpr int kBiasSlots = 2;
  static constexpr int kBarrierOffset = (2 * kSmemQ + 2 * kSmemK) * 2;
  // The softmax pin experiment's word (pin_probabilities), allocated only when it is built.
  static constexpr int kPinOffset = kBarrierOffset + (2 * kStages + kBiasSlots) * 8;
  static constexpr int kSmemBytes = kPinOffset + ((FSA_SM90_SOFTMAX_PIN & 8) ? 8 : 0);
  // A staged bias (Params::bias_staged) lives after the barriers, so that launches without one
  // keep their shared memory (and the L1 that the rest of the carveout leaves) as it was. Its
  // (kBlockM x kBlockN) tiles go through a ring of two slots (four would not fit beside the K/V
  // stages at D = 128), each with a "bias empty" barrier that the consumers arrive on once they
  // have read it.
  static constexpr int kBiasOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int kBiasSlotElems = kBlockM * kBlockN;
  // Gathered tiles (BlockMapParams::gather_slots; never with a staged bias, so the same region):
  // per stage the tile's slots, their last rows (RowEnd::key_last) and their fp32 bias values. A
  // query-invariant bias of other calls travels with its K/V tile into the same bias values
  // (dq_kernel_sm90: its 64 values, fp32 or 16-bit), and such calls reserve the region too.
  static constexpr int kGatherStageBytes = 3 * kBlockN * 4;
  static constexpr int smem_bytes(bool staged_bias, bool gathered = false) {
    return staged_bias ? kBiasOffset + kBiasSlots * kBiasSlotElems * 2
           : gathered  ? kBiasOffset + kStages * kGatherStageBytes
                       : kSmemBytes;
  }
};

// The dQ pass's bias-gradient duty, a template parameter of dq_kernel_sm90. With dQ += dS K issued
// right after the pack, any use of the fp32 dS after it (even behind a runtime branch never
// taken) made ptxas serialize every wgmma of the kernel (C7515), so each duty is its own
// instantiation:
//   kNone:   no bias gradient with a query dim (the common path);
//   kPacked: kFull with a 16-bit dbias, stored from the packed dS (the same rounding): no C7515;
//   kFp32:   kFull with an fp32 dbias, kFullSummed and kRows, which need dS in fp32 (C7515
//            until dQ += dS K moved after the next tile's products; none since).
enum class DqBiasDuty { kNone, kPacked, kFp32 };

inline DqBiasDuty dq_bias_duty(const BackwardParams& p) {
  switch (p.bias_grad) {
    case BiasGrad::kFull: return p.bias_is_fp32 ? DqBiasDuty::kFp32 : DqBiasDuty::kPacked;
    case BiasGrad::kFullSummed:
    case BiasGrad::kRows: return DqBiasDuty::kFp32;
    default: return DqBiasDuty::kNone;
  }
}

// The dQ pass's bias-gradient duty (kDuty, dq_bias_duty) on a tile's dS, fragment element (c, e)
// at row i_row[e / 2] and key col0 + 8 c + 2 t + (e & 1): kFp32 by dq_pass_dbias, kPacked by
// 16-bit stores of the pairs `pair(c, r)` returns (entries (c, 2 r) and (c, 2 r + 1) packed).
template <class Elt, DqBiasDuty kDuty, int kNTiles, class Pair>
__device__ __forceinline__ void dq_pass_duty(const BackwardParams& p, int b, int h,
                                             const int (&i_row)[2], int col0, int t,
                                             const float (&ds)[kNTiles][4],
                                             float (&row_grad)[2], const Pair& pair) {
  if constexpr (kDuty == DqBiasDuty::kFp32) {
    dq_pass_dbias<Elt>(p, b, h, i_row, col0, t, ds, row_grad);
  } else if constexpr (kDuty == DqBiasDuty::kPacked) {
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        store_dbias_pair16(p, b, h, i_row[r], col0 + c * 8 + 2 * t, pair(c, r));
      }
  }
}

// kDuty == dq_bias_duty(p). kStagedBias == p.bias_staged, also an instantiation: as a runtime
// branch the staged path made ptxas spill (20 bytes) in the common instantiation and the dense dQ
// pass slower (0.455 vs 0.436 ms at (2, 4096, 16, 16, 128) causal on H100).
// kRowTopK == (p.row_topk.key != null), as in dq_kernel: per-row top-k needs a query-invariant
// bias, so it never meets kStagedBias or a dbias with a query dim. kGathered == (p.map.gather_slots
// != null): per-row top-k over compacted keys, each query tile's slots gathered into its K/V
// tiles (as in forward_kernel_sm90), with a query-invariant bias too. kLean: calls whose entries
// drop by causality alone, with no bias or a query-invariant one that travels with every key
// tile (lean_dq_call, the host's choice): the staged values' fma and, on partial tiles, one
// compare per entry against the row's visible end, as the forward's lean walk (docs/perf.md,
// thirty-second session).
// kSoftcap == (p.softcap_in != 0): the cap and dX = dS (1 - t^2) (softcap_pass, apply_slope;
// the dbias duties take dS), never lean. kFinite: the lean pass's twin without per-entry guards
// (probabilities_t; BackwardParams::nonfinite).
template <int kHeadDim, class Elt, DqBiasDuty kDuty, bool kStagedBias, bool kRowTopK,
          bool kGathered = false, bool kLean = false, bool kSoftcap = false, bool kFinite = false>
__global__ void __launch_bounds__(Sm90DqTiles<kHeadDim, Elt>::kThreads, 1)
    dq_kernel_sm90(const __grid_constant__ BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  static_assert(!kLean || (kDuty == DqBiasDuty::kNone && !kStagedBias && !kRowTopK && !kGathered &&
                           !kSoftcap),
                "the lean pass has no dbias duty, staged bias, per-row top-k, gathered tiles or "
                "softcap");
  static_assert(!kFinite || kLean, "the guard-free twin is the lean pass's");
  if constexpr (kLean) {
    if (pair_twin_runs<kFinite>(p)) return;
  }
  using Tiles = Sm90DqTiles<kHeadDim, Elt>;
  using T = typename Tiles::T;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kStages = Tiles::kStages;
  constexpr int kNTiles = kBlockN / 8, kDTiles = kHeadDim / 8;
  constexpr int kStageElems = kBlockN * kHeadDim;

  // Dynamic shared memory starts 1024-byte aligned (no static shared memory); every tile below is
  // a multiple of 1024 bytes.
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* smem_q = reinterpret_cast<T*>(smem_raw);
  T* smem_do = smem_q + Tiles::kSmemQ;
  T* smem_k = smem_do + Tiles::kSmemQ;
  T* smem_v = smem_k + Tiles::kSmemK;
  auto* s_bias = reinterpret_cast<uint16_t*>(smem_raw + Tiles::kBiasOffset);
  uint64_t* bias_empty =
      reinterpret_cast<uint64_t*>(smem_raw + Tiles::kBarrierOffset) + 2 * kStages;
  if (threadIdx.x == 0) {  // initialized before init_stage_barriers' fence and CTA barrier
    for (int slot = 0; slot < Tiles::kBiasSlots; ++slot) {
      mbarrier_init(&bias_empty[slot], Tiles::kConsumerThreads / 32);
    }
  }
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
  static_assert(!kGathered || (kDuty == DqBiasDuty::kNone && !kStagedBias && !kRowTopK),
                "gathered tiles come with a query-invariant bias");
  const int n_full = kGathered ? p.map.gather_full[list_row] : p.map.full_count[list_row];
  const int total = kGathered ? p.map.gather_tiles[list_row]
                              : n_full + p.map.partial_count[list_row];
  const int32_t* full_list = p.map.full_index + list_row * p.map.n_blocks;
  const int32_t* partial_list = p.map.partial_index + list_row * p.map.n_blocks;
  auto block_at = [&](int it) {
    return kGathered ? it : it < n_full ? full_list[it] : partial_list[it - n_full];
  };
  // Gathered tiles: tile j's slots, and per stage their copies, last rows and bias values.
  const int32_t* gather_slots = p.map.gather_slots + list_row * p.map.gather_stride;
  auto* s_gather = smem_raw + Tiles::kBiasOffset;  // per stage: slots, last rows, bias
  auto gathered_cols = [&](int stage, int what) {
    return s_gather + stage * Tiles::kGatherStageBytes + what * kBlockN * 4;
  };
  // A query-invariant bias (..., 1, Sk) with a contiguous, 16-byte aligned key dim travels with
  // each whole K/V tile into the stage's bias values (gathered_cols(stage, 2)), so that the
  // element passes never wait on a global load: read per element from global memory, it made the
  // pass a third slower (H200, (1, 16384, 32, 8, 128) block selections; docs/perf.md, twenty-ninth
  // session). The ragged last tile and other biases are read by bias_pass. Producer and consumers
  // derive the same answer; the host reserves the region for every call with such a bias
  // (sm90_dq_kernel).
  const int bias_bytes = p.bias_is_fp32 ? 4 : 2;
  const uint8_t* bias_row = [&]() -> const uint8_t* {
    // (A dQ-pass bias duty comes with a query dim.)
    if (kGathered || kStagedBias || kDuty != DqBiasDuty::kNone || p.bias == nullptr ||
        p.bias_stride[2] != 0 || p.bias_stride[3] != 1) {
      return nullptr;
    }
    const uint8_t* row = static_cast<const uint8_t*>(p.bias) +
                         (b * p.bias_stride[0] + (h / p.bias_head_group) * p.bias_stride[1]) *
                             bias_bytes;
    return reinterpret_cast<uintptr_t>(row) % 16 == 0 ? row : nullptr;
  }();
  auto bias_with_tile = [&](int n) {
    return bias_row != nullptr && (n + 1) * kBlockN <= p.seqlen_k;
  };

  if (threadIdx.x < Tiles::kProducerThreads) {
    // Producer: Q and dO with the first tile (stage 0's arrival covers them), then tile j into
    // stage j % kStages once both consumers released what used it before.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(
        kGathered ? Tiles::kGatheredProducerRegisters : Tiles::kProducerRegisters));
    constexpr int kLoaders = Tiles::kProducerThreads;
    const typename Tiles::SmemLayoutQ layout_q;
    const typename Tiles::SmemLayoutK layout_k;
    const auto q_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_q, false);
    const auto k_dst = GmmaLoadOffsets::make<kHeadDim, kLoaders>(layout_k, false);
    const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
    const auto* v = static_cast<const uint16_t*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
    auto* s_k = reinterpret_cast<uint16_t*>(smem_k);
    auto* s_v = reinterpret_cast<uint16_t*>(smem_v);
    // Gathered tiles: this head's fp32 bias row, read by slot.
    const float* gathered_bias =
        kGathered && p.bias != nullptr
            ? static_cast<const float*>(p.bias) + b * p.bias_stride[0] +
                  (h / p.bias_head_group) * p.bias_stride[1]
            : nullptr;
    if (total > 0) {
      load_rows_async<kHeadDim, kBlockM, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_q), q_dst.first, q_dst.step,
          static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h, p.q_stride_s,
          row0, p.seqlen_q, p.head_dim);
      load_rows_async<kHeadDim, kBlockM, kLoaders>(
          reinterpret_cast<uint16_t*>(smem_do), q_dst.first, q_dst.step,
          static_cast<const uint16_t*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h,
          p.do_stride_s, row0, p.seqlen_q, p.head_dim);
    }
    for (int j = 0; j < total; ++j) {
      const int stage = j % kStages;
      const int n = block_at(j);
      if (j >= kStages) mbarrier_wait(&empty_bar[stage], (j / kStages - 1) & 1);
      if constexpr (kGathered) {
        static_assert(kLoaders == 2 * kBlockN, "two producer threads per column");
        stage_gathered_columns<kBlockN>(
            gather_slots + n * kBlockN, p.row_end.key_last_row(b, h), gathered_bias,
            p.bias_stride[3],
            reinterpret_cast<int32_t*>(gathered_cols(stage, 0)),
            reinterpret_cast<int32_t*>(gathered_cols(stage, 1)),
            reinterpret_cast<float*>(gathered_cols(stage, 2)));
        load_gathered_rows_async<kHeadDim, kBlockN, kLoaders>(
            s_k + stage * kStageElems, k_dst, s_v + stage * kStageElems, k_dst, k, p.k_stride_s,
            v, p.v_stride_s, gather_slots + n * kBlockN, p.head_dim);
      } else {
        load_rows_async<kHeadDim, kBlockN, kLoaders>(s_k + stage * kStageElems, k_dst.first,
                                                     k_dst.step, k, p.k_stride_s, n * kBlockN,
                                                     p.seqlen_k, p.head_dim);
        load_rows_async<kHeadDim, kBlockN, kLoaders>(s_v + stage * kStageElems, k_dst.first,
                                                     k_dst.step, v, p.v_stride_s, n * kBlockN,
                                                     p.seqlen_k, p.head_dim);
        if (bias_with_tile(n)) {
          copy_key_bias_async<kBlockN>(bias_row, n, bias_bytes, gathered_cols(stage, 2));
        }
      }
      if constexpr (kStagedBias) {  // into slot j % 2 once both consumers read tile j - 2's
        const int slot = j % Tiles::kBiasSlots;
        if (j >= Tiles::kBiasSlots) {
          mbarrier_wait(&bias_empty[slot], (j / Tiles::kBiasSlots - 1) & 1);
        }
        load_bias_tile_async<kBlockM, kLoaders>(
            s_bias + slot * Tiles::kBiasSlotElems,
            static_cast<const uint16_t*>(p.bias) + b * p.bias_stride[0] +
                (h / p.bias_head_group) * p.bias_stride[1] + n * kBlockN,
            p.bias_stride[2], row0, p.seqlen_q, p.seqlen_k - n * kBlockN);
      }
      mbarrier_arrive_on_copies(&full_bar[stage]);
    }
    cp_async_wait<0>();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(
      kGathered ? Tiles::kGatheredConsumerRegisters : Tiles::kConsumerRegisters));
  const int wg = uniform_warpgroup(Tiles::kProducerThreads);  // warp-uniform
  const int ct = wg * 128 + int(threadIdx.x % 128u);  // 0 .. kConsumerThreads - 1
  const int warp = ct / 32, lane = ct % 32, g = lane / 4, t = lane % 4;  // rows 16 warp ..

  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Tiles::SmemLayoutQ{});
  Tensor sDo = make_tensor(make_smem_ptr(smem_do), typename Tiles::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Tiles::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Tiles::SmemLayoutKt{});

  typename Tiles::TiledMmaS mma_s;
  typename Tiles::TiledMmaDq mma_dq;
  // The smem operands' descriptors depend on the warpgroup alone: the slices are taken at its
  // first thread, a warp-uniform index, so that they are computed in uniform registers.
  auto thr_s = mma_s.get_thread_slice(wg * 128);
  auto thr_dq = mma_dq.get_thread_slice(wg * 128);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);    // (MMA, 1, MMA_K, 1): this warpgroup's rows
  Tensor tSrDo = thr_s.partition_fragment_A(sDo);  // (MMA, 1, MMA_K, 1)
  Tensor tSrK = thr_s.partition_fragment_B(sK);    // (MMA, 1, MMA_K, stage)
  Tensor tSrV = thr_s.partition_fragment_B(sV);    // (MMA, 1, MMA_K, stage)
  Tensor tDqrKt = thr_dq.partition_fragment_B(sKt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});   // x
  Tensor tSrDp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});  // dP
  Tensor tDq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  static_assert(decltype(size(tSrS))::value == kNTiles * 4, "one 16-row C fragment per warp");
  static_assert(decltype(size(tDq))::value == kDTiles * 4, "one 16-row C fragment per warp");
  // dS as the RS A operand: the C fragment of key columns 16 kk .. 16 kk + 15 is, value for value,
  // the A fragment of k-block kk (see forward_kernel_sm90).
  Tensor tDs = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>>{});
  auto* ds_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tDs.data()));
  // dQ starts from the first product (ScaleOut::Zero) rather than from cleared registers: zeroing
  // them made ptxas serialize every wgmma (C7515).
  mma_dq.accumulate_ = GMMA::ScaleOut::Zero;

  int i_row[2];
  float lse2[2], rdot[2], row_grad[2] = {0.0f, 0.0f};
  dq_row_stats(p, b, h, row0 + warp * 16 + g, i_row, lse2, rdot);
  if constexpr (kFinite) {  // an empty (or padded) row: exp2(-inf) for its every entry
#pragma unroll
    for (int r = 0; r < 2; ++r) lse2[r] = lse2[r] == -INFINITY ? INFINITY : lse2[r];
  }
  int row_end[2] = {0, 0};  // gathered tiles and the lean pass: the rows' visible ends, once
  if constexpr (kGathered || kLean) {
#pragma unroll
    for (int r = 0; r < 2; ++r) row_end[r] = visible_end(p, b, h, min(i_row[r], p.seqlen_q - 1));
  }

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

  // dQ += dS K from the packed dS and a K stage, one commit group (an empty group when there is
  // no tile yet: the waits below count groups).
  auto issue_dq = [&](int stage, bool any) {
    warpgroup_fence_operand(tDq);
    warpgroup_arrive();
    if (any) {
#pragma unroll
      for (int kb = 0; kb < size<2>(tDs); ++kb) {
        gemm(mma_dq, tDs(_, _, kb), tDqrKt(_, _, kb, stage), tDq);
        mma_dq.accumulate_ = GMMA::ScaleOut::One;
      }
    }
    warpgroup_commit_batch();
  };

  // Per tile j: issue x_j, dP_j and then dQ += dS_{j-1} K_{j-1} (why in this order: above the
  // tiles); wait for x_j and run its element passes under dP_j and dQ_{j-1}; wait for both,
  // release stage j - 1, then pack dS_j.
  const bool release_lane = lane == 0;
  for (int j = 0; j < total; ++j) {
    const int stage = j % kStages, prev_stage = (j + kStages - 1) % kStages;
    const int n = block_at(j);
    const bool check = j >= n_full || (!kGathered && (n + 1) * kBlockN > p.seqlen_k) ||
                       row0 + kBlockM > p.seqlen_q;
    mbarrier_wait(&full_bar[stage], (j / kStages) & 1);
    fence_async_shared();  // the producer's cp.async writes, before wgmma reads them
    issue_ss(tSrS, tSrQ, tSrK, stage);
    issue_ss(tSrDp, tSrDo, tSrV, stage);
    issue_dq(prev_stage, j > 0);
    warpgroup_wait<2>();  // x_j
    warpgroup_fence_operand(tSrS);

    // The element passes work in place on the accumulators (flat index 4 c + e = s[c][e]).
    auto& s = *reinterpret_cast<float(*)[kNTiles][4]>(raw_pointer_cast(tSrS.data()));
    const DqIndex ix{{i_row[0], i_row[1]}, n * kBlockN, t};
    uint32_t slope[kSoftcap ? 2 * kNTiles : 1];
    // The scale still to apply, folded into P's fma with the LSE: the lean pass's without a bias
    // (its drops set -inf, which P turns into 0 whatever the scale), else 1.
    float scale_left = 1.0f;
    if constexpr (kSoftcap) {
      softcap_pass(s, slope, p.softcap_in, p.softcap_out);
    } else if constexpr (kLean) {
      if (bias_row != nullptr) {
        scale_pass(s, p.scale_log2);
        add_column_bias<Elt>(s, gathered_cols(stage, 2), p.bias_is_fp32, t, kLog2e);
      } else {
        scale_left = p.scale_log2;
      }
    } else {
      scale_pass(s, p.scale_log2);
    }
    if constexpr (kLean) {
      if (check) drop_keys_from<kNTiles>(s, n * kBlockN, row_end, t);
    } else if constexpr (kGathered) {
      // Column c of the tile is slot slots[c] (-1: padding, above every end as unsigned).
      const auto* slots = reinterpret_cast<const int32_t*>(gathered_cols(stage, 0));
      const auto* last = reinterpret_cast<const int32_t*>(gathered_cols(stage, 1));
      const auto* bias = reinterpret_cast<const float*>(gathered_cols(stage, 2));
      if (p.bias != nullptr) add_column_bias<Elt>(s, bias, true, t, kLog2e);
      if (check) {
#pragma unroll
        for (int c = 0; c < kNTiles; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = c * 8 + 2 * t + (e & 1);
            const bool keep = uint32_t(slots[col]) < uint32_t(row_end[e / 2]) &&
                              i_row[e / 2] <= last[col];
            if (!keep) s[c][e] = -INFINITY;
          }
      }
    } else if constexpr (kStagedBias) {
      const int slot = j % Tiles::kBiasSlots;
      add_staged_bias<Elt, false>(s, s_bias + slot * Tiles::kBiasSlotElems, warp * 16, kLog2e);
      __syncwarp();
      if (release_lane) mbarrier_arrive(&bias_empty[slot]);
    } else if (bias_with_tile(n)) {
      add_column_bias<Elt>(s, gathered_cols(stage, 2), p.bias_is_fp32, t, kLog2e);
    } else if (p.bias) {
      bias_pass<Elt, kDuty == DqBiasDuty::kNone>(p, b, h, s, ix);
    }
    if (!kGathered && !kLean && check) drop_pass<Elt, kRowTopK>(p, b, h, s, ix);
    // P (exact zeros for dropped entries and empty rows).
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float l2 = lse2[e / 2];
        if constexpr (kFinite) {
          s[c][e] = fast_exp2(fmaf(s[c][e], scale_left, -l2));
        } else {
          const bool keep = s[c][e] != -INFINITY && l2 != -INFINITY;
          s[c][e] = keep ? fast_exp2(fmaf(s[c][e], scale_left, -l2)) : 0.0f;
        }
      }
    if constexpr ((FSA_SM90_SOFTMAX_PIN & 8) && kLean) {
      pin_probabilities<Elt>(s, smem_raw + Tiles::kPinOffset, ct == 0);
    }
    warpgroup_wait<0>();  // dP_j and dQ_{j-1}: stage j - 1 and the packed dS are free
    warpgroup_fence_operand(tSrDp);
    warpgroup_fence_operand(tDq);
    if (j > 0 && release_lane) mbarrier_arrive(&empty_bar[prev_stage]);
    // dS = P (dP - rowdot); dX = dS without softcap.
    auto& ds = *reinterpret_cast<float(*)[kNTiles][4]>(raw_pointer_cast(tSrDp.data()));
    // A dropped entry (P = 0) gives 0 even when its dP is not finite (NaN / Inf stored in V at a
    // dropped key). As a branch on partial tiles only, ptxas spilled in both passes.
#pragma unroll
    for (int c = 0; c < kNTiles; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ds[c][e] = kFinite ? fmaf(s[c][e], ds[c][e] - rdot[e / 2], 0.0f)
                           : ds_entry(s[c][e], ds[c][e], rdot[e / 2]);
      }
    // The dbias duty takes dS; dQ += dX K the packed dX (under softcap the slopes' product: the
    // duty runs before it, else from the packed dS, the same rounding).
    if constexpr (kSoftcap) {
      dq_pass_duty<Elt, kDuty>(p, b, h, i_row, n * kBlockN, t, ds, row_grad, [&](int c, int r) {
        return Elt::pack(ds[c][2 * r], ds[c][2 * r + 1]);
      });
      apply_slope(ds, slope);
    }
#pragma unroll
    for (int c = 0; c < kNTiles; ++c) {
      ds_regs[2 * c] = Elt::pack(ds[c][0], ds[c][1]);
      ds_regs[2 * c + 1] = Elt::pack(ds[c][2], ds[c][3]);
    }
    if constexpr (!kSoftcap) {
      dq_pass_duty<Elt, kDuty>(p, b, h, i_row, n * kBlockN, t, ds, row_grad,
                               [&](int c, int r) { return ds_regs[2 * c + r]; });
    }
  }
  if (total > 0) issue_dq((total - 1) % kStages, true);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tDq);
  if (total == 0) clear(tDq);

  dq_pass_write<Elt, kDTiles>(p, b, h, i_row, t, row_grad,
                              [&](int d, int e) { return tDq(4 * d + e); });
#else
  __trap();  // launched only on sm_90 devices, where the sm_90a image exists
#endif
}

}  // namespace fsa::detail::cuda
