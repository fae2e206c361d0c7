// The public entry points: validate, plan (unless the caller brought a plan), run the backend of
// the tensors' device.

#include <optional>

#include "core/compaction.h"
#include "core/problem.h"
#include "core/thresholds.h"
#include "cpu/cpu_backend.h"
#include "cpu/thread_pool.h"
#include "cuda/cuda_backend.h"
#include "fsa/attention.h"

namespace fsa {
namespace {

// Plans with the backend's default tiles when the caller did not bring a plan.
Plan plan_for(const TensorView& query, const TensorView& key,
              const std::optional<TensorView>& mask, bool is_causal, void* stream) {
  PlanOptions options;
  options.stream = stream;
  return make_plan(query, key, mask, is_causal, options);
}

// A plan with per-row top-k thresholds hands them to the call, whose bias must be the one they
// were computed from.
void attach_thresholds(const Plan& plan, detail::Problem& p) {
  const detail::RowThresholds* t = plan.thresholds();
  if (!t) return;
  if (!p.bias || p.bias->data != t->bias) {
    throw Error(ErrorKind::kValue, "attn_bias",
                "the plan's per-row top-k was computed from another bias: pass the plan's "
                "PlanOptions::topk_bias as attn_bias");
  }
  p.row_topk = t->view;
}

// Whether the plan maps the full key axis: a compacted plan may not (make_plan: packed sequences;
// on CUDA also top-k over a bias of query length 1, interval masks, compacted_calls_only).
bool holds_key_axis_map(const Plan& plan, const detail::Problem& p) {
  return p.device.type == DeviceType::kCUDA ? plan.device_map() != nullptr
                                            : !plan.map().full.offsets.empty();
}

// A call that cannot run compacted (a bias or dbias with a query dim) needs that map.
void require_key_axis_map(const Plan& plan, const detail::Problem& p) {
  if (holds_key_axis_map(plan, p)) return;
  throw Error(ErrorKind::kValue, "attn_bias",
              "the plan compacted its keys for calls whose bias has no query dim (packed "
              "sequences, top-k over a bias of query length 1, interval masks, "
              "compacted_calls_only) and holds no map of the full key axis; pass a bias and dbias "
              "of query length 1, not ones with a query dim of " + std::to_string(p.seqlen_q));
}

// A call with cache_seqlens runs over the full key axis (the kernels bound each sequence's keys
// there), which a compacted plan may not map.
void require_length_map(const Plan& plan, const detail::ForwardProblem& p) {
  if (plan.thresholds()) {
    throw Error(ErrorKind::kUnsupported, "cache_seqlens",
                "not with a per-row top-k plan (PlanOptions::topk): mask the lengths in the top-k "
                "bias instead");
  }
  if (holds_key_axis_map(plan, p)) return;
  throw Error(ErrorKind::kValue, "plan",
              "holds compacted keys and no map of the full key axis, which a call with "
              "cache_seqlens runs over: build it with PlanOptions::compact_keys = kNever");
}

}  // namespace

void forward(const ForwardArgs& args) {
  detail::ForwardProblem p = detail::validate_forward(args);
  // CUDA tensors: this build's kernels for them, then their device current for the call
  // (planning, scratch and launches), whatever the caller's is.
  std::optional<detail::cuda::CurrentDevice> device;
  if (p.device.type == DeviceType::kCUDA) {
    detail::cuda::require_built(p);
    device.emplace(p.device.index);
  }
  Plan local;
  if (!args.plan) {
    const TensorView key =
        args.paged_kv ? paged_key_axis(args.key, args.query, *args.paged_kv) : args.key;
    local = plan_for(args.query, key, args.attn_mask, p.is_causal, args.stream);
  }
  const Plan& plan = args.plan ? *args.plan : local;
  attach_thresholds(plan, p);
  if (p.cache_seqlens) require_length_map(plan, p);
  // Compacted keys know nothing of the cache's lengths: such calls run the block map.
  const bool compacted = !p.cache_seqlens && detail::runs_compacted(plan, p);
  if (p.device.type == DeviceType::kCUDA) {
    if (compacted) {
      detail::cuda::compacted_forward(p, *plan.compaction(), args.stream);
    } else {
      require_key_axis_map(plan, p);
      detail::cuda::forward(p, plan, args.stream);
    }
    return;
  }
  if (compacted) {
    detail::cpu_compacted_forward(p, plan);
  } else {
    require_key_axis_map(plan, p);
    detail::cpu::forward(p, plan);
  }
}

void backward(const BackwardArgs& args) {
  detail::BackwardProblem p = detail::validate_backward(args);
  // CUDA tensors: this build's kernels for them, then their device current for the call
  // (planning, scratch and launches), whatever the caller's is.
  std::optional<detail::cuda::CurrentDevice> device;
  if (p.device.type == DeviceType::kCUDA) {
    detail::cuda::require_built(p);
    device.emplace(p.device.index);
  }
  Plan local;
  if (!args.plan) local = plan_for(args.query, args.key, args.attn_mask, p.is_causal, args.stream);
  const Plan& plan = args.plan ? *args.plan : local;
  attach_thresholds(plan, p);
  const bool compacted = detail::runs_compacted(plan, p);
  if (p.device.type == DeviceType::kCUDA) {
    if (compacted) {
      detail::cuda::compacted_backward(p, *plan.compaction(), args.stream);
    } else {
      require_key_axis_map(plan, p);
      detail::cuda::backward(p, plan, args.stream);
    }
    return;
  }
  if (compacted) {
    detail::cpu_compacted_backward(p, plan);
  } else {
    require_key_axis_map(plan, p);
    detail::cpu::backward(p, plan);
  }
}

void set_num_threads(int num_threads) { detail::set_cpu_threads(num_threads); }
int num_threads() { return detail::cpu_threads(); }

void release_cuda_memory() { detail::cuda::release_scratch(); }
int64_t cuda_memory_reserved() { return detail::cuda::scratch_reserved(); }
CudaPlanGraphs cuda_plan_graphs() { return detail::cuda::plan_graphs(); }
std::vector<KernelExperiment> cuda_kernel_experiments() {
  return detail::cuda::kernel_experiments();
}

}  // namespace fsa
