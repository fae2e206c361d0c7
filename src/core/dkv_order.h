#pragma once
// Per-row top-k over compacted keys: the order in which the dK/dV pass groups the slots, and the
// query tiles each group visits (docs/numerics.md, "Per-row top-k over compacted keys"). Shared by
// the CUDA planner (dkv_lists_kernel: BlockMapParams::dkv_slots and its lists, read by the sm90
// dK/dV pass) and the CPU builder (cpu_dkv_lists in core/compaction.h, which CI checks against
// the mask).
//
// Slot s is kept by the rows [first, last] (KeyCompaction::key_first / key_last). In slot order
// (the keys' order) a 64-slot tile mixes keys that die early with keys that live to the end of the
// sequence, so the tile spans from its first key to the last row, most of its query tiles are
// partial, and the pass visits about 2.3x the tiles its kept entries fill ((1, 16384) window
// 2048; 3.6x at (1, 32768) window 1024, random biases). Grouping the slots by their last row on a
// logarithmic scale (quarter octaves of last + 1), in slot order within a band (so by first row),
// gives groups whose intervals nearly coincide: 1.30x / 1.43x, with 58% / 41% of the visited
// tiles full instead of 3% / 0% (host simulation of the same rule).

#include <cstdint>

#include "core/host_device.h"

namespace fsa::detail {

// The band of a slot that the rows up to `last` keep: 4 e + f for last + 1 = 2^e (1 + f / 4 + ...),
// quarter octaves, below 128 for any int32 row. Slots are grouped by descending band, stably (in
// slot order within a band): the groups of keys that live to the end come first, so the CTAs
// with the most query tiles start first and the short ones fill the tail of the grid.
FSA_HOST_DEVICE inline uint32_t dkv_band(int32_t last) {
  const uint32_t x = uint32_t(last < 0 ? 0 : last) + 1u;
  uint32_t e = 0;
  while ((x >> e) > 1u) ++e;  // floor(log2 x)
  const uint32_t f = e >= 2 ? (x >> (e - 2)) & 3u : 0u;
  return 4 * e + f;
}
inline constexpr int kDkvBandBits = 7;  // dkv_band() < 2^7

// A group of slots and the query tile of rows [r0, r1]: visited iff some slot's interval meets
// the tile (first <= r1 and last >= r0), full iff the group has block_n slots and each keeps every
// row of the tile (first <= r0 and last >= r1; the pass then drops nothing there). Per slot, as
// ranges of query tiles ([lo, hi], empty when hi < lo; block_m-row tiles over seqlen_q rows): it
// meets tiles [first / block_m, last / block_m] and covers those from ceil(first / block_m)
// through the last whose rows all lie at or before `last`. Both planners use the ranges (the CUDA
// one marks a group's tiles instead of testing each); CI checks the CPU one's lists against the
// mask.
struct DkvTileRange {
  int32_t lo, hi;
};
FSA_HOST_DEVICE inline DkvTileRange dkv_slot_met_tiles(int32_t first, int32_t last,
                                                       int32_t block_m) {
  if (first > last) return {1, 0};  // kept by no row
  return {first / block_m, last / block_m};
}
FSA_HOST_DEVICE inline DkvTileRange dkv_slot_covered_tiles(int32_t first, int32_t last,
                                                           int32_t block_m, int64_t seqlen_q) {
  if (first > last) return {1, 0};
  const int32_t m_blocks = int32_t((seqlen_q + block_m - 1) / block_m);
  const int32_t hi = last >= seqlen_q - 1 ? m_blocks - 1 : (last + 1) / block_m - 1;
  return {(first + block_m - 1) / block_m, hi};
}

}  // namespace fsa::detail
