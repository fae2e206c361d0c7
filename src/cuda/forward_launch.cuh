#pragma once
// Definition of launch_forward, included only by the generated instantiation files.

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <type_traits>

#include "cuda/check.h"
#include "cuda/device_arch.h"
#include "cuda/forward_kernel.cuh"
#include "cuda/forward_kernel_sm90.cuh"
#include "cuda/forward_launch.h"
#include "cuda/launch.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"
#include "cuda/tma.h"

namespace fsa::detail::cuda {

// Whether the sm90 forward runs persistent (one CTA per SM walking tiles); FSA_CUDA_PERSISTENT=0
// launches one CTA per tile instead (A/B measurements, docs/perf.md).
inline bool persistent_forward_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_PERSISTENT", "0");
  return enabled;
}

// The band walk's long blocks (ForwardParams::long_blocks) out of `blocks` query blocks per
// (batch, head): all but the shortest eighth, so that every head's longest tiles are handed out
// before the short ones and the launch ends on short tiles, not on the last head's longest. The
// dense causal (2, 16384, 16, 16, 64) forward 2% faster; the 128-row walk keeps its order (on
// dense causal D = 128 the change was within the runs' spread, on the block selections and a
// causal GQA call with a per-key bias about 1% slower: H200, docs/perf.md, thirty-fifth
// session). FSA_CUDA_FORWARD_ORDER=heads keeps the head-by-head order (A/B measurements).
inline int band_long_blocks(const ForwardParams& p, int blocks) {
  static const bool enabled = !env_is("FSA_CUDA_FORWARD_ORDER", "heads");
  return enabled && p.is_causal && blocks > 1 ? blocks - std::max(1, blocks / 8) : 0;
}

// The combine follows its forward with programmatic dependent launch where the device runs this
// build's sm_90 images (whose combine waits on the forward grid: wait_for_prerequisite_grid), so
// its launch overlaps the forward's tail; elsewhere, or with FSA_CUDA_PDL=0 (A/B measurements,
// docs/perf.md), it is an ordinary launch.
inline bool dependent_launch_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_PDL", "0");
  return enabled && hopper_kernels_available();
}


// The sm90 forward's K and V tensor maps, or none (enabled false: cp.async) at head dims that keep
// cp.async (sm90_forward_tma_kv), for gathered tiles (rows by slot), under FSA_CUDA_TMA=0, and
// where TMA cannot address the tensors (encode_rows_map; log_tma_fallback).
template <int kHeadDim>
KvTensorMaps forward_tensor_maps(const ForwardParams& p, bool gathered) {
  KvTensorMaps maps{};
  if constexpr (sm90_forward_tma_kv(kHeadDim)) {
    if (gathered || !tma_enabled()) return maps;
    maps.enabled = encode_kv_maps(maps, p);
    static std::atomic<bool> logged{false};
    if (!maps.enabled) log_tma_fallback(logged, "key or value", "the Hopper forward");
  }
  return maps;
}

// Whether the sm90 forward checks V for NaN / Inf once ahead of a persistent launch
// (v_nonfinite_kernel), so that its partial tiles skip the scan when V has none;
// FSA_CUDA_V_CHECK=tiles scans every partial tile instead (A/B measurements, docs/perf.md).
inline bool v_check_ahead_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_V_CHECK", "tiles");
  return enabled;
}

// Whether a call's map may list partial tiles: only causality, a mask, per-row bounds or top-k,
// and a ragged last key tile drop entries inside a tile (a block selection drops whole tiles).
inline bool may_have_partial_tiles(const ForwardParams& p) {
  return p.is_causal || p.mask != nullptr || p.row_topk.key != nullptr ||
         p.row_end.data != nullptr || p.seqlen_k % p.map.block_n != 0;
}

// Whether the sm90 forward has a lean walk at kernel head dim kHeadDim: at D = 64 it measured 3-4%
// slower than the general walk on dense calls (H200, docs/perf.md, thirty-second session), which
// keeps that head dim on the general walks as before (with the V check where no flag is set).
constexpr bool sm90_forward_lean(int kHeadDim) { return kHeadDim >= 128; }

