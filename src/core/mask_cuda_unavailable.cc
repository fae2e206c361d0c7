// Definitions of the mask utilities' CUDA entry points for builds without CUDA: every one rejects
// the call with a clear message instead of failing to link.
#ifndef FSA_WITH_CUDA

#include "cuda/mask_backend.h"

namespace fsa::detail::cuda {
namespace {
[[noreturn]] void unavailable(const char* argument) {
  throw Error(
      ErrorKind::kUnsupported, argument,
      "got a CUDA tensor, but this build has no CUDA backend (rebuild where nvcc is found)");
}
}  // namespace

void dynamic_mask(const DynamicMaskArgs&, const DynamicMaskLayout&) {
  unavailable("attention_bias");
}
void block_smooth(const TensorView&, int64_t, void*) { unavailable("attention_mask"); }
void expand_mask_2d(const TensorView&, int64_t, const TensorView&, void*) {
  unavailable("attention_mask");
}
void select_blocks(const BlockSelectArgs&) { unavailable("attention_bias"); }

}  // namespace fsa::detail::cuda

#endif  // FSA_WITH_CUDA
