#pragma once
// Kernel experiments compiled in behind macros, every one off by default: a build turns one on with
// nvcc -DNAME=VALUE (`scripts/ab_check.sh --head-flags`), a card measures it against the default
// build, and what wins becomes the code (its macro goes) while what loses is deleted
// (docs/perf.md). Their defaults live here, in one place, so that a build can say what it was
// compiled with (kExperiments, reported by fsa::cuda_kernel_experiments): a test or a benchmark
// over an experiment's build reads it there instead of being told.

// The softmax pin in the backward (pin_probabilities; the forward's at D = 64 is the code,
// Sm90ForwardTiles::kPinSoftmax), a bit mask: 2 the lean dK/dV passes, 4 the lean fused pass, 8
// the lean dQ pass.
#ifndef FSA_SM90_SOFTMAX_PIN
#define FSA_SM90_SOFTMAX_PIN 0
#endif
// 1: K/V by TMA in the D = 64 band walk over 128-key steps (Sm90ForwardTiles::kTmaKv; two 64 x 64
// boxes each per step, as FlashAttention-3 loads them).
#ifndef FSA_SM90_BAND64_TMA
#define FSA_SM90_BAND64_TMA 0
#endif
// 1: dS stored by stmatrix in the fused backward pass (four 8 x 8 tiles of 16-bit pairs a warp
// instruction: 4 a step where 16 st.shared.b32 store it).
#ifndef FSA_SM90_DS_STSM
#define FSA_SM90_DS_STSM 0
#endif

namespace fsa::detail::cuda {

struct ExperimentMacro {
  const char* name;
  int value;
};

// Every experiment above with the value this translation unit was compiled with (the build gives
// every CUDA source the same flags).
inline constexpr ExperimentMacro kExperiments[] = {
    {"FSA_SM90_SOFTMAX_PIN", FSA_SM90_SOFTMAX_PIN},
    {"FSA_SM90_BAND64_TMA", FSA_SM90_BAND64_TMA},
    {"FSA_SM90_DS_STSM", FSA_SM90_DS_STSM},
};

}  // namespace fsa::detail::cuda
