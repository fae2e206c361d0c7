#pragma once
// Definition of launch_backward, included only by the generated instantiation files.

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda/backward_fused_sm90.cuh"
#include "cuda/backward_kernel.cuh"
#include "cuda/backward_kernel_sm90.cuh"
#include "cuda/backward_launch.h"
#include "cuda/backward_wide_sm90.cuh"
#include "cuda/check.h"
#include "cuda/device_arch.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"
#include "cuda/tma.h"

namespace fsa::detail::cuda {

// The Hopper dK/dV kernel serves sm_90 devices (the sm_90a image of this build); softcap takes
// its kSoftcap instantiations. FSA_CUDA_BACKWARD=sm80 forces the sm80 kernel (for A/B measurements
// on one card).
inline bool use_sm90_backward(const BackwardParams& /*params*/) {
  static const bool forced_sm80 = env_is("FSA_CUDA_BACKWARD", "sm80");
  if (forced_sm80) return false;
  return hopper_kernels_available();
}

// The sm90 dK/dV passes' Q and dO tensor maps, or none (enabled false: cp.async) under
// FSA_CUDA_TMA=0 and where TMA cannot address the tensors (encode_rows_map; log_tma_fallback).
inline QdoTensorMaps backward_tensor_maps(const BackwardParams& p) {
  QdoTensorMaps maps{};
  if (!tma_enabled()) return maps;
  maps.enabled = encode_rows_map(maps.q, p.q, p.head_dim, p.seqlen_q, p.num_heads, p.batch,
                                 p.q_stride_s, p.q_stride_h, p.q_stride_b) &&
                 encode_rows_map(maps.dout, p.dout, p.head_dim, p.seqlen_q, p.num_heads, p.batch,
                                 p.do_stride_s, p.do_stride_h, p.do_stride_b);
  static std::atomic<bool> logged{false};
  if (!maps.enabled) log_tma_fallback(logged, "query or output gradient", "the Hopper dK/dV pass");
  return maps;
}

// The Hopper dQ kernel: same rule as the dK/dV one; FSA_CUDA_DQ_SM90=0 keeps the sm80 dQ pass
// beside the sm90 dK/dV pass (A/B measurements of the dQ pass alone).
inline bool use_sm90_dq(const BackwardParams& params) {
  static const bool enabled = !env_is("FSA_CUDA_DQ_SM90", "0");
  return enabled && use_sm90_backward(params);
}

// Whether this call runs the fused backward (dkdvq_kernel_sm90: dK, dV and dQ in one pass over
// pairs of key tiles, five products per kept entry instead of seven): kernel head dims 64 and 128
// on the sm90 passes, not deterministic (its dQ sums' order varies), no bias-gradient duty for the
// dQ pass, not per-row top-k (its gathered tiles and dK/dV groups), a pair list's flags within
// 48 KB of shared memory (pair_lists_kernel) and dq_accum within 4 GiB.
//
// By default for one list without a mask: one block map serving every (batch, head), and packed
// sequences without a key mask (compacted slots with RowEnd::key_last, walked on one map; H200,
// the varlen bench: 33.7 vs 42.7 ms fwd+bwd; docs/perf.md, sixteenth session). Block selections
// (a map per head) keep the two passes by default although the fused pass is faster there (pairs
// started longest first, BackwardParams::dkv_order, in two shares at least: (1, 16384, 32, 8,
// 128) at 5 / 10 / 20% 3.25 / 5.04 / 8.73 ms fwd+bwd against 4.28 / 6.18 / 10.15): its scratch,
// the fp32 dq_accum (twice q's bytes) and the shares' fp32 dK / dV rows, breaks issue #5's bar
// for the trainable-mask backward (under 10% of q + k + v beyond the gradients), which the two
// passes meet (their scratch there is rowdot and the column sums). Compacted key masks keep the
// two passes too (measured no faster fused: top 2048 of 16K keys 4.02 vs 3.97 ms; the Doge
// training step's attention at 16K tokens 6.72 vs 5.76 ms), and so do masks with a query dim and
// packed sequences with a key mask (not measured fused).
//
// FSA_CUDA_DQ=pass keeps the two passes, FSA_CUDA_DQ=fused takes the fused pass wherever it can
// run (A/B measurements on one card, and tests of the fused pass over masks). Read at each call,
// so that a test can set it.
template <int kHeadDim>
bool fused_backward(const BackwardParams& p) {
  if constexpr (!has_fused_backward(kHeadDim)) {
    return false;
  } else {
    const bool forced_pass = env_is("FSA_CUDA_DQ", "pass");
    const bool forced_fused = env_is("FSA_CUDA_DQ", "fused");
    const int64_t lists = int64_t(p.map.map_batch) * p.map.map_heads;
    const int64_t accum_bytes =
        int64_t(p.batch) * p.num_heads * ((p.seqlen_q + 63) / 64) * 64 * kHeadDim * 4;
    const bool key_mask = p.map.kept_count != nullptr && p.row_end.key_last == nullptr;
    // Packed sequences (PlanOptions::packed): consecutive slots walked on the map, each slot's
    // rows an interval (RowEnd::key_first / key_last) that drop_pass reads.
    const bool packed = p.map.kept_count != nullptr && p.row_end.key_last != nullptr &&
                        p.map.gather_slots == nullptr;
    const bool by_default =
        lists == 1 && p.mask == nullptr && (p.map.kept_count == nullptr || packed);
    return !forced_pass && (by_default || forced_fused) && !p.deterministic &&
           p.map.m_blocks > 0 && p.map.n_blocks > 0 && dq_bias_duty(p) == DqBiasDuty::kNone &&
           p.row_topk.key == nullptr && p.map.dkv_slots == nullptr &&
           (p.map.kept_count == nullptr || key_mask || packed) && p.map.m_blocks <= 12000 &&
           lists <= 65535 && accum_bytes <= (int64_t(4) << 30) && use_sm90_dq(p);
  }
}

// The most shares of a key tile's query work: 8, and about two query tiles per share.
inline int dkv_max_shares(const BackwardParams& p) {
  return int(std::min<int64_t>(8, std::max<int64_t>(1, int64_t(p.map.m_blocks) * p.group / 2)));
}

// log2 of the shares of a key tile's query work in the sm90 dK/dV pass
// (BackwardParams::dkv_splits): about `target` CTAs (two per SM) when the grid's key tiles alone
// (`key_tiles` per kv head and batch; pairs of them in the fused pass) are fewer, at most
// dkv_max_shares, the fp32 shares within 1 GiB; at least `min_shares` (the fused pass over ordered
// pairs, launch_sm90_dkdv) within the same limits.
inline int dkv_split_log2(const BackwardParams& p, int kernel_dim, int64_t target,
                          int64_t key_tiles, int64_t min_shares = 1) {
  // FSA_CUDA_DKV_SPLIT_LOG2=k forces 2^k shares (0..3), for A/B measurements of the rule below.
  if (const char* env = std::getenv("FSA_CUDA_DKV_SPLIT_LOG2")) {
    return std::min(3, std::max(0, std::atoi(env)));
  }
  const int64_t ctas = key_tiles * p.num_kv_heads * p.batch;
  // Per-row top-k's dK/dV groups (BlockMapParams::dkv_slots): the grid counts every slot tile,
  // most of them empty, and the work sits in the groups of keys that live long (up to every query
  // tile each). Their count is on the device; every list has at least a row's window of slots,
  // about gather_stride, so at least gather_stride / block_n groups. Where that bound alone gives
  // an SM's worth of groups, two shares (the groups then fill the GPU by themselves), else four
  // (H200, docs/perf.md, per-row ninth session: at (1, 16384, 32, 8, 128) window 2048, 272 such
  // groups, the dK/dV pass and its reduction took 3.21 ms at two shares, 3.27 at four, 3.59 at
  // eight; at (1, 32768, 2, 1, 64) window 1024, 18, it took 1.02 / 0.56 / 0.30 ms at one / two /
  // four shares; four also measured best at (1, 16384, 8, 2, 128) window 2048, 68, with the
  // previous groups).
  const bool groups = p.map.dkv_slots != nullptr;
  if (ctas >= target && !groups && min_shares <= 1) return 0;
  const int64_t lists = int64_t(p.num_kv_heads) * p.batch;
  const int64_t groups_at_least = lists * (p.map.gather_stride / std::max(p.map.block_n, 1));
  const int64_t group_shares = 2 * groups_at_least >= target ? 2 : 4;  // target: two CTAs per SM
  const int64_t want = std::min<int64_t>(
      std::max(groups ? group_shares : (target + ctas - 1) / ctas, min_shares), dkv_max_shares(p));
  const int64_t share_bytes = 2 * int64_t(p.batch) * p.seqlen_k * p.num_kv_heads * kernel_dim * 4;
  int log2 = 0;  // the largest power of two <= want within the memory cap
  while ((int64_t(2) << log2) <= want && (int64_t(2) << log2) * share_bytes <= (int64_t(1) << 30)) {
    ++log2;
  }
  return log2;
}

// FSA_CUDA_DKV_ORDER=lists keeps the compacted dK/dV grid list after list (A/B measurements of
// BackwardParams::dkv_tile_major, docs/perf.md).
inline bool dkv_tile_major_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_DKV_ORDER", "lists");
  return enabled;
}

