#pragma once
// The per-row top-k thresholds of a plan (core/row_topk.h says what they mean): validation of
// PlanOptions::topk and the CPU computation.

#include <algorithm>
#include <memory>
#include <optional>

#include "core/problem.h"
#include "core/row_topk.h"
#include "fsa/plan.h"

namespace fsa::detail {

// The thresholds' lists: (batch, heads), the finer of the bias's and the mask's read extents
// (each extent is 1 or the problem's; head counts 1, Hk, H each divide the next).
struct TopkLists {
  int64_t batch = 1, heads = 1;
};
inline TopkLists topk_lists(const BroadcastOperand& bias,
                            const std::optional<BroadcastOperand>& mask) {
  return {std::max(bias.read_extent(0), mask ? mask->read_extent(0) : int64_t(1)),
          std::max(bias.read_extent(1), mask ? mask->read_extent(1) : int64_t(1))};
}

// The thresholds a plan holds.
struct RowThresholds {
  RowTopK view;
  int64_t topk = 0;
  const void* bias = nullptr;     // the bias they were computed from (a call must pass it)
  std::shared_ptr<void> storage;  // owns view.key / view.last (host or device memory)
};

// The fill as masked_fill stores it into the bias's dtype, then widened to fp32.
float rounded_fill(double min_value, DType dtype);

// Validates PlanOptions::topk / topk_bias against the problem (the bias must be query-invariant:
// its query dim 1 or expanded) and returns the bias's broadcast view.
BroadcastOperand validate_topk_bias(const TensorView& bias, int64_t topk, const Geometry& g,
                                    const Device& device);

// Thresholds on the CPU: for each row of (batch, heads) = the finer of the bias's and the mask's.
std::shared_ptr<const RowThresholds> make_cpu_thresholds(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, int64_t topk, double min_value);

}  // namespace fsa::detail