// Whether a call's logits need nothing but the lean walk's (forward_kernel_sm90's kLean): no mask,
// per-row top-k or row bounds (causality alone drops keys), no gathered or staged tiles, no
// softcap, a scale that stays outside the logits, every key tile whole, and no bias or a
// query-invariant one whose rows the producer stages with their key tiles: keys contiguous and
// each (batch, head) row 16-byte aligned (the kernel's staged_bias_row, restated on the host).
inline bool lean_forward_call(const ForwardParams& p) {
  return causal_only_drops(p) && p.map.gather_slots == nullptr && !p.bias_staged &&
         p.softcap_in == 0.0f && p.scale_log2 >= 1e-20f && p.seqlen_k % p.map.block_n == 0 &&
         !p.pack_gqa && (p.bias == nullptr || key_bias_rows_aligned(p));
}

// Whether the sm90 forward walks causality's band in blocks of its own for a call
// (forward_kernel_sm90's kBand: 192 rows and three consumer warpgroups at D = 64, 128 rows over
// 128-key tiles at D = 128): at the head dims that have the band walk (sm90_forward_band), plan
// lists that are the band alone (ForwardParams::causal_band), a lean call (lean_forward_call)
// whose keys are a whole number of `band_keys` (sm90_band_keys), one split, the persistent
// launch and the V check ahead (the band walk has no V check of its own).
// FSA_CUDA_FORWARD_BAND=0 keeps the plan's walks (A/B measurements).
inline bool band_forward_call(const ForwardParams& p, int band_keys) {
  static const bool enabled = !env_is("FSA_CUDA_FORWARD_BAND", "0");
  return enabled && p.causal_band && p.num_splits == 1 && lean_forward_call(p) &&
         p.seqlen_k % band_keys == 0 && p.v_nonfinite == nullptr &&
         persistent_forward_enabled() && v_check_ahead_enabled() &&
         int64_t(p.map.m_blocks) * p.num_heads * p.batch < (int64_t(1) << 30);  // (int counter)
}

// The lean walk (kBand: the band walk) for a lean call: the instantiation with bias code where it
// has a bias, the one without where it has none.
template <int kHeadDim, class Elt, bool kBand>
auto* lean_walk_kernel(const ForwardParams& p) {
  if (p.bias == nullptr) {
    return &forward_kernel_sm90<kHeadDim, Elt, false, false, false, true, kBand, false>;
  }
  return &forward_kernel_sm90<kHeadDim, Elt, false, false, false, true, kBand>;
}

// The band walk (band_forward_call), its CTAs taking the band's query blocks from a counter (one
// per SM at most), after the V check ahead where tiles are partial. A call whose V holds a NaN /
// Inf runs the 128-row general walk with the V check instead: both are launched, each returning
// at once unless the flag calls for it (as launch_forward's pair), so the two never share the
// counter.
template <int kHeadDim, class Elt>
void launch_band_forward(const ForwardParams& params, cudaStream_t stream) {
  using Band = Sm90WalkTiles<kHeadDim, Elt, true, true>;
  using Tiles = Sm90ForwardTiles<kHeadDim, Elt>;
  const int64_t sms = multiprocessor_count();
  const int64_t rows_of_blocks = int64_t(params.num_heads) * params.batch;  // never GQA-packed
  const int band_blocks = (params.seqlen_q + Band::kBlockM - 1) / Band::kBlockM;
  const int64_t band_tiles = band_blocks * rows_of_blocks;
  const int64_t tiles = int64_t(params.map.m_blocks) * rows_of_blocks;
  StreamBuffer counter(stream);  // the tile counter, then the V check's flag
  FSA_CUDA_CHECK(scratch_malloc(&counter.ptr, 2 * sizeof(int), stream));
  FSA_CUDA_CHECK(cudaMemsetAsync(counter.ptr, 0, 2 * sizeof(int), stream));
  ForwardParams fp = params;
  fp.tile_counter = static_cast<int*>(counter.ptr);
  fp.long_blocks = band_long_blocks(fp, band_blocks);
  fp.v_nonfinite = fp.tile_counter + 1;
  const bool checked_v = may_have_partial_tiles(fp);
  if (checked_v) launch_v_check<Elt>(fp, fp.tile_counter + 1, stream);
  const KvTensorMaps maps = forward_tensor_maps<kHeadDim>(params, false);
  auto* band = lean_walk_kernel<kHeadDim, Elt, true>(params);
  const int band_smem = Band::smem_bytes(false);
  allow_dynamic_smem(reinterpret_cast<const void*>(band), band_smem);
  band<<<unsigned(std::min(band_tiles, sms)), Band::kThreads, band_smem, stream>>>(fp, maps);
  // Without the check the flag stays the zero the memset wrote: the walk with the V check would
  // return at once, so it is not launched.
  if (!checked_v) return;
  auto* checked = &forward_kernel_sm90<kHeadDim, Elt, false, false, true>;
  const int smem = Tiles::smem_bytes(false);
  allow_dynamic_smem(reinterpret_cast<const void*>(checked), smem);
  fp.long_blocks = 0;  // the 128-row walk's order (band_long_blocks)
  checked<<<unsigned(std::min(tiles, sms)), Tiles::kThreads, smem, stream>>>(fp, maps);
}

