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
// 2048; 3.6x at (1, 32768) window 1024, random biases). A group should hold slots whose first
// rows and whose last rows both nearly coincide (dkv_slot_key below).

#include <cstdint>

#include "core/host_device.h"

namespace fsa::detail {

// The groups: a compaction whose rows are intervals numbers its slots by first row (row i sees
// exactly the slots whose first row is <= i), so each list is cut into chunks of
// kDkvChunkGroups groups' worth of consecutive slots (close first rows), each chunk is ordered by
// descending last query tile, stably, and group n is the 64 slots from 64 n of that order. A host
// simulation (random biases, 128-row tiles) visits 1.22x / 1.35x the ideal tiles at the two shapes
// above, 64% / 50% of them full; bands of the last row on a logarithmic scale (quarter octaves,
// slot order within a band: the previous rule) visited 1.27x / 1.44x, 60% / 44% full; chunks of 8
// or 32 groups 1.24x / 1.37x and 1.28x / 1.40x. Within a list the chunks keep slot order, so the
// groups of the earliest keys (the ones that may live longest) start first and the short ones
// fill the grid's tail.
inline constexpr int kDkvChunkGroups = 16;

// The sort key of a slot, packed into 32 bits: list, chunk, then the last tile descending. When
// the three do not fit, the last tile is shifted right until they do (a coarser order; any order
// gives correct groups). A slot past its list's count keys as a last tile of 0 in its chunk,
// which is at or after every counted slot's chunk: the sort, stable, leaves it after every
// counted slot of its list.
struct DkvKeyBits {
  int list_bits, chunk_bits, tile_bits, tile_shift;
};
// For `lists` lists of `stride` slots (64 per group) over m_blocks query tiles.
FSA_HOST_DEVICE inline DkvKeyBits dkv_key_bits(int64_t lists, int64_t stride, int64_t m_blocks) {
  DkvKeyBits b;
  b.list_bits = bits_below(lists);
  b.chunk_bits = bits_below((stride + 64 * kDkvChunkGroups - 1) / (64 * kDkvChunkGroups));
  b.tile_bits = bits_below(m_blocks);
  b.tile_shift = 0;
  while (b.list_bits + b.chunk_bits + b.tile_bits > 32 && b.tile_bits > 0) {
    --b.tile_bits;
    ++b.tile_shift;
  }
  return b;
}
// Slot `slot` of list `list` (count slots), kept up to row `last`, block_m-row query tiles.
FSA_HOST_DEVICE inline uint32_t dkv_slot_key(const DkvKeyBits& b, int64_t list, int32_t slot,
                                             int32_t count, int32_t last, int32_t block_m) {
  const uint32_t tile_max = b.tile_bits > 0 ? (uint32_t(1) << b.tile_bits) - 1u : 0u;
  const uint32_t tile =
      slot < count && last >= 0 ? uint32_t(last / block_m) >> b.tile_shift : 0u;
  const uint64_t chunk = uint64_t(slot) / (64 * kDkvChunkGroups);
  return uint32_t((uint64_t(list) << (b.chunk_bits + b.tile_bits)) | (chunk << b.tile_bits) |
                  (tile_max - tile));
}

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