// FSA_CUDA_PAIR_ORDER=index keeps the dK/dV pass's units (key tiles; pairs of them fused) in index
// order where it would sort them (BackwardParams::dkv_order; A/B measurements, docs/perf.md).
inline bool dkv_order_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_PAIR_ORDER", "index");
  return enabled;
}

using BackwardKernel = void (*)(BackwardParams);
// The D = 256 dQ pass (dq_kernel_sm90_wide), which takes K and V's tensor maps too.
using WideDqKernel = void (*)(BackwardParams, KvTensorMaps);

// The D = 256 dQ pass's K and V tensor maps ((64 columns x 32 keys) boxes), or none (enabled
// false: cp.async): not under FSA_CUDA_TMA=0 or where TMA cannot address the tensors
// (encode_rows_map; log_tma_fallback).
inline KvTensorMaps dq_tensor_maps(const BackwardParams& p) {
  KvTensorMaps maps{};
  if (!tma_enabled()) return maps;
  maps.enabled = encode_kv_maps(maps, p, 32);
  static std::atomic<bool> logged{false};
  if (!maps.enabled) log_tma_fallback(logged, "key or value", "the Hopper dQ pass");
  return maps;
}

// Whether the sm90 passes have lean instantiations at kernel head dim kHeadDim (the D = 256
// passes are others): measured at D = 128 only. At D = 64 the forward's lean walk measured
// slower than the general one (docs/perf.md, thirty-second session), so that head dim keeps the
// general passes until the lean ones are measured there.
constexpr bool sm90_backward_lean(int kHeadDim) { return kHeadDim == 128; }

