// The public entry points: validate, plan (unless the caller brought a plan), run the backend of
// the tensors' device.

#include "core/problem.h"
#include "cpu/cpu_backend.h"
#include "cpu/thread_pool.h"
#include "fsa/attention.h"

namespace fsa {
namespace {

// Plans with the backend's default tiles when the caller did not bring a plan.
Plan plan_for(const TensorView& query, const TensorView& key,
              const std::optional<TensorView>& mask, bool is_causal) {
  return make_plan(query, key, mask, is_causal, PlanOptions{});
}

}  // namespace

void forward(const ForwardArgs& args) {
  const detail::ForwardProblem p = detail::validate_forward(args);
  Plan local;
  if (!args.plan) local = plan_for(args.query, args.key, args.attn_mask, p.is_causal);
  const Plan& plan = args.plan ? *args.plan : local;
  if (p.device.type == DeviceType::kCPU) {
    detail::cpu::forward(p, plan);
    return;
  }
  throw Error(ErrorKind::kUnsupported, "query", "no backend for device " + to_string(p.device));
}

void backward(const BackwardArgs& args) {
  const detail::BackwardProblem p = detail::validate_backward(args);
  Plan local;
  if (!args.plan) local = plan_for(args.query, args.key, args.attn_mask, p.is_causal);
  const Plan& plan = args.plan ? *args.plan : local;
  if (p.device.type == DeviceType::kCPU) {
    detail::cpu::backward(p, plan);
    return;
  }
  throw Error(ErrorKind::kUnsupported, "query", "no backend for device " + to_string(p.device));
}

void set_num_threads(int num_threads) { detail::set_cpu_threads(num_threads); }
int num_threads() { return detail::cpu_threads(); }

}  // namespace fsa
