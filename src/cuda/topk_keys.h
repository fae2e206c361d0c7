#pragma once
// The per-key operands of per-row top-k planning on the device (thresholds.cu, compact.cu): the
// query-invariant bias and an optional key-only mask of a thresholds list (batch, list head),
// read through their broadcast strides.

#include <cuda_fp16.h>

#include <cstdint>
#include <optional>

#include "core/problem.h"

namespace fsa::detail::cuda {

struct TopkKeys {
  const void* bias;  // the caller's, read through its read strides
  int bias_dtype;    // 0 fp32, 1 bf16, 2 fp16
  int64_t bias_stride[4];
  int64_t bias_head_group;
  const uint8_t* mask;  // key-only mask or null
  int64_t mask_stride[4];
  int64_t mask_head_group;
  int list_heads;      // lists: (list batch, list_heads)
  int64_t head_group;  // query heads per list head
  int seqlen_q, seqlen_k;

  // Whether list l allows key j (its mask), and its bias value there.
  __device__ bool allowed(int l, int j) const {
    if (mask == nullptr) return true;
    const int64_t hq = int64_t(l % list_heads) * head_group;
    return mask[(l / list_heads) * mask_stride[0] + (hq / mask_head_group) * mask_stride[1] +
                int64_t(j) * mask_stride[3]] != 0;
  }
  __device__ float value(int l, int j) const {
    const int64_t hq = int64_t(l % list_heads) * head_group;
    const int64_t off = (l / list_heads) * bias_stride[0] + (hq / bias_head_group) * bias_stride[1] +
                        int64_t(j) * bias_stride[3];
    if (bias_dtype == 0) return static_cast<const float*>(bias)[off];
    const uint16_t bits = static_cast<const uint16_t*>(bias)[off];
    if (bias_dtype == 1) return __uint_as_float(uint32_t(bits) << 16);
    return __half2float(__ushort_as_half(bits));
  }
};

inline TopkKeys make_topk_keys(const Geometry& g, const BroadcastOperand& bias,
                               const std::optional<BroadcastOperand>& mask, int64_t list_heads) {
  TopkKeys k{};
  k.bias = bias.data;
  k.bias_dtype = bias.dtype == DType::kFloat32 ? 0 : bias.dtype == DType::kBFloat16 ? 1 : 2;
  for (int d = 0; d < 4; ++d) k.bias_stride[d] = bias.read_stride[d];
  k.bias_head_group = bias.head_group;
  if (mask) {
    k.mask = static_cast<const uint8_t*>(mask->data);
    for (int d = 0; d < 4; ++d) k.mask_stride[d] = mask->read_stride[d];
    k.mask_head_group = mask->head_group;
  }
  k.list_heads = int(list_heads);
  k.head_group = g.num_heads / list_heads;
  k.seqlen_q = int(g.seqlen_q);
  k.seqlen_k = int(g.seqlen_k);
  return k;
}

}  // namespace fsa::detail::cuda
