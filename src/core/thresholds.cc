// Per-row top-k thresholds (core/row_topk.h): validation, and the CPU computation.

#include "core/thresholds.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/causal.h"
#include "core/dtype.h"
#include "cpu/thread_pool.h"

namespace fsa::detail {

float rounded_fill(double min_value, DType dtype) {
  // As masked_fill stores it: rounded to nearest into the dtype, overflowing to infinity.
  const float narrow = std::isnan(min_value) ? std::numeric_limits<float>::quiet_NaN()
                       : min_value >= double(FLT_MAX) * 2.0 ? std::numeric_limits<float>::infinity()
                       : min_value <= -double(FLT_MAX) * 2.0
                           ? -std::numeric_limits<float>::infinity()
                           : float(min_value);
  switch (dtype) {
    case DType::kBFloat16:
      return bf16_to_float(float_to_bf16(narrow));
    case DType::kFloat16:
      return half_to_float(float_to_half(narrow));
    default:
      return narrow;
  }
}

BroadcastOperand validate_topk_bias(const TensorView& bias, int64_t topk, const Geometry& g,
                                    const Device& device) {
  if (topk < 1) {
    throw Error(ErrorKind::kValue, "topk",
                "expected a positive number of keys per row, got " + std::to_string(topk));
  }
  if (bias.device != device) {
    throw Error(
        ErrorKind::kDevice, "attn_bias",
        "expected device " + to_string(device) + " (the query's), got " + to_string(bias.device));
  }
  if (bias.dtype != DType::kFloat16 && bias.dtype != DType::kBFloat16 &&
      bias.dtype != DType::kFloat32) {
    throw Error(ErrorKind::kDType, "attn_bias",
                "expected float16, bfloat16 or float32 to select the top-k keys by, got " +
                    to_string(bias.dtype));
  }
  BroadcastOperand op = validate_broadcast(bias, "attn_bias", g, g.seqlen_q, g.seqlen_k);
  if (op.read_stride[2] != 0) {
    throw Error(ErrorKind::kShape, "attn_bias",
                "per-row top-k selects by a query-invariant bias: expected query dim 1 (or an "
                "expanded view), got shape " +
                    bias.shape_string());
  }
  return op;
}

std::shared_ptr<const RowThresholds> make_cpu_thresholds(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, int64_t topk, double min_value) {
  const TopkLists extents = topk_lists(bias, mask);
  const int64_t batch = extents.batch, heads = extents.heads;
  const int64_t sq = g.seqlen_q, sk = g.seqlen_k;
  struct Arrays {
    std::vector<uint32_t> key;
    std::vector<int32_t> last;
  };
  auto arrays = std::make_shared<Arrays>();
  arrays->key.assign(size_t(batch * heads * sq), 0);
  arrays->last.assign(size_t(batch * heads * sq), std::numeric_limits<int32_t>::max());

  const float fill = rounded_fill(min_value, bias.dtype);
  const uint32_t fill_key = order_key(fill);
  const uint32_t fill_key_alt = fill == 0.0f ? order_key(-fill) : fill_key;
  const CausalBand band{sq, sk, is_causal};
  const int64_t head_group = g.num_heads / heads;
  if (topk < sk) {
    parallel_for(batch * heads, [&](int64_t row_block, int) {
      const int64_t b = row_block / heads, hq = (row_block % heads) * head_group;
      std::vector<uint32_t> keys(static_cast<size_t>(sk)), sorted(static_cast<size_t>(sk));
      for (int64_t i = 0; i < sq; ++i) {
        // The row as create_mask fills it: the fill wherever the mask or causality drops a key.
        const int64_t end = band.visible_end(i);
        for (int64_t j = 0; j < sk; ++j) {
          const bool allowed =
              j < end &&
              (!mask || static_cast<const uint8_t*>(mask->data)[mask->offset(b, hq, i, j)] != 0);
          keys[size_t(j)] =
              allowed ? order_key(load_float(bias.data, bias.dtype, bias.offset(b, hq, 0, j)))
                      : fill_key;
        }
        sorted = keys;
        std::nth_element(sorted.begin(), sorted.begin() + (topk - 1), sorted.end(),
                         std::greater<uint32_t>());
        const uint32_t threshold = sorted[size_t(topk - 1)];
        int64_t ties = topk;  // entries equal to the threshold that make the top k
        for (uint32_t k : keys) ties -= k > threshold;
        int32_t last = -1;  // the lowest `ties` indices among the equal entries are kept
        for (int64_t j = 0; j < sk && ties > 0; ++j) {
          if (keys[size_t(j)] == threshold && --ties == 0) last = int32_t(j);
        }
        const size_t at = size_t((b * heads + row_block % heads) * sq + i);
        arrays->key[at] = threshold;
        arrays->last[at] = last;
      }
    });
  }
  auto t = std::make_shared<RowThresholds>();
  t->view.key = arrays->key.data();
  t->view.last = arrays->last.data();
  t->view.stride_b = batch == 1 ? 0 : heads * sq;
  t->view.stride_h = sq;
  t->view.head_group = head_group;
  t->view.fill_key = fill_key;
  t->view.fill_key_alt = fill_key_alt;
  t->topk = topk;
  t->bias = bias.data;
  t->storage = arrays;
  return t;
}

}  // namespace fsa::detail