template <int kHeadDim, class Elt>
void launch_combine(const ForwardParams& params, cudaStream_t stream) {
  // Splits only where the forward's grid is under two waves, so rows fit a grid dimension.
  const int64_t rows = int64_t(params.batch) * params.num_heads * params.seqlen_q;
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(rows));
  config.blockDim = dim3(kCombineThreads);
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = dependent_launch_enabled() ? 1 : 0;
  FSA_CUDA_CHECK(cudaLaunchKernelEx(&config, &combine_kernel<kHeadDim, Elt>, params));
}

template <int kHeadDim, class Elt, int kStages, bool kSplitKeys>
void launch_sm80_forward(const ForwardParams& params, dim3 grid, cudaStream_t stream) {
  using Tiles = ForwardTiles<kHeadDim, kStages, kSplitKeys>;
  auto* kernel = &forward_kernel<kHeadDim, Elt, kStages, kSplitKeys>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), Tiles::kSmemBytes);
  kernel<<<grid, Tiles::kThreads, Tiles::kSmemBytes, stream>>>(params);
}

template <int kHeadDim, class Elt>
void launch_forward(const ForwardParams& params, cudaStream_t stream) {
  const int heads = params.pack_gqa ? params.num_kv_heads : params.num_heads;
  const dim3 grid(params.map.m_blocks * params.num_splits, heads, params.batch);
  bool launched = false;
  {
    // Per-row top-k over compacted keys runs on the gathered lists its device plan has
    // (BlockMapParams::gather_slots); packed sequences, whose slots are consecutive, walk the map
    // over the slot axis and read RowEnd::key_last in their partial tiles.
    const bool gathered = params.map.gather_slots != nullptr;
    if (use_sm90_forward(params, kHeadDim)) {
      if constexpr (sm90_forward_band(kHeadDim)) {
        if (band_forward_call(params, sm90_band_keys(kHeadDim))) {
          launch_band_forward<kHeadDim, Elt>(params, stream);
          FSA_CUDA_CHECK(cudaGetLastError());
          return;
        }
      }
      using Tiles = Sm90ForwardTiles<kHeadDim, Elt>;
      const bool lean = sm90_forward_lean(kHeadDim) && lean_forward_call(params);
      // The instantiation for the call, with or without the partial tiles' V check (kCheckV).
      // Without the check, calls whose logits allow it run the lean walk (lean_forward_call).
      auto sm90_kernel = [&](auto check_v) {
        constexpr bool kCheckV = decltype(check_v)::value;
        auto* kernel = &forward_kernel_sm90<kHeadDim, Elt, false, false, kCheckV>;
        if constexpr (!kCheckV && sm90_forward_lean(kHeadDim)) {
          if (lean) {
            kernel = lean_walk_kernel<kHeadDim, Elt, false>(params);
          }
        }
        if (params.bias_staged) kernel = &forward_kernel_sm90<kHeadDim, Elt, true, false, kCheckV>;
        if constexpr (Tiles::kPlanRows == 1) {
          if (gathered) kernel = &forward_kernel_sm90<kHeadDim, Elt, false, true, kCheckV>;
        }
        return kernel;
      };
      const int smem = Tiles::smem_bytes(params.bias_staged, gathered);
      // The lean walk's shared memory: 128-key steps where sm90_forward_wide.
      using LeanTiles = Sm90WalkTiles<kHeadDim, Elt, true, false>;
      // A CTA's query block is Tiles::kPlanRows of the plan's (two at D = 256).
      static_assert(Tiles::kPlanRows == (kHeadDim > 128 ? 2 : 1), "forward_plan_rows_per_cta");
      const dim3 sm90_grid(
          unsigned((params.map.m_blocks + Tiles::kPlanRows - 1) / Tiles::kPlanRows *
                   params.num_splits),
          unsigned(heads), unsigned(params.batch));
      // Persistent: one CTA per SM (the kernel's occupancy) takes tiles from a counter, so a
      // tile's Q and first K/V tiles load while the previous tile finishes and is written out.
      const int64_t tiles = int64_t(sm90_grid.x) * sm90_grid.y * sm90_grid.z;
      const int64_t sms = multiprocessor_count();
      StreamBuffer counter(stream);  // the tile counter, then the V check's flag
      ForwardParams fp = params;
      dim3 launch_grid = sm90_grid;
      bool flag_may_be_set = true;  // whether a V check ahead or a gather may set the flag
      if (persistent_forward_enabled() && tiles > sms && tiles < (int64_t(1) << 30)) {
        FSA_CUDA_CHECK(scratch_malloc(&counter.ptr, 2 * sizeof(int), stream));
        FSA_CUDA_CHECK(cudaMemsetAsync(counter.ptr, 0, 2 * sizeof(int), stream));
        fp.tile_counter = static_cast<int*>(counter.ptr);
        launch_grid = dim3(unsigned(sms));
        // A partial tile's V scan makes the producer wait for the tile's copies (each tile's
        // last key tiles, just before the next tile's first loads), and the walk compiled with
        // the scan is slower even where none runs: with V read once ahead, the call runs the
        // walk without it unless V holds a NaN / Inf (docs/perf.md, thirty-first session).
        // Calls over compacted keys have their gather's flag already; a call without partial
        // tiles has no V to check, and its flag stays the zero the memset wrote (where the head
        // dim has a lean walk: at D = 64 such calls keep the walk they ran before).
        if (fp.v_nonfinite == nullptr && !may_have_partial_tiles(fp)) {
          if constexpr (sm90_forward_lean(kHeadDim)) {
            fp.v_nonfinite = fp.tile_counter + 1;
            flag_may_be_set = false;
          }
        } else if (fp.v_nonfinite == nullptr && v_check_ahead_enabled()) {
          fp.v_nonfinite = fp.tile_counter + 1;
          launch_v_check<Elt>(fp, fp.tile_counter + 1, stream);
        }
      }
      // A call whose V is flagged on the device (fp.v_nonfinite) launches the walk without the
      // V check, then the one with it: each returns at once unless the flag calls for it. Where
      // nothing can set the flag (no partial tiles), the second would always return: it is not
      // launched.
      const KvTensorMaps maps = forward_tensor_maps<kHeadDim>(params, gathered);
      if (fp.v_nonfinite != nullptr) {
        auto* fast = sm90_kernel(std::false_type{});
        const int fast_smem = lean ? LeanTiles::smem_bytes(false) : smem;
        allow_dynamic_smem(reinterpret_cast<const void*>(fast), fast_smem);
        fast<<<launch_grid, Tiles::kThreads, fast_smem, stream>>>(fp, maps);
      }
      if (fp.v_nonfinite == nullptr || flag_may_be_set) {
        auto* kernel = sm90_kernel(std::true_type{});
        allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
        kernel<<<launch_grid, Tiles::kThreads, smem, stream>>>(fp, maps);
      }
      launched = true;
    }
  }
  if (!launched) {
    const Sm80Layout layout =
        sm80_layout(params.pack_gqa, params.seqlen_q * params.group, kHeadDim);
    if constexpr (kHeadDim <= 128) {
      if (layout.split_keys && layout.stages == kDeepDecodeStages) {
        launch_sm80_forward<kHeadDim, Elt, kDeepDecodeStages, true>(params, grid, stream);
        launched = true;
      } else if (layout.split_keys) {
        launch_sm80_forward<kHeadDim, Elt, kDecodeStages, true>(params, grid, stream);
        launched = true;
      }
    }
    if (!launched) launch_sm80_forward<kHeadDim, Elt, kForwardStages, false>(params, grid, stream);
  }
  FSA_CUDA_CHECK(cudaGetLastError());
  if (params.num_splits > 1) launch_combine<kHeadDim, Elt>(params, stream);
}

}  // namespace fsa::detail::cuda
