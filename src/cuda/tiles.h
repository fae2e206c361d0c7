#pragma once
// Tile shapes of the CUDA kernels, in one place, with the reason for each choice. Shared by host
// code (planning needs block_m / block_n) and device code; no CUDA headers.

namespace fsa::detail::cuda {

// Kernel head-dim widths; other D are zero-padded up to the next width.
constexpr int kernel_head_dim(int head_dim) {
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
}

// Query rows per warp, in 16-row mma tiles. Two tiles let every K / V fragment read from shared
// memory feed two mma instead of one (measured on H100: 162 -> see docs/perf.md); at D = 256 the
// output accumulator of one tile is already 128 fp32 registers per thread, so one tile.
constexpr int forward_row_tiles(int head_dim) { return kernel_head_dim(head_dim) <= 128 ? 2 : 1; }
// 4 warps: with ~255 registers per thread two CTAs fit on an SM, so one CTA's loads overlap the
// other's math.
constexpr int kForwardWarps = 4;
constexpr int forward_block_m(int head_dim) {
  return kForwardWarps * 16 * forward_row_tiles(head_dim);
}
// 64 keys per tile: a score fragment of 32 registers per row tile, and the plan's 64-key
// granularity matches the CPU backend's default.
constexpr int forward_block_n(int /*head_dim*/) { return 64; }

template <int kHeadDim_>
struct ForwardTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRowTiles = forward_row_tiles(kHeadDim);
  static constexpr int kWarps = kForwardWarps;
  static constexpr int kBlockM = kWarps * 16 * kRowTiles;
  static constexpr int kBlockN = forward_block_n(kHeadDim);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSmemQ = kBlockM * kHeadDim;   // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim;  // elements per stage of K (or V)
  // Q, two stages of K and V, then a partial tile's keys with non-finite V values and the marks
  // of the rows that keep them (2 bits per output element; mark_nonfinite_keys).
  static constexpr int kNonfiniteOffset = (kSmemQ + 4 * kSmemKV) * 2;
  static constexpr int kPoisonOffset = kNonfiniteOffset + 8;
  static constexpr int kSmemBytes = kPoisonOffset + kBlockM * kHeadDim / 4;
  static_assert(kBlockN <= 64, "one bit per key of a tile");
};

}  // namespace fsa::detail::cuda
