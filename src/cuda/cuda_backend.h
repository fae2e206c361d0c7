#pragma once
// The CUDA backend as seen from the core: plain C++ declarations, no CUDA headers. Without a CUDA
// build these are defined by src/core/cuda_unavailable.cc and throw ErrorKind::kUnsupported.

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "core/compaction.h"
#include "core/problem.h"
#include "core/thresholds.h"
#include "fsa/plan.h"

namespace fsa::detail::cuda {

struct DevicePlanStats {
  int64_t kept_entries = 0;   // kept (query, key) pairs over the map's (batch, head)
  int64_t visited_tiles = 0;  // full + partial tiles
  int64_t gathered_tiles = 0;       // tiles of the gathered lists (BlockMapParams::gather_slots)
  int64_t gathered_full_tiles = 0;  // of those, the ones every row of their query tile keeps
  int64_t dkv_tiles = 0;       // (group, query tile) pairs of the dK/dV groups (dkv_slots)
  int64_t dkv_full_tiles = 0;  // of those, the ones whose every entry is kept
};

// Builds the block map on the device of the mask / query, asynchronously on `stream`. `extents`
// carries the map's batch, heads, blocks and tile shape; a selection tile spans
// sel_ratio_m x sel_ratio_n plan tiles. With row_end (device memory, heads = extents.heads) the
// map is a compacted one: row bounds alone decide, with no mask, selection or causality.
// all_partial lists no tile as full (per-row top-k thresholds apply to every tile).
// gather_window > 0 with row_end.key_last (per-row top-k over compacted keys, that many keys per
// row at most) also builds the gathered slot lists (BlockMapParams::gather_slots).
std::shared_ptr<const DeviceBlockMap> make_device_plan(
    const Geometry& g, const std::optional<BroadcastOperand>& mask,
    const std::optional<BroadcastOperand>& selection, int sel_ratio_m, int sel_ratio_n,
    bool is_causal, const BlockMap& extents, const RowEnd& row_end, bool all_partial,
    int64_t gather_window, void* stream);

// Compacted keys (core/compaction.h) on the device, asynchronously on `stream`: the key lists of
// a key-only mask, every row's bound and their block map with tiles block_m x block_n.
std::shared_ptr<const KeyCompaction> make_device_compaction(const Geometry& g,
                                                            const BroadcastOperand& mask,
                                                            bool is_causal, int block_m,
                                                            int block_n, int64_t max_kept_keys,
                                                            void* stream);
// Per-row top-k over compacted keys (core/compaction.h, compactable_topk) on the device: lists of
// the keys some row keeps — the first row that sees a key is the loosest, since the device
// thresholds only tighten down the rows — each slot's last row, and per query tile the slots its
// rows keep (at most topk per row).
std::shared_ptr<const KeyCompaction> make_device_topk_compaction(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, const RowTopK& thresholds, int64_t topk, int block_m, int block_n,
    void* stream);
// A mask with a query dim whose rows are one interval per key (PlanOptions::mask_key_intervals):
// whether it is (reads the mask, waits for the answer), and its compacted keys, asynchronously
// (core/compaction.h, make_cpu_interval_compaction: the same lists).
bool mask_key_intervals(const Geometry& g, const BroadcastOperand& mask, bool is_causal,
                        void* stream);
std::shared_ptr<const KeyCompaction> make_device_interval_compaction(const Geometry& g,
                                                                     const BroadcastOperand& mask,
                                                                     bool is_causal, int block_m,
                                                                     int block_n, void* stream);
// Packed sequences (PlanOptions::packed): their compacted keys from the offsets on the device,
// asynchronously, with no gathered lists (core/compaction.h, make_cpu_packed_compaction: the same
// lists).
std::shared_ptr<const KeyCompaction> make_device_packed_compaction(
    const Geometry& g, const PlanOptions::PackedSequences& packed,
    const std::optional<BroadcastOperand>& mask, bool is_causal, int block_m, int block_n,
    void* stream);
// Per-row top-k thresholds (core/row_topk.h) on the device, asynchronously on `stream`.
std::shared_ptr<const RowThresholds> make_device_thresholds(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, int64_t topk, double min_value, void* stream);
// Per-row top-k over compacted keys without a mask: the thresholds and the compaction above, from
// a CUDA graph of the planning sequence, captured once per (shape, stream) and replayed with the
// call's bias (cuda/plan_graph.cu); FSA_CUDA_PLAN_GRAPH=0 plans eagerly.
struct DeviceTopkPlan {
  std::shared_ptr<const RowThresholds> thresholds;
  std::shared_ptr<const KeyCompaction> compaction;
};
DeviceTopkPlan make_device_topk_plan(const Geometry& g, const BroadcastOperand& bias,
                                     bool is_causal, int64_t topk, double min_value, int block_m,
                                     int block_n, void* stream);

// A call over the plan's compacted keys: gathers K, V (and the bias), runs the kernels over the
// slots, and (backward) scatters dK, dV and the bias gradient back by key.
void compacted_forward(const ForwardProblem& p, const KeyCompaction& c, void* stream);
void compacted_backward(const BackwardProblem& p, const KeyCompaction& c, void* stream);

// Waits for the planning kernels and reads the plan's counters.
DevicePlanStats device_plan_stats(const DeviceBlockMap& map);

void forward(const ForwardProblem& p, const Plan& plan, void* stream);
void backward(const BackwardProblem& p, const Plan& plan, void* stream);

// Whether this build has the forward / backward kernels for `head_dim`'s kernel width and `dtype`
// (FSA_CUDA_INSTANCES), which forward() and backward() above need; false without CUDA.
bool forward_built(int64_t head_dim, DType dtype);
bool backward_built(int64_t head_dim, DType dtype);
// A CUDA call whose kernels are missing from this build fails here, naming the query, before
// anything is planned (dispatch.cc) or launched.
void require_built(const ForwardProblem& p);
void require_built(const BackwardProblem& p);

// The core's guard around a CUDA call: `device` is current while it lives (kernels launch and
// scratch is taken on the current device), the caller's again after. Without CUDA: nothing.
class CurrentDevice {
 public:
  explicit CurrentDevice(int device);
  ~CurrentDevice();
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = -1;  // -1: unchanged
};

// The library's memory pools (cuda/memory_pool.h): give back to the driver what they hold unused
// (every device's, and the planning graphs' memory), and the bytes the current device's pool
// holds (0 before its first call).
void release_scratch();
int64_t scratch_reserved();
// The planning graphs held (make_device_topk_plan).
CudaPlanGraphs plan_graphs();
// The kernel experiments this build was compiled with (cuda/experiments.h).
std::vector<KernelExperiment> kernel_experiments();

}  // namespace fsa::detail::cuda