// Whether the sm90 dQ pass's lean instantiation (dq_kernel_sm90's kLean) serves a call:
// causality alone drops entries, no bias gradient with a query dim, and no bias or a
// query-invariant one that travels with every key tile (rows aligned, every key tile whole).
inline bool lean_dq_call(const BackwardParams& p) {
  return causal_only_drops(p) && p.map.gather_slots == nullptr && !p.bias_staged &&
         p.softcap_in == 0.0f && dq_bias_duty(p) == DqBiasDuty::kNone &&
         (p.bias == nullptr || (key_bias_rows_aligned(p) && p.seqlen_k % p.map.block_n == 0));
}

// Whether the sm90 dK/dV pass's lean instantiation (dkdv_kernel_sm90's kLean) serves a call:
// causality alone drops entries (no mask, row bounds, per-row top-k or gathered slots), and the
// bias, if any, is query-invariant and not staged (KeyRowBias).
inline bool lean_dkdv_call(const BackwardParams& p) {
  return causal_only_drops(p) && p.map.dkv_slots == nullptr && !p.bias_staged &&
         p.softcap_in == 0.0f && (p.bias == nullptr || KeyRowBias::applies(p));
}

// Whether the sm90 dK/dV pass's lean instantiation over slot rows (dkdv_kernel_sm90_slot_rows)
// serves a call: per-row top-k over compacted keys run as dK/dV groups (BlockMapParams::dkv_slots)
// whose slots' rows are intervals (RowEnd::key_first / key_last), without a mask, softcap or a
// staged bias, and with no bias or a query-invariant one (KeyRowBias). Such calls ran the general
// pass, whose element passes carry every other duty (9968 against 6560 SASS instructions at
// D = 128 bf16).
inline bool lean_slot_rows_call(const BackwardParams& p) {
  return p.map.dkv_slots != nullptr && p.row_end.key_last != nullptr &&
         p.row_end.key_first != nullptr && p.mask == nullptr && p.row_topk.key == nullptr &&
         !p.bias_staged && p.softcap_in == 0.0f && (p.bias == nullptr || KeyRowBias::applies(p));
}

// Whether the fused pass's lean instantiation (dkdvq_kernel_sm90's kLean) serves a call: the lean
// dK/dV pass's calls (lean_dkdv_call) without a compacted key mask (whose slots the general pass
// bounds by their count). At both of its head dims: dense (2, 16384, 16, 16, D) backward 2-3% /
// 0-1% faster causal / full at D = 128, 5% / 0-1% at D = 64 (H200, docs/perf.md, thirty-fourth
// session).
inline bool lean_fused_call(const BackwardParams& p) {
  return lean_dkdv_call(p) && p.map.kept_count == nullptr;
}

// Whether a call's lean dK/dV, dQ or fused pass runs as a pair, its twin without per-entry
// guards beside it (BackwardParams::nonfinite; probabilities_t's kFinite): a positive scale (the
// twin's drops rely on -inf times it staying -inf) and one of the lean passes with a twin.
// FSA_CUDA_FINITE_PASSES=0 runs the guarded passes alone (A/B measurements).
template <int kHeadDim>
bool finite_pair_call(const BackwardParams& p, bool fused) {
  static const bool enabled = !env_is("FSA_CUDA_FINITE_PASSES", "0");
  if (!enabled || !(p.scale_log2 > 0.0f) || !use_sm90_backward(p)) return false;
  if (fused) return lean_fused_call(p);
  return sm90_backward_lean(kHeadDim) &&
         (lean_dkdv_call(p) || lean_slot_rows_call(p) || lean_dq_call(p));
}

