#pragma once
// Per-row top-k over compacted keys: the slots each query tile gathers (docs/numerics.md, "Per-row
// top-k over compacted keys"), shared by the CUDA planner (gather_lists_kernel, which the sm90
// forward and dQ passes read through BlockMapParams::gather_slots) and the CPU builder
// (cpu_gather_lists in core/compaction.h).

#include <cstdint>

#include "core/host_device.h"

namespace fsa::detail {

enum class GatherKind : int { kSkip = 0, kPartial = 1, kFull = 2 };

// Slot s, kept by the rows [first row that sees it, last] (RowEnd::key_last), for the query tile
// of rows [r0, r1], whose first row sees slots [0, seen_by_all) and whose last row [0, seen):
// listed iff some row of the tile keeps it, full iff every row does.
FSA_HOST_DEVICE inline GatherKind gather_kind(int64_t s, int64_t last, int64_t seen_by_all,
                                              int64_t seen, int64_t r0, int64_t r1) {
  if (s >= seen || last < r0) return GatherKind::kSkip;
  return s < seen_by_all && last >= r1 ? GatherKind::kFull : GatherKind::kPartial;
}

// Slots per list. Row r0 keeps at most topk slots (the listed ones it sees are exactly those whose
// interval holds r0), and at most r1 - r0 slots become visible inside the tile (one key per row at
// most), so a list holds at most topk + block_m - 1 slots: that, in whole block_n tiles, and never
// more than the slot axis (slot_tiles tiles).
FSA_HOST_DEVICE inline int64_t gather_stride(int64_t topk, int64_t block_m, int64_t block_n,
                                             int64_t slot_tiles) {
  const int64_t tiles = (topk + block_m - 1 + block_n - 1) / block_n;
  return (tiles < slot_tiles ? tiles : slot_tiles) * block_n;
}

}  // namespace fsa::detail
