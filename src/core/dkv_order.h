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
// the tile, full iff the group has block_n slots and each keeps every row of the tile (the pass
// then drops nothing there). A slot's share of the two tests:
FSA_HOST_DEVICE inline bool dkv_slot_meets(int32_t first, int32_t last, int64_t r0, int64_t r1) {
  return first <= r1 && last >= r0;
}
FSA_HOST_DEVICE inline bool dkv_slot_covers(int32_t first, int32_t last, int64_t r0, int64_t r1) {
  return first <= r0 && last >= r1;
}

}  // namespace fsa::detail
