// Definitions of the CUDA backend's entry points for builds without CUDA: every one rejects the
// call with a clear message instead of failing to link.
#ifndef FSA_WITH_CUDA

#include "cuda/cuda_backend.h"

namespace fsa::detail::cuda {
namespace {
[[noreturn]] void unavailable() {
  throw Error(ErrorKind::kUnsupported, "query",
              "got a CUDA tensor, but this build has no CUDA backend (rebuild where nvcc is found)");
}
}  // namespace

std::shared_ptr<const DeviceBlockMap> make_device_plan(const Geometry&,
                                                       const std::optional<BroadcastOperand>&,
                                                       const std::optional<BroadcastOperand>&,
                                                       int, int, bool, const BlockMap&,
                                                       const RowEnd&, bool, int64_t, void*) {
  unavailable();
}
std::shared_ptr<const KeyCompaction> make_device_compaction(const Geometry&,
                                                            const BroadcastOperand&, bool, int,
                                                            int, int64_t, void*) {
  unavailable();
}
std::shared_ptr<const KeyCompaction> make_device_topk_compaction(
    const Geometry&, const BroadcastOperand&, const std::optional<BroadcastOperand>&, bool,
    const RowTopK&, int64_t, int, int, void*) {
  unavailable();
}
bool mask_key_intervals(const Geometry&, const BroadcastOperand&, bool, void*) { unavailable(); }
std::shared_ptr<const KeyCompaction> make_device_interval_compaction(const Geometry&,
                                                                     const BroadcastOperand&, bool,
                                                                     int, int, void*) {
  unavailable();
}
std::shared_ptr<const KeyCompaction> make_device_packed_compaction(
    const Geometry&, const PlanOptions::PackedSequences&, const std::optional<BroadcastOperand>&,
    bool, int, int, void*) {
  unavailable();
}
std::shared_ptr<const RowThresholds> make_device_thresholds(
    const Geometry&, const BroadcastOperand&, const std::optional<BroadcastOperand>&, bool,
    int64_t, double, void*) {
  unavailable();
}
DeviceTopkPlan make_device_topk_plan(const Geometry&, const BroadcastOperand&, bool, int64_t,
                                     double, int, int, void*) {
  unavailable();
}
void compacted_forward(const ForwardProblem&, const KeyCompaction&, void*) { unavailable(); }
void compacted_backward(const BackwardProblem&, const KeyCompaction&, void*) { unavailable(); }
DevicePlanStats device_plan_stats(const DeviceBlockMap&) { unavailable(); }
void forward(const ForwardProblem&, const Plan&, void*) { unavailable(); }
void backward(const BackwardProblem&, const Plan&, void*) { unavailable(); }
CurrentDevice::CurrentDevice(int) {}  // a CUDA tensor is refused before anything runs
CurrentDevice::~CurrentDevice() = default;
void release_scratch() {}  // no pools without CUDA
int64_t scratch_reserved() { return 0; }
CudaPlanGraphs plan_graphs() { return {}; }
std::vector<KernelExperiment> kernel_experiments() { return {}; }

bool forward_built(int64_t, DType) { return false; }
bool backward_built(int64_t, DType) { return false; }
void require_built(const ForwardProblem&) { unavailable(); }
void require_built(const BackwardProblem&) { unavailable(); }

}  // namespace fsa::detail::cuda

#endif  // FSA_WITH_CUDA
