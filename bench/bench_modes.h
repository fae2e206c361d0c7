#pragma once
// The modes of the one C++ bench program, fsa_bench (bench/fsa_bench.cc dispatches on the flags):
// one workload (workload_bench.h, cli_main), the CPU skipping benchmark (tile_bench.cc) and, in
// CUDA builds, the CUDA check and the workloads (cuda_bench.cc).

#include <string>
#include <vector>

#include "workload_bench.h"

namespace fsa_bench {

// `--tiles [...]`: the CPU backend with and without a whole-tile mask. Exit status 0, or 2 on a
// bad flag.
int tiles_main(const std::vector<std::string>& args);

// `--check`: the CUDA forward and backward against the CPU backend; 0 when every case passes.
int cuda_check();
// `--bench`: the three CUDA workloads through run_workload.
int cuda_bench(const Timing& timing, bool json);

}  // namespace fsa_bench
