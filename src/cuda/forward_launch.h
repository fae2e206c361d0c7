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

template <int kHeadDim, class Elt>
void launch_forward(const ForwardParams& params, cudaStream_t stream);

}  // namespace fsa::detail::cuda