// The sm90 dQ kernel for this call with its threads and shared memory, or null: the sm80 pass
// (the sm80 kernels forced, or per-row top-k over compacted keys at D = 256). At D = 256 it is
// `wide` (the return value null).
// `smem_limit`: the kernel's opt-in shared-memory limit, a fixed value per kernel (the D = 256
// pass serves staged and unstaged biases in one instantiation: host threads launching it
// concurrently must never lower the limit under each other), at least `smem`. `finite`: the lean
// pass's twin without guards (BackwardParams::nonfinite), or null.
template <int kHeadDim, class Elt>
BackwardKernel sm90_dq_kernel(const BackwardParams& p, int& threads, int& smem, int& smem_limit,
                              BackwardKernel& finite, WideDqKernel& wide) {
  finite = nullptr;
  wide = nullptr;
  if constexpr (kHeadDim > 128) {
    if (!use_sm90_dq(p)) return nullptr;
    // The D = 256 pass does not gather K and V by slot, as the D = 256 forward.
    static std::atomic<bool> logged{false};
    if (p.map.gather_slots != nullptr) {
      log_gathered_on_sm80(logged, "dQ pass", kHeadDim);
      return nullptr;
    }
    using Wide = Sm90DqWideTiles<Elt>;
    using Duty = DqBiasDuty;
    threads = Wide::kThreads, smem = Wide::smem_bytes(p.bias_staged);
    smem_limit = Wide::smem_bytes(true);
    auto pick = [&](auto softcap) -> WideDqKernel {
      constexpr bool kSoftcap = decltype(softcap)::value;
      if (p.row_topk.key != nullptr) return &dq_kernel_sm90_wide<Elt, Duty::kNone, true, kSoftcap>;
      switch (dq_bias_duty(p)) {
        case Duty::kPacked: return &dq_kernel_sm90_wide<Elt, Duty::kPacked, false, kSoftcap>;
        case Duty::kFp32: return &dq_kernel_sm90_wide<Elt, Duty::kFp32, false, kSoftcap>;
        default: return &dq_kernel_sm90_wide<Elt, Duty::kNone, false, kSoftcap>;
      }
    };
    wide = p.softcap_in != 0.0f ? pick(std::true_type{}) : pick(std::false_type{});
    return nullptr;
  } else {
    if (!use_sm90_dq(p)) return nullptr;
    const bool row_topk = p.row_topk.key != nullptr;
    using Sm90Tiles = Sm90DqTiles<kHeadDim, Elt>;
    // kSoftcap (the cap, dX = dS (1 - t^2)) is an instantiation of each.
    using Duty = DqBiasDuty;
    auto pick = [&](auto staged, auto softcap) -> BackwardKernel {
      constexpr bool kStaged = decltype(staged)::value, kSoftcap = decltype(softcap)::value;
      switch (dq_bias_duty(p)) {
        case Duty::kPacked:
          return &dq_kernel_sm90<kHeadDim, Elt, Duty::kPacked, kStaged, false, false, false,
                                 kSoftcap>;
        case Duty::kFp32:
          return &dq_kernel_sm90<kHeadDim, Elt, Duty::kFp32, kStaged, false, false, false,
                                 kSoftcap>;
        default:
          return &dq_kernel_sm90<kHeadDim, Elt, Duty::kNone, kStaged, false, false, false,
                                 kSoftcap>;
      }
    };
    // Per-row top-k comes with a query-invariant bias: never staged, no dQ-pass dbias duty;
    // over compacted keys it runs on the plan's gathered tiles.
    auto pick_walk = [&](auto softcap) -> BackwardKernel {
      constexpr bool kSoftcap = decltype(softcap)::value;
      if (p.map.gather_slots != nullptr) {
        return &dq_kernel_sm90<kHeadDim, Elt, Duty::kNone, false, false, true, false, kSoftcap>;
      }
      if (row_topk) {
        return &dq_kernel_sm90<kHeadDim, Elt, Duty::kNone, false, true, false, false, kSoftcap>;
      }
      return p.bias_staged ? pick(std::true_type{}, softcap) : pick(std::false_type{}, softcap);
    };
    const bool gathered = p.map.gather_slots != nullptr;
    BackwardKernel dq =
        p.softcap_in != 0.0f ? pick_walk(std::true_type{}) : pick_walk(std::false_type{});
    if constexpr (sm90_backward_lean(kHeadDim)) {
      if (lean_dq_call(p)) {  // (never gathered, per-row top-k or staged)
        dq = &dq_kernel_sm90<kHeadDim, Elt, DqBiasDuty::kNone, false, false, false, true>;
        finite = &dq_kernel_sm90<kHeadDim, Elt, DqBiasDuty::kNone, false, false, false, true,
                                 false, true>;
      }
    }
    // A query-invariant bias travels with the K/V tiles in the gathered tiles' region (the
    // kernel stages it where its key dim is contiguous and aligned); the instantiations it shares
    // with calls without one take that region's size as their fixed limit.
    const bool column_bias = p.bias != nullptr && p.bias_stride[2] == 0 && !p.bias_staged;
    threads = Sm90Tiles::kThreads;
    smem = Sm90Tiles::smem_bytes(p.bias_staged, gathered || column_bias);
    smem_limit = Sm90Tiles::smem_bytes(p.bias_staged, !p.bias_staged);
    return dq;
  }
}

