#pragma once
// Per-row top-k planning replayed from CUDA graphs (plan_graph.cu); the entry point is
// make_device_topk_plan (cuda_backend.h).

namespace fsa::detail::cuda {

// Drops the captured graphs and their memory; instances leased to live plans go with those.
void release_plan_graphs();

}  // namespace fsa::detail::cuda
