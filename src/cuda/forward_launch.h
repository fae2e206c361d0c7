#pragma once
// Launchers of the forward kernel, one explicit instantiation per (head dim, dtype) in
// src/cuda/generated/ (written by scripts/generate_kernels.py).

#include <cuda_runtime.h>

#include "cuda/device_arch.h"
#include "cuda/params.h"
#include "cuda/tiles.h"

namespace fsa::detail::cuda {

struct Bf16;
struct Fp16;

// The sm80 forward's layout for a call (ForwardTiles): split keys for GQA-packed decode
// (forward_split_keys) over kDecodeStages, or kDeepDecodeStages with FSA_CUDA_DECODE=deep;
// FSA_CUDA_DECODE=off keeps decode on the row-split layout (A/B measurements, docs/perf.md).
// Split-KV sizes its grid by the CTAs per SM of the layout.
struct Sm80Layout {
  bool split_keys;
  int stages;
  int ctas_per_sm(int head_dim) const { return forward_ctas_per_sm(head_dim, stages, split_keys); }
};
inline Sm80Layout sm80_layout(bool pack_gqa, int flat_rows, int head_dim) {
  static const bool off = env_is("FSA_CUDA_DECODE", "off");
  static const bool deep = env_is("FSA_CUDA_DECODE", "deep");
  if (off || !forward_split_keys(pack_gqa, flat_rows, head_dim)) return {false, kForwardStages};
  return {true, deep ? kDeepDecodeStages : kDecodeStages};
}

// Whether a decode's K / V loads leave L2 first (ForwardParams::kv_evict_first);
// FSA_CUDA_KV_EVICT_FIRST=0 loads them unhinted (A/B measurements, docs/perf.md).
inline bool kv_evict_first_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_KV_EVICT_FIRST", "0");
  return enabled;
}

// Whether a paged decode's CTAs touch their table entries at their start
// (ForwardParams::touch_table); FSA_CUDA_TOUCH_TABLE=0 leaves them untouched (A/B measurements).
inline bool touch_table_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_TOUCH_TABLE", "0");
  return enabled;
}

// The Hopper kernel serves prefill on sm_90 devices (the sm_90a image of this build). Decode-style
// GQA packing stays on the sm80 kernel (its split-key layout, tiles.h, keeps several K / V tiles
// loading per CTA, which a memory-bound pass needs more than wgmma), and so does a paged cache:
// only the sm80 kernel loads rows through a page table. At D = 256 per-row top-k over compacted
// keys (gathered tiles, one plan tile's each) stays there too, logged once per process (our
// choice, not the caller's). FSA_CUDA_FORWARD=sm80 forces the sm80 kernel (for A/B measurements
// on one card).
inline bool use_sm90_forward(const ForwardParams& params, int kernel_head_dim) {
  static const bool forced_sm80 = env_is("FSA_CUDA_FORWARD", "sm80");
  if (forced_sm80 || params.pack_gqa || params.paged.table != nullptr ||
      params.cache_seqlens != nullptr || !hopper_kernels_available()) {
    return false;
  }
  if (kernel_head_dim > 128 && params.map.gather_slots != nullptr) {
    static std::atomic<bool> logged{false};
    log_gathered_on_sm80(logged, "forward", kernel_head_dim);
    return false;
  }
  return true;
}

// The plan's query tiles per CTA of the forward that serves a call: two for the sm90 kernel at
// D = 256 (Sm90ForwardTiles::kPlanRows), else one. Split-KV sizes its grid by it.
inline int forward_plan_rows_per_cta(const ForwardParams& params, int kernel_head_dim) {
  return kernel_head_dim > 128 && use_sm90_forward(params, kernel_head_dim) ? 2 : 1;
}

template <int kHeadDim, class Elt>
void launch_forward(const ForwardParams& params, cudaStream_t stream);

}  // namespace fsa::detail::cuda