// The sm90 dK/dV pass and, when it splits, its reduction, with `kv` (p's copy for the pass and
// the bias reduction after it) set up for them; false when the call takes the sm80 pass (the
// sm80 kernels forced, or per-row top-k's dK/dV groups at D = 256), with nothing launched.
template <int kHeadDim, class Elt>
bool launch_sm90_dkdv(const BackwardParams& p, BackwardParams& kv, StreamBuffer& dkv_workspace,
                      cudaStream_t stream) {
  if (!use_sm90_backward(p)) return false;
  if constexpr (kHeadDim > 128) {
    // The D = 256 pass does not gather K and V by slot (per-row top-k's dK/dV groups).
    static std::atomic<bool> logged{false};
    if (p.map.dkv_slots != nullptr) {
      log_gathered_on_sm80(logged, "dK/dV pass", kHeadDim);
      return false;
    }
  }
  const bool row_topk = p.row_topk.key != nullptr;
  // The fused pass (kv.dq_accum set) runs pairs of key tiles (its CTA count for the split rule).
  const bool fused = kv.dq_accum != nullptr;
  const int64_t target = 2 * int64_t(multiprocessor_count());
  // Ordered pairs (a map per head, BackwardParams::dkv_order) run in two shares at least: the
  // longest pair starts first, but a key block that every query picks can still list several
  // times an SM's share of the work. H200, block selections (1, 16384, 32, 8, 128), fwd+bwd ms
  // at 5 / 10 / 20% for one / two / four / eight shares: 4.43 / 5.02 / 8.24, 3.25 / 5.04 / 8.73,
  // 3.41 / 5.25 / 8.94, 3.87 / 5.72 / 9.64 (docs/perf.md, sixteenth session): more shares write
  // and sum more fp32 partial rows.
  constexpr int64_t kOrderedShares = 2;
  const bool ordered = fused && kv.dkv_order != nullptr && p.map.kept_count == nullptr;
  kv.dkv_split_log2 =
      dkv_split_log2(p, kHeadDim, target, fused ? kv.n_pairs : int64_t(p.map.n_blocks),
                     ordered ? kOrderedShares : 1);
  kv.dkv_splits = 1 << kv.dkv_split_log2;
  // A compacted key mask splits by its lists' counts on the device (BackwardParams::dkv_by_count)
  // when one share's rows over the whole grid fit the workspace cap.
  // (The fused pass's grid runs pairs of tiles, 2 n_pairs tiles' rows.)
  const int64_t grid_tiles = fused ? 2 * int64_t(kv.n_pairs) : int64_t(p.map.n_blocks);
  const int64_t grid_rows = (grid_tiles * p.map.block_n) << kv.dkv_split_log2;
  kv.dkv_by_count = p.map.kept_count != nullptr && p.row_end.key_last == nullptr &&
                    2 * int64_t(p.batch) * grid_rows * p.num_kv_heads * kHeadDim * 4 <=
                        (int64_t(1) << 30);
  kv.dkv_rows = int(kv.dkv_by_count ? grid_rows : int64_t(p.seqlen_k) << kv.dkv_split_log2);
  const int64_t lists = int64_t(p.num_kv_heads) * p.batch;
  kv.dkv_target_tiles = int((target + lists - 1) / lists);
  kv.dkv_max_shares = dkv_max_shares(p);
  kv.dkv_grid_tiles = int(grid_rows / p.map.block_n / (fused ? 2 : 1));  // CTAs per list
  // Per-row top-k's dK/dV groups measured slower tile-major (3.29 -> 3.34 ms at (1, 16384, 32,
  // 8, 128) window 2048): their work does not fall with the group's index. The fused pass over
  // packed sequences runs tile-major too (each document's first pairs list the most; H200, the
  // varlen bench: 35.1 -> 34.2 ms fwd+bwd), and so does it over ordered pairs (every kv head's
  // longest pair first); over one dense map it runs list after list, whose concurrent CTAs then
  // share a head's Q and dO in L2 (tile-major: 12.95 -> 13.52 ms causal bwd at (2, 16384, 16,
  // 16, 128); docs/perf.md, sixteenth session).
  const int64_t grid_x = (fused ? int64_t(kv.n_pairs) : int64_t(p.map.n_blocks)) * kv.dkv_splits;
  // With several lists (a map per head: block selections, masks) the key tiles start longest
  // first (dkv_order_kernel), as the fused pass's pairs do (launch_backward): a block selection's
  // key block that every query block picks lists several times an SM's share of the pass, and in
  // index order the last heads' such tiles started at its end (H200, (1, 16384, 32, 8, 128) at
  // 6.4%: docs/perf.md, twenty-ninth session). Compacted keys keep index order: a key mask's
  // tiles already list less work the later they come (sorting them measured 0.4% slower on the
  // Doge top-2048 workflow), and per-row top-k's dK/dV groups have their own order.
  StreamBuffer tile_order(stream);
  const int64_t map_lists = int64_t(p.map.map_batch) * p.map.map_heads;
  if (!fused && map_lists > 1 && p.map.kept_count == nullptr && p.map.dkv_slots == nullptr &&
      dkv_order_enabled()) {
    FSA_CUDA_CHECK(scratch_malloc(
        &tile_order.ptr,
        size_t(p.map.map_batch) * p.num_kv_heads * p.map.n_blocks * sizeof(int32_t), stream));
    auto* order = static_cast<int32_t*>(tile_order.ptr);
    dkv_order_kernel<1024, false><<<dim3(unsigned(p.num_kv_heads), unsigned(p.map.map_batch)),
                                    1024, 0, stream>>>(kv, order);
    FSA_CUDA_CHECK(cudaGetLastError());
    kv.dkv_order = order;
  }
  kv.dkv_tile_major = (kv.dkv_by_count || kv.dkv_order != nullptr ||
                       (fused && p.map.kept_count != nullptr)) &&
                      grid_x <= 65535 && dkv_tile_major_enabled();
  if (kv.dkv_splits > 1 || kv.dkv_by_count) {
    const size_t per = size_t(p.batch) * kv.dkv_rows * p.num_kv_heads * kHeadDim;
    const size_t cols = p.bias_grad == BiasGrad::kColumns
                            ? size_t(p.batch) * p.num_heads * kv.dkv_rows
                            : 0;
    FSA_CUDA_CHECK(scratch_malloc(&dkv_workspace.ptr, (2 * per + cols) * sizeof(float), stream));
    kv.dkv_partial = static_cast<float*>(dkv_workspace.ptr);
    if (cols > 0) kv.col_accum = kv.dkv_partial + 2 * per;
  }
  if (kv.map.dkv_slots != nullptr) {
    // Per-row top-k over compacted keys: CTA n runs the slots of group n (gathered by slot) over
    // the group's own query-tile lists (BlockMapParams::dkv_slots).
    kv.map.full_index_t = kv.map.dkv_full_index_t;
    kv.map.full_count_t = kv.map.dkv_full_count_t;
    kv.map.partial_index_t = kv.map.dkv_partial_index_t;
    kv.map.partial_count_t = kv.map.dkv_partial_count_t;
  }
  // One instantiation for both: the opt-in limit is the larger size (a fixed value, so that host
  // threads launching it concurrently never lower it under each other), a launch asks for what
  // it uses.
  using DkvKernel = void (*)(BackwardParams, QdoTensorMaps);
  DkvKernel dkdv = nullptr;
  DkvKernel finite = nullptr;  // a lean pass's twin without guards (BackwardParams::nonfinite)
  int threads = 0, smem_limit = 0, smem = 0;
  if constexpr (kHeadDim > 128) {
    // No room for a staged bias at D = 256: the element pass reads such a bias from global
    // memory.
    using Wide = Sm90DkvWideTiles<Elt>;
    kv.bias_staged = false;
    if (p.softcap_in != 0.0f) {
      dkdv = row_topk ? &dkdv_kernel_sm90_wide<Elt, true, true>
                      : &dkdv_kernel_sm90_wide<Elt, false, true>;
    } else {
      dkdv = row_topk ? &dkdv_kernel_sm90_wide<Elt, true> : &dkdv_kernel_sm90_wide<Elt, false>;
    }
    threads = Wide::kThreads, smem_limit = smem = Wide::kSmemBytes;
  } else {
    using Sm90Tiles = Sm90DkvTiles<kHeadDim, Elt>;
    if (p.softcap_in != 0.0f) {
      dkdv = row_topk ? &dkdv_kernel_sm90<kHeadDim, Elt, true, false, true>
                      : &dkdv_kernel_sm90<kHeadDim, Elt, false, false, true>;
    } else {
      dkdv = row_topk ? &dkdv_kernel_sm90<kHeadDim, Elt, true>
                      : &dkdv_kernel_sm90<kHeadDim, Elt, false>;
    }
    if constexpr (sm90_backward_lean(kHeadDim)) {
      if (lean_dkdv_call(kv)) {
        dkdv = &dkdv_kernel_sm90<kHeadDim, Elt, false, true>;
        finite = &dkdv_kernel_sm90<kHeadDim, Elt, false, true, false, true>;
      }
      if (lean_slot_rows_call(kv)) {
        dkdv = &dkdv_kernel_sm90_slot_rows<kHeadDim, Elt>;
        finite = &dkdv_kernel_sm90_slot_rows<kHeadDim, Elt, true>;
      }
    }
    threads = Sm90Tiles::kThreads, smem_limit = Sm90Tiles::smem_bytes(true);
    smem = Sm90Tiles::smem_bytes(p.bias_staged);
  }
  if constexpr (has_fused_backward(kHeadDim)) {
    if (fused) {
      using Fused = Sm90FusedTiles<kHeadDim, Elt>;
      dkdv = lean_fused_call(kv)      ? &dkdvq_kernel_sm90<kHeadDim, Elt, true>
             : p.softcap_in != 0.0f ? &dkdvq_kernel_sm90<kHeadDim, Elt, false, true>
                                    : &dkdvq_kernel_sm90<kHeadDim, Elt>;
      finite = lean_fused_call(kv) ? &dkdvq_kernel_sm90<kHeadDim, Elt, true, false, true> : nullptr;
      threads = Fused::kThreads, smem_limit = Fused::smem_bytes(true);
      smem = Fused::smem_bytes(p.bias_staged);
    }
  }
  // A pair: both launched, each returning at once unless the flag calls for it (exactly one
  // works). Without a flag, or without a twin, the guarded pass alone, which then always works.
  if (kv.nonfinite == nullptr) finite = nullptr;
  if (finite == nullptr) kv.nonfinite = nullptr;
  FSA_CUDA_CHECK(
      cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
  const dim3 dkdv_grid =
      kv.dkv_tile_major ? dim3(unsigned(p.num_kv_heads), unsigned(grid_x), unsigned(p.batch))
                        : dim3(unsigned(grid_x), unsigned(p.num_kv_heads), unsigned(p.batch));
  const QdoTensorMaps maps = backward_tensor_maps(kv);
  if (finite != nullptr) {
    FSA_CUDA_CHECK(
        cudaFuncSetAttribute(finite, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
    finite<<<dkdv_grid, threads, smem, stream>>>(kv, maps);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  dkdv<<<dkdv_grid, threads, smem, stream>>>(kv, maps);
  FSA_CUDA_CHECK(cudaGetLastError());
  if (kv.dkv_splits > 1 || kv.dkv_by_count) {
    // Every list split: the reduction can write the caller's key axis (BackwardParams::scatter).
    if (p.scatter.slot != nullptr && kv.dkv_splits > 1 && !kv.dkv_by_count) {
      kv.scatter = p.scatter;
    }
    const int64_t keys = kv.scatter.slot != nullptr ? kv.scatter.keys : p.seqlen_k;
    const dim3 grid(unsigned((keys * (kHeadDim / 4) + 255) / 256), unsigned(p.num_kv_heads),
                    unsigned(p.batch));
    dkv_reduce_kernel<Elt, kHeadDim><<<grid, 256, 0, stream>>>(kv);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  return true;
}

template <int kHeadDim, class Elt>
bool launch_backward(const BackwardParams& p, cudaStream_t stream) {
  using Tiles = BackwardTiles<kHeadDim>;
  const bool row_topk = p.row_topk.key != nullptr;
  const int64_t elements = int64_t(p.dbias_shape[0]) * p.dbias_shape[1] * p.dbias_shape[2] *
                           p.dbias_shape[3];
  // zero_dbias / dbias_reduce: grid (dbias rows, key blocks), see for_each_dbias_entry.
  const int64_t dbias_rows = int64_t(p.dbias_shape[0]) * p.dbias_shape[1] * p.dbias_shape[2];
  const int keys_per_block = dbias_keys_per_block(dbias_rows);
  const dim3 dbias_grid(unsigned(dbias_rows),
                        unsigned((p.dbias_shape[3] + keys_per_block - 1) / keys_per_block));
  const unsigned dbias_threads = unsigned(std::min(256, (p.dbias_shape[3] + 31) / 32 * 32));
  if (p.bias_grad == BiasGrad::kFull && elements > 0) {
    // Entries of skipped tiles must read 0: a memset when dbias is one dense block.
    bool dense = true;
    int64_t expected = 1;
    for (int d = 3; d >= 0; --d) {
      dense = dense && (p.dbias_shape[d] == 1 || p.dbias_stride[d] == expected);
      expected *= p.dbias_shape[d];
    }
    if (dense) {
      FSA_CUDA_CHECK(cudaMemsetAsync(p.dbias, 0, elements * (p.bias_is_fp32 ? 4 : 2), stream));
    } else {
      zero_dbias_kernel<Elt><<<dbias_grid, dbias_threads, 0, stream>>>(p);
    }
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  const bool fused = fused_backward<kHeadDim>(p);
  // A lean pass run as a pair (finite_pair_call): its flag, zeroed, then set by V's scan here and
  // by the preprocess (BackwardParams::nonfinite). One read of V, on the stream, no host wait.
  // The rows' LSE in log2 units too (BackwardParams::lse_log2), written by the preprocess.
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  StreamBuffer nonfinite(stream), lse_log2(stream);
  BackwardParams pre = p;  // the preprocess's params, with the flag
  if (finite_pair_call<kHeadDim>(p, fused)) {
    FSA_CUDA_CHECK(scratch_malloc(&nonfinite.ptr, sizeof(int32_t), stream));
    FSA_CUDA_CHECK(cudaMemsetAsync(nonfinite.ptr, 0, sizeof(int32_t), stream));
    FSA_CUDA_CHECK(
        scratch_malloc(&lse_log2.ptr, size_t(std::max<int64_t>(rows, 1)) * sizeof(float), stream));
    pre.nonfinite = static_cast<int32_t*>(nonfinite.ptr);
    pre.lse_log2 = static_cast<float*>(lse_log2.ptr);
    launch_v_check<Elt>(pre, pre.nonfinite, stream);
  }
  if (rows > 0) {
    if (p.rowdot_chunks) {
      // A row's chunks over 8, 16 or 32 lanes: one pass of 16-byte loads for head dims <= 256.
      const int lanes = p.head_dim <= 64 ? 8 : p.head_dim <= 128 ? 16 : 32;
      const unsigned blocks = unsigned((rows * lanes + 255) / 256);
      if (lanes == 8) rowdot_chunks_kernel<Elt, 8><<<blocks, 256, 0, stream>>>(pre);
      if (lanes == 16) rowdot_chunks_kernel<Elt, 16><<<blocks, 256, 0, stream>>>(pre);
      if (lanes == 32) rowdot_chunks_kernel<Elt, 32><<<blocks, 256, 0, stream>>>(pre);
    } else {
      rowdot_kernel<Elt><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(pre);
    }
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  if (p.map.m_blocks > 0 && !fused) {
    int threads = 0, smem = 0, smem_limit = 0;
    BackwardKernel finite = nullptr;
    WideDqKernel wide = nullptr;
    BackwardKernel dq = sm90_dq_kernel<kHeadDim, Elt>(p, threads, smem, smem_limit, finite, wide);
    if (dq == nullptr && wide == nullptr) {
      dq = row_topk ? &dq_kernel<kHeadDim, Elt, true> : &dq_kernel<kHeadDim, Elt, false>;
      threads = Tiles::kDqWarps * 32, smem = smem_limit = Tiles::kSmemDq;
    }
    FSA_CUDA_CHECK(cudaFuncSetAttribute(
        wide != nullptr ? reinterpret_cast<const void*>(wide) : reinterpret_cast<const void*>(dq),
        cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
    const KvTensorMaps dq_maps = wide != nullptr ? dq_tensor_maps(p) : KvTensorMaps{};
    auto launch_dq = [&](dim3 grid, const BackwardParams& params) {
      if (wide != nullptr) {
        wide<<<grid, threads, smem, stream>>>(params, dq_maps);
      } else {
        dq<<<grid, threads, smem, stream>>>(params);
      }
    };
    if (!p.ordered_dbias) {
      // The lean pass and its twin as a pair (as launch_sm90_dkdv's), where the flag exists.
      BackwardParams dq_params = p;
      if (finite != nullptr && pre.nonfinite != nullptr) {
        dq_params.nonfinite = pre.nonfinite;
        FSA_CUDA_CHECK(
            cudaFuncSetAttribute(finite, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
        finite<<<dim3(p.map.m_blocks, p.num_heads, p.batch), threads, smem, stream>>>(dq_params);
        FSA_CUDA_CHECK(cudaGetLastError());
      }
      launch_dq(dim3(p.map.m_blocks, p.num_heads, p.batch), dq_params);
      FSA_CUDA_CHECK(cudaGetLastError());
    } else {
      // One launch per member of a dbias slice, in order (BackwardParams::ordered_dbias).
      const int heads_per = p.num_heads / p.dbias_shape[1];
      const int members = (p.batch / p.dbias_shape[0]) * heads_per;
      BackwardParams launch = p;
      launch.dq_head_step = heads_per;
      for (int member = 0; member < members; ++member) {
        launch.dq_head0 = member % heads_per;
        launch.dq_batch0 = p.dbias_shape[0] == 1 ? member / heads_per : 0;
        launch_dq(dim3(p.map.m_blocks, p.dbias_shape[1], p.dbias_shape[0]), launch);
        FSA_CUDA_CHECK(cudaGetLastError());
      }
    }
  }
  // The dK/dV pass and the column-sum reduction after it read `kv`, whose split fields say how
  // the key tiles' query work is shared (BackwardParams::dkv_splits).
  BackwardParams kv = p;
  kv.scatter = KeyScatter{};  // set below where the reduction takes it
  kv.nonfinite = pre.nonfinite;
  kv.lse_log2 = pre.lse_log2;
  StreamBuffer dkv_workspace(stream), pair_lists(stream), dq_accum(stream);
  if constexpr (has_fused_backward(kHeadDim)) {
    if (fused) {
      // The fused pass's work lists (pair_lists_kernel) and its zeroed dQ sums.
      const int64_t lists = int64_t(p.map.map_batch) * p.map.map_heads;
      kv.n_pairs = (p.map.n_blocks + 1) / 2;
      // With several lists (a map per head: block selections, masks) the pairs start longest
      // first (dkv_order_kernel); one list keeps index order, whose neighbouring CTAs read the
      // same queries (dense causal: its longest pairs come first anyway; packed sequences: the
      // sorted order measured slower, 34.2 -> 36.7 ms on the varlen bench; docs/perf.md).
      const int64_t entries = lists * kv.n_pairs;
      const bool ordered = lists > 1 && dkv_order_enabled();
      const int64_t orders = ordered ? int64_t(p.map.map_batch) * p.num_kv_heads * kv.n_pairs : 0;
      FSA_CUDA_CHECK(scratch_malloc(
          &pair_lists.ptr, size_t(entries * (p.map.m_blocks + 1) + orders) * sizeof(int32_t),
          stream));
      auto* list = static_cast<int32_t*>(pair_lists.ptr);
      auto* count = list + entries * p.map.m_blocks;
      kv.pair_list = list, kv.pair_count = count;
      kv.dkv_order = ordered ? count + entries : nullptr;
      pair_lists_kernel<256><<<dim3(unsigned(kv.n_pairs), unsigned(lists)), 256,
                               size_t(p.map.m_blocks) * sizeof(int32_t), stream>>>(kv, list,
                                                                                   count);
      FSA_CUDA_CHECK(cudaGetLastError());
      if (ordered) {
        dkv_order_kernel<1024, true><<<dim3(unsigned(p.num_kv_heads), unsigned(p.map.map_batch)),
                                       1024, 0, stream>>>(kv, count + entries);
        FSA_CUDA_CHECK(cudaGetLastError());
      }
      const size_t accum = size_t(p.batch) * p.num_heads * ((p.seqlen_q + 63) / 64) * 64 * kHeadDim;
      FSA_CUDA_CHECK(scratch_malloc(&dq_accum.ptr, accum * sizeof(float), stream));
      FSA_CUDA_CHECK(cudaMemsetAsync(dq_accum.ptr, 0, accum * sizeof(float), stream));
      kv.dq_accum = static_cast<float*>(dq_accum.ptr);
    }
  }
  if (p.map.n_blocks > 0 && !launch_sm90_dkdv<kHeadDim, Elt>(p, kv, dkv_workspace, stream)) {
    // The sm80 pass: kDParts CTAs per key tile (column parts of dK / dV at D = 256).
    auto* dkdv = row_topk ? &dkdv_kernel<kHeadDim, Elt, true> : &dkdv_kernel<kHeadDim, Elt, false>;
    FSA_CUDA_CHECK(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tiles::kSmemDkv));
    dkdv<<<dim3(p.map.n_blocks * Tiles::kDParts, p.num_kv_heads, p.batch), Tiles::kDkvWarps * 32,
           Tiles::kSmemDkv, stream>>>(p);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  if constexpr (has_fused_backward(kHeadDim)) {
    if (fused) {
      const int64_t pairs = int64_t(p.batch) * p.num_heads * ((p.seqlen_q + 63) / 64) * 64 *
                            (kHeadDim / 2);
      dq_convert_kernel<Elt, kHeadDim><<<unsigned((pairs + 255) / 256), 256, 0, stream>>>(kv);
      FSA_CUDA_CHECK(cudaGetLastError());
    }
  }
  const bool reduce = p.bias_grad == BiasGrad::kFullSummed || p.bias_grad == BiasGrad::kRows ||
                      p.bias_grad == BiasGrad::kColumns;
  if (reduce && elements > 0) {
    dbias_reduce_kernel<Elt><<<dbias_grid, dbias_threads, 0, stream>>>(kv);
    FSA_CUDA_CHECK(cudaGetLastError());
  }
  return kv.scatter.slot != nullptr;
}

}  // namespace fsa::detail::cuda
