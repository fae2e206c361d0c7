#pragma once
// Per-row top-k planning replayed from CUDA graphs (plan_graph.cu); the entry point is
// make_device_topk_plan (cuda_backend.h).

#include <cuda_runtime.h>

namespace fsa::detail::cuda {

// Drops the captured graphs and their memory; instances leased to live plans go with those.
void release_plan_graphs();

// Independent parts of a planning sequence as parallel branches of a planning graph being
// captured on `stream` (make_device_topk_plan): branch(i) is a stream whose work runs after what
// `stream` had when this was made, and the destructor makes `stream` wait for every branch.
// Outside such a capture every branch is `stream` itself (eager planning stays one stream, with
// no added calls).
class CaptureBranches {
 public:
  static constexpr int kBranches = 2;
  explicit CaptureBranches(cudaStream_t stream);
  ~CaptureBranches();
  CaptureBranches(const CaptureBranches&) = delete;
  CaptureBranches& operator=(const CaptureBranches&) = delete;
  cudaStream_t branch(int i) const { return forked_ ? side_[i] : stream_; }

 private:
  cudaStream_t stream_;
  cudaStream_t side_[kBranches] = {};
  bool forked_ = false;
};

}  // namespace fsa::detail::cuda
