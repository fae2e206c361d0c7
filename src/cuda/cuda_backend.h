#pragma once
// The CUDA backend as seen from the core: plain C++ declarations, no CUDA headers. Without a CUDA
// build these are defined by src/core/cuda_unavailable.cc and throw ErrorKind::kUnsupported.

#include <cstdint>
#include <memory>
#include <optional>

#include "core/problem.h"
#include "fsa/plan.h"

namespace fsa::detail::cuda {

struct DevicePlanStats {
  int64_t kept_entries = 0;   // kept (query, key) pairs over the map's (batch, head)
  int64_t visited_tiles = 0;  // full + partial tiles
};

// Builds the block map on the device of the mask / query, asynchronously on `stream`. `extents`
// carries the map's batch, heads, blocks and tile shape; a selection tile spans
// sel_ratio_m x sel_ratio_n plan tiles.
std::shared_ptr<const DeviceBlockMap> make_device_plan(
    const Geometry& g, const std::optional<BroadcastOperand>& mask,
    const std::optional<BroadcastOperand>& selection, int sel_ratio_m, int sel_ratio_n,
    bool is_causal, const BlockMap& extents, void* stream);

// Waits for the planning kernels and reads the plan's counters.
DevicePlanStats device_plan_stats(const DeviceBlockMap& map);

void forward(const ForwardProblem& p, const Plan& plan, void* stream);
void backward(const BackwardProblem& p, const Plan& plan, void* stream);

}  // namespace fsa::detail::cuda
