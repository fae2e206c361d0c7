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

// K / V stages of the sm80 forward: two, with two CTAs per SM, so that one CTA's loads overlap the
// other's math.
constexpr int kForwardStages = 2;

// Decode with split keys (forward_split_keys): GQA-packed rows that fit one 16-row mma tile, every
// warp on those rows and a quarter of each 64-key tile, so a tile's math is a quarter of one
// warp's and the CTA can keep more tiles loading. With the rows split over the warps instead, all
// of a decode's real rows sit in the first warp, whose math per tile is then serial with the
// others idle: more stages made that layout slower (four stages and one CTA per SM 1.9x, three
// and two CTAs 1.1-1.5x; docs/perf.md, "Decode and paged K/V on H200"), while split keys over
// three stages, two CTAs per SM, run (1, 512K keys) 1.13x faster than two stages. Stages:
// kDecodeStages; FSA_CUDA_DECODE=deep runs kDeepDecodeStages (one CTA per SM, measured slower),
// =off the row-split layout (A/B measurements).
constexpr int kDecodeStages = 3;
constexpr int kDeepDecodeStages = 6;
constexpr int kSplitKeyRows = 16;
constexpr bool forward_split_keys(bool pack_gqa, int flat_rows, int head_dim) {
  return pack_gqa && kernel_head_dim(head_dim) <= 128 && flat_rows <= kSplitKeyRows;
}

// The sm80 forward's shared memory (ForwardTiles' layout) and CTAs per SM: two when two fit the
// 228 KiB of an SM (1 KiB of it reserved per CTA; the kernel's launch bounds ask for no more),
// else one. Host code sizes split-KV by the latter.
constexpr int forward_smem_bytes(int head_dim, int stages, bool split_keys = false) {
  const int d = kernel_head_dim(head_dim), rows = split_keys ? kSplitKeyRows : forward_block_m(d);
  return (rows * d + 2 * stages * forward_block_n(d) * d) * 2 + 8 + rows * d / 4 +
         stages * forward_block_n(d) * 16;
}
constexpr int forward_ctas_per_sm(int head_dim, int stages, bool split_keys = false) {
  return 2 * (forward_smem_bytes(head_dim, stages, split_keys) + 1024) <= 228 * 1024 ? 2 : 1;
}

// kSplitKeys: the decode layout above (kBlockM = 16 rows shared by the warps, kWarpKeys keys of
// each tile per warp); else each warp owns 16 * kRowTiles rows over the whole tile.
template <int kHeadDim_, int kStages_ = kForwardStages, bool kSplitKeys_ = false>
struct ForwardTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStages = kStages_;
  static constexpr bool kSplitKeys = kSplitKeys_;
  static constexpr int kWarps = kForwardWarps;
  static constexpr int kRowTiles = kSplitKeys ? 1 : forward_row_tiles(kHeadDim);
  static constexpr int kBlockM = kSplitKeys ? kSplitKeyRows : kWarps * 16 * kRowTiles;
  static constexpr int kBlockN = forward_block_n(kHeadDim);
  static constexpr int kWarpKeys = kSplitKeys ? kBlockN / kWarps : kBlockN;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSmemQ = kBlockM * kHeadDim;   // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim;  // elements per stage of K (or V)
  // Q, kStages stages of K and V, then a partial tile's keys with non-finite V values, the marks
  // of the rows that keep them (2 bits per output element; mark_nonfinite_keys), and a paged
  // cache's K and V offsets of each key of kStages tiles (a ring, forward_kernel). Split keys
  // merge the warps' states through the K stages once the loop is done.
  static constexpr int kNonfiniteOffset = (kSmemQ + 2 * kStages * kSmemKV) * 2;
  static constexpr int kPoisonOffset = kNonfiniteOffset + 8;
  static constexpr int kPagesOffset = kPoisonOffset + kBlockM * kHeadDim / 4;
  static constexpr int kSmemBytes = kPagesOffset + kStages * kBlockN * 16;
  static constexpr int kCtasPerSm = forward_ctas_per_sm(kHeadDim, kStages, kSplitKeys);
  static constexpr int kMergeFloats = kHeadDim / 8 * 4 + 4;  // per lane: O, then max and sum
  static_assert(kSmemBytes == forward_smem_bytes(kHeadDim, kStages, kSplitKeys), "one layout");
  static_assert(kPagesOffset % 8 == 0, "64-bit offsets");
  static_assert(kBlockN <= 64, "one bit per key of a tile");
  static_assert(kStages >= 2, "the loop prefetches at least one tile ahead");
  static_assert(!kSplitKeys || kWarps * 32 * kMergeFloats * 4 <= kStages * kSmemKV * 2,
                "the warps' states fit the K stages");
};

}  // namespace fsa::detail::cuda
