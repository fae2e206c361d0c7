// The library alone, one workload per call, so that a sweep can drive it: CUDA events (or
// std::chrono on the CPU backend), warmup, median / min / p90, cold L2, no allocation in the timed
// loop; effective and dense-equivalent TFLOP/s, density, plan time; --json for machines. Built
// with or without CUDA (then --device cpu is the default).
//
//   ./build/fsa_bench_cli --shape 2,16384,16384,16,16,128 --causal --mode fwd,bwd,fwdbwd
//   ./build/fsa_bench_cli --shape 1,16384,16384,32,8,128 --causal --density 0.1 --json
//   ./build/fsa_bench_cli --shape 1,1,524288,32,8,128 --causal --key-mask-every 8
//   ./build/fsa_bench_cli --device cpu --shape 1,256,256,2,1,64 --causal --reps 3
//
// Every flag: --help (or bench/workload_bench.cc, usage()).

#include <string>
#include <vector>

#include "workload_bench.h"

int main(int argc, char** argv) {
  fsa_bench::Cli defaults;
#ifndef FSA_WITH_CUDA
  defaults.timing.device = fsa::DeviceType::kCPU;
#endif
  return fsa_bench::cli_main("fsa_bench_cli", std::vector<std::string>(argv + 1, argv + argc),
                             defaults);
}
