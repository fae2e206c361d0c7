// The library's C++ bench program, every mode in one binary (built with or without CUDA):
//
//   fsa_bench --shape B,Sq,Sk,H,Hk,D [...]   one workload on one device (--help lists the flags):
//                                           CUDA events (or std::chrono on the CPU backend),
//                                           warmup, median / min / p90, cold L2, --json
//   fsa_bench --tiles [--seqlen N ...]       the CPU backend's block-map skipping (issue #2)
//   fsa_bench --check                        CUDA forward and backward against the CPU backend
//   fsa_bench --bench [--reps N] [--json]    the three CUDA workloads
//
//   ./build/fsa_bench --shape 2,16384,16384,16,16,128 --causal --mode fwd,bwd,fwdbwd
//   ./build/fsa_bench --shape 1,16384,16384,32,8,128 --causal --density 0.1 --json
//   ./build/fsa_bench --shape 1,1,524288,32,8,128 --causal --key-mask-every 8
//   ./build/fsa_bench --device cpu --shape 1,256,256,2,1,64 --causal --reps 3
//
// --check and --bench need the CUDA backend; without it they exit with status 2 and say so. The
// workload mode runs on CUDA by default where the build has it, else on the CPU.

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "bench_modes.h"

namespace {

constexpr const char* kModes =
    "usage: fsa_bench --shape B,Sq,Sk,H,Hk,D [...]   one workload (--help lists its flags)\n"
    "       fsa_bench --tiles [--seqlen N] [--heads N] [--kv-heads N] [--dim N] [--batch N]\n"
    "                         [--tile-density P] [--reps N] [--dtype bf16|fp16|fp32] "
    "[--threads N]\n"
    "       fsa_bench --check                        (CUDA builds)\n"
    "       fsa_bench --bench [--reps N] [--warmup N] [--l2 rotate|flush|warm] [--json] "
    "(CUDA builds)\n";

int check_and_bench(bool do_check, bool do_bench, const std::vector<std::string>& rest) {
#ifdef FSA_WITH_CUDA
  fsa_bench::Cli cli;  // --device cuda
  try {
    fsa_bench::parse_cli(rest, cli);
    if (cli.has_shape) throw fsa_bench::UsageError("--shape: not with --check / --bench");
  } catch (const fsa_bench::UsageError& e) {
    std::fprintf(stderr, "fsa_bench: %s\n%s", e.what(), kModes);
    return 2;
  }
  int rc = 0;
  if (do_check) rc |= fsa_bench::cuda_check();
  if (do_bench) {
    try {
      rc |= fsa_bench::cuda_bench(cli.timing, cli.json);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fsa_bench --bench: error: %s\n", e.what());
      rc = 1;
    }
  }
  return rc;
#else
  (void)do_check, (void)do_bench, (void)rest;
  std::fprintf(stderr, "fsa_bench: --check and --bench need the CUDA backend, which this build "
                       "does not have (the workload mode runs on the CPU: --device cpu)\n");
  return 2;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  bool tiles = false, do_check = false, do_bench = false;
  std::vector<std::string> rest;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tiles") tiles = true;
    else if (a == "--check") do_check = true;
    else if (a == "--bench") do_bench = true;
    else rest.push_back(a);
  }
  if (tiles && (do_check || do_bench)) {
    std::fprintf(stderr, "fsa_bench: --tiles is a mode of its own, not with --check / --bench\n%s",
                 kModes);
    return 2;
  }
  if (tiles) return fsa_bench::tiles_main(rest);
  if (do_check || do_bench) return check_and_bench(do_check, do_bench, rest);
  if (rest.empty()) {
    std::fprintf(stderr, "%s", kModes);
    return 2;
  }
  fsa_bench::Cli defaults;
#ifndef FSA_WITH_CUDA
  defaults.timing.device = fsa::DeviceType::kCPU;
#endif
  return fsa_bench::cli_main("fsa_bench", rest, defaults);
}
