#pragma once
// Tile shapes of the CUDA kernels, in one place, with the reason for each choice. Shared by host
// code (planning needs block_m / block_n) and device code; no CUDA headers.

namespace fsa::detail::cuda {

// Kernel head-dim widths; other D are zero-padded up to the next width.
constexpr int kernel_head_dim(int head_dim) {
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
}

template <int kHeadDim_>
struct ForwardTiles {
  static constexpr int kHeadDim = kHeadDim_;
  // 16 query rows per warp (one mma M tile). 8 warps (128 rows) amortize each K/V tile over many
  // rows; at D = 256 the output accumulator alone is 128 fp32 registers per thread, so the CTA
  // keeps 4 warps (64 rows) to stay within the register file without spills.
  static constexpr int kBlockM = kHeadDim <= 128 ? 128 : 64;
  // 64 keys per tile: the score fragment is 32 registers per thread, and the plan's 64-key
  // granularity matches the CPU backend's default.
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSmemQ = kBlockM * kHeadDim;   // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim;  // elements per stage of K (or V)
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * 2;
};

constexpr int forward_block_m(int head_dim) { return kernel_head_dim(head_dim) <= 128 ? 128 : 64; }
constexpr int forward_block_n(int /*head_dim*/) { return 64; }

}  // namespace fsa::detail::cuda
