#pragma once
// Device planning in three passes:
//   classify   one warp per tile: counts its kept entries and marks it skipped / partial / full.
//              Tiles outside the causal band or the block selection are never read; a tile that
//              every row sees whole under a query-invariant mask (..., 1, Sk) reads one key row;
//              over compacted keys the rows' bounds (PlanParams::row_end) decide alone, with each
//              slot's last row under per-row top-k.
//   compact    one warp per row of the map: full and partial key-block lists by warp ballots.
//   transpose  one warp per column: the query-block lists the backward pass walks.
// Per-row top-k over compacted keys adds gather_lists_kernel (the slots each query tile keeps), and
// dkv_key_kernel, a stable radix sort and dkv_lists_kernel (the dK/dV pass's groups).

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/dkv_order.h"
#include "core/gather_lists.h"
#include "cuda/params.h"

namespace fsa::detail::cuda {

constexpr int kPlanWarps = 4;  // warps per CTA in every planning kernel

__device__ inline int plan_visible_end(const PlanParams& p, int i) {
  if (!p.is_causal) return p.seqlen_k;
  return min(max(i + p.seqlen_k - p.seqlen_q + 1, 0), p.seqlen_k);
}

__device__ inline long long warp_sum(long long v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Tile (m, n) of map head mh, batch mb, by one warp: writes its class and returns its kept
// entries (on every lane).
__device__ inline long long classify_tile(const PlanParams& p, int m, int n, int mh, int mb,
                                          int lane) {
  const BlockMapParams& map = p.map;
  const int hq = mh * map.head_group;  // a query head of this map head
  const int r0 = m * map.block_m, rows = min(map.block_m, p.seqlen_q - r0);
  const int c0 = n * map.block_n, cols = min(map.block_n, p.seqlen_k - c0);
  const int first_end = plan_visible_end(p, r0), last_end = plan_visible_end(p, r0 + rows - 1);

  bool selected = c0 < last_end;
  if (selected && p.selection) {
    selected = p.selection[mb * p.sel_stride[0] + (hq / p.sel_head_group) * p.sel_stride[1] +
                           int64_t(m / p.sel_ratio_m) * p.sel_stride[2] +
                           int64_t(n / p.sel_ratio_n) * p.sel_stride[3]] != 0;
  }
  long long kept = 0;
  if (p.row_end.data != nullptr) {
    // Compacted keys: row i sees slots [0, row_end[i]), non-decreasing in i (causality only ever
    // uncovers keys), so the first and last rows bound the tile and only a straddling tile needs
    // the per-row sum.
    const int32_t* end = p.row_end.data + p.row_end.offset(mb, hq, r0);
    if (p.row_end.key_last != nullptr) {
      // Per-row top-k: slot s is kept by rows [key_first, key_last] (RowEnd; both builders of
      // these plans set key_first, the first row that sees the slot, which a binary search over
      // the rows' bounds found here before: seven dependent loads per slot).
      const int32_t* first = p.row_end.key_first_row(mb, hq) + c0;
      const int32_t* last = p.row_end.key_last_row(mb, hq) + c0;
      long long local = 0;
      if (c0 < end[rows - 1]) {
        for (int c = lane; c < cols; c += 32) {
          const int lo = min(max(first[c] - r0, 0), rows);
          local += max(min(last[c] - r0 + 1, rows) - lo, 0);
        }
      }
      kept = warp_sum(local);
    } else if (c0 + cols <= end[0]) {
      kept = (long long)rows * cols;
    } else if (c0 < end[rows - 1]) {
      long long local = 0;
      for (int r = lane; r < rows; r += 32) local += min(max(end[r] - c0, 0), cols);
      kept = warp_sum(local);
    }
  } else if (selected) {
    const uint8_t* mask =
        p.mask ? p.mask + mb * p.mask_stride[0] + (hq / p.mask_head_group) * p.mask_stride[1]
               : nullptr;
    long long local = 0;
    if ((!mask || p.mask_stride[2] == 0) && c0 + cols <= first_end) {
      for (int c = lane; c < cols; c += 32) {
        local += mask ? (mask[int64_t(c0 + c) * p.mask_stride[3]] != 0) : 1;
      }
      kept = warp_sum(local) * rows;
    } else {
      for (int idx = lane; idx < rows * cols; idx += 32) {
        const int i = r0 + idx / cols, j = c0 + idx % cols;
        if (j >= plan_visible_end(p, i)) continue;
        local += mask ? (mask[int64_t(i) * p.mask_stride[2] + int64_t(j) * p.mask_stride[3]] != 0)
                      : 1;
      }
      kept = warp_sum(local);
    }
  }
  if (lane == 0) {
    const int64_t row = (int64_t(mb) * map.map_heads + mh) * map.m_blocks + m;
    const bool full = kept == (long long)rows * cols && !p.all_partial;
    p.tile_class[row * map.n_blocks + n] = kept == 0 ? 0 : (full ? 2 : 1);
  }
  return kept;
}

// Tiles per warp of classify_kernel: a warp walks its tiles one after the other (each a chain of
// dependent loads), and the kept entries are summed per CTA and added to the one global counter
// once. Many tiles per warp keep the atomics few on big maps (one per tile serialized 0.15 ms of
// planning for (1, 16384, 32, 8, 128) with a key mask, H200); one per warp keeps small maps (the
// compacted keys of a top-k: 4K tiles) from being a latency chain. About 32K warps in all.
inline int classify_tiles_per_warp(int64_t tiles) {
  constexpr int64_t kWarps = 32 * 1024;
  return int(std::min<int64_t>(16, std::max<int64_t>(1, (tiles + kWarps - 1) / kWarps)));
}

// grid (ceil(n_blocks / (kPlanWarps * p.classify_tiles_per_warp)), m_blocks, map_heads *
// map_batch), kPlanWarps warps; warp w of CTA x classifies tiles n = (x * tiles_per_warp + k) *
// kPlanWarps + w.
__global__ void __launch_bounds__(32 * kPlanWarps) classify_kernel(const __grid_constant__ PlanParams p) {
  __shared__ unsigned long long warp_kept[kPlanWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m = blockIdx.y;
  const int mh = blockIdx.z % p.map.map_heads, mb = blockIdx.z / p.map.map_heads;
  unsigned long long kept = 0;
  for (int k = 0; k < p.classify_tiles_per_warp; ++k) {
    const int n = (int(blockIdx.x) * p.classify_tiles_per_warp + k) * kPlanWarps + warp;
    if (n >= p.map.n_blocks) break;
    kept += (unsigned long long)classify_tile(p, m, n, mh, mb, lane);
  }
  if (lane == 0) warp_kept[warp] = kept;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < kPlanWarps; ++w) total += warp_kept[w];
    if (total) atomicAdd(p.counters, total);
  }
}

// Compacts `count` tile classes read with `stride` into the full (class 2) and partial (class 1)
// lists; lane 0 returns the two lengths. One warp, 32 entries per ballot.
__device__ inline void compact_lists(const uint8_t* cls, int64_t stride, int count, int32_t* full,
                                     int32_t* partial, int& n_full, int& n_partial) {
  const int lane = threadIdx.x % 32;
  const unsigned lower = (1u << lane) - 1u;
  n_full = n_partial = 0;
  for (int base = 0; base < count; base += 32) {
    const int e = base + lane;
    const uint8_t c = e < count ? cls[e * stride] : 0;
    const unsigned is_full = __ballot_sync(0xffffffffu, c == 2);
    const unsigned is_partial = __ballot_sync(0xffffffffu, c == 1);
    if (c == 2) full[n_full + __popc(is_full & lower)] = e;
    if (c == 1) partial[n_partial + __popc(is_partial & lower)] = e;
    n_full += __popc(is_full);
    n_partial += __popc(is_partial);
  }
}

// grid (ceil(rows / kPlanWarps)), kPlanWarps warps: the key-block lists of each map row.
__global__ void __launch_bounds__(32 * kPlanWarps) compact_kernel(const __grid_constant__ PlanParams p) {
  const BlockMapParams& map = p.map;
  const int64_t rows = int64_t(map.map_batch) * map.map_heads * map.m_blocks;
  const int64_t row = int64_t(blockIdx.x) * kPlanWarps + threadIdx.x / 32;
  if (row >= rows) return;
  int n_full, n_partial;
  compact_lists(p.tile_class + row * map.n_blocks, 1, map.n_blocks,
                const_cast<int32_t*>(map.full_index) + row * map.n_blocks,
                const_cast<int32_t*>(map.partial_index) + row * map.n_blocks, n_full, n_partial);
  if (threadIdx.x % 32 == 0) {
    const_cast<int32_t*>(map.full_count)[row] = n_full;
    const_cast<int32_t*>(map.partial_count)[row] = n_partial;
    if (n_full + n_partial) atomicAdd(p.counters + 1, (unsigned long long)(n_full + n_partial));
  }
}

// grid (ceil(cols / kPlanWarps)), kPlanWarps warps: the query-block lists of each key block.
__global__ void __launch_bounds__(32 * kPlanWarps) transpose_kernel(const __grid_constant__ PlanParams p) {
  const BlockMapParams& map = p.map;
  const int64_t cols = int64_t(map.map_batch) * map.map_heads * map.n_blocks;
  const int64_t col = int64_t(blockIdx.x) * kPlanWarps + threadIdx.x / 32;
  if (col >= cols) return;
  const int64_t outer = col / map.n_blocks;
  const int n = int(col % map.n_blocks);
  int n_full, n_partial;
  compact_lists(p.tile_class + outer * map.m_blocks * map.n_blocks + n, map.n_blocks, map.m_blocks,
                const_cast<int32_t*>(map.full_index_t) + col * map.m_blocks,
                const_cast<int32_t*>(map.partial_index_t) + col * map.m_blocks, n_full, n_partial);
  if (threadIdx.x % 32 == 0) {
    const_cast<int32_t*>(map.full_count_t)[col] = n_full;
    const_cast<int32_t*>(map.partial_count_t)[col] = n_partial;
  }
}

// Per-row top-k over compacted keys: the gathered slot lists of BlockMapParams, one CTA of
// kPlanWarps warps per map row, grid (m_blocks, map_heads * map_batch). Slot s is listed for the
// query tile's rows [r0, r1] by gather_kind (core/gather_lists.h): the slots every row keeps
// first, in slot order, then the rest; at most gather_stride of them.
__global__ void __launch_bounds__(32 * kPlanWarps)
    gather_lists_kernel(const __grid_constant__ PlanParams p) {
  constexpr int kThreads = 32 * kPlanWarps;
  const BlockMapParams& map = p.map;
  const int m = blockIdx.x;
  const int mh = int(blockIdx.y) % map.map_heads, mb = int(blockIdx.y) / map.map_heads;
  const int hq = mh * map.head_group;  // a query head of this map head
  const int64_t row = (int64_t(mb) * map.map_heads + mh) * map.m_blocks + m;
  const int r0 = m * map.block_m, r1 = min(r0 + map.block_m, p.seqlen_q) - 1;
  const int32_t* end = p.row_end.data + p.row_end.offset(mb, hq, 0);
  const int seen_by_all = end[r0], seen = end[r1];
  const int32_t* last = p.row_end.key_last_row(mb, hq);
  int32_t* out = const_cast<int32_t*>(map.gather_slots) + row * map.gather_stride;

  __shared__ int warp_taken[kPlanWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int listed = 0, kept_by_all = 0;
#pragma unroll  // rolled, ptxas kept the pass index on the stack (8 bytes of spills)
  for (int pass = 0; pass < 2; ++pass) {  // 0: slots every row keeps; 1: the others
    for (int base = 0; base < seen; base += kThreads) {
      const int s = base + int(threadIdx.x);
      bool take = false;
      if (s < seen) {
        const GatherKind kind = gather_kind(s, last[s], seen_by_all, seen, r0, r1);
        take = kind == (pass == 0 ? GatherKind::kFull : GatherKind::kPartial);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (lane == 0) warp_taken[warp] = __popc(ballot);
      __syncthreads();
      int before = listed, taken = 0;
      for (int w = 0; w < kPlanWarps; ++w) {
        before += w < warp ? warp_taken[w] : 0;
        taken += warp_taken[w];
      }
      const int at = before + __popc(ballot & ((1u << lane) - 1u));
      if (take && at < map.gather_stride) out[at] = s;  // always below it (see above)
      listed += taken;
      __syncthreads();  // warp_taken is rewritten next round
    }
    if (pass == 0) kept_by_all = listed;
  }
  listed = min(listed, map.gather_stride);
  const int tiles = (listed + map.block_n - 1) / map.block_n;
  for (int at = listed + int(threadIdx.x); at < tiles * map.block_n; at += kThreads) out[at] = -1;
  if (threadIdx.x == 0) {
    const int full = min(kept_by_all, listed) / map.block_n;
    const_cast<int32_t*>(map.gather_full)[row] = full;
    const_cast<int32_t*>(map.gather_tiles)[row] = tiles;
    if (tiles) atomicAdd(p.counters + 2, (unsigned long long)tiles);
    if (full) atomicAdd(p.counters + 3, (unsigned long long)full);
  }
}

// Per-row top-k over compacted keys, the dK/dV pass's groups (core/dkv_order.h), step 1: per list
// (map batch, map head), its slots' sort keys (dkv_slot_key: list, chunk of slots, descending last
// query tile), for the stable radix sort that follows (cuda/list_sort.h). The last row sees every
// slot (causality only uncovers keys), so its bound is the list's count. grid (ceil(stride /
// 256), lists), 256 threads.
__global__ void __launch_bounds__(256) dkv_key_kernel(const __grid_constant__ PlanParams p,
                                                      DkvKeyBits bits, int stride, uint32_t* key,
                                                      int32_t* slot) {
  const BlockMapParams& map = p.map;
  const int list = blockIdx.y, mh = list % map.map_heads, mb = list / map.map_heads;
  const int hq = mh * map.head_group;  // a query head of this map head
  const int count = p.row_end.at(mb, hq, p.seqlen_q - 1);
  const int s = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (s >= stride) return;
  const int64_t at = int64_t(list) * stride + s;
  const int32_t last = s < count ? p.row_end.key_last_row(mb, hq)[s] : -1;
  key[at] = dkv_slot_key(bits, list, s, count, last, map.block_m);
  slot[at] = s;
}

// Step 2: one warp per group n of list (map batch, map head): its block_n (= 64, two per lane)
// sorted slots into BlockMapParams::dkv_slots (-1 past the count), and the query tiles it visits
// into the dkv_* transposed lists, ascending: visited where some slot's rows meet the tile, full
// where the group is whole and every slot keeps every row of it. The warp marks each slot's met
// tiles in a shared bitmap and intersects their covered ranges (core/dkv_order.h), then compacts
// the bitmap 32 tiles per step; testing tile by tile took a step per tile, 0.03 ms for the groups
// that live through all 256 query tiles of (1, 32768, 2, 1, 64) window 1024 (H200). grid
// (ceil(n_blocks / kPlanWarps), lists), kPlanWarps warps, dkv_lists_smem(m_blocks) bytes.
inline size_t dkv_lists_smem(int m_blocks) {
  return size_t(kPlanWarps) * ((m_blocks + 31) / 32) * sizeof(uint32_t);
}
__global__ void __launch_bounds__(32 * kPlanWarps) dkv_lists_kernel(
    const __grid_constant__ PlanParams p, const int32_t* sorted) {
  constexpr int kGroup = 64;
  extern __shared__ uint32_t met_bits[];  // per warp: bit m = some slot of the group meets tile m
  const BlockMapParams& map = p.map;
  const int list = blockIdx.y, mh = list % map.map_heads, mb = list / map.map_heads;
  const int hq = mh * map.head_group;
  const int n = int(blockIdx.x) * kPlanWarps + int(threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (n >= map.n_blocks) return;  // no block-wide barrier below
  uint32_t* met = met_bits + (threadIdx.x / 32) * ((map.m_blocks + 31) / 32);
  const int64_t stride = int64_t(map.n_blocks) * kGroup, col = int64_t(list) * map.n_blocks + n;
  const int count = p.row_end.at(mb, hq, p.seqlen_q - 1);
  const int32_t* first_of = p.row_end.key_first_row(mb, hq);
  const int32_t* last_of = p.row_end.key_last_row(mb, hq);
  DkvTileRange met_by[2];
  int lo = INT_MAX, hi = -1;                   // the tiles some slot meets
  int cover_lo = 0, cover_hi = INT_MAX;        // the tiles every slot covers
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int x = n * kGroup + lane + 32 * r;
    const int slot = x < count ? sorted[list * stride + x] : -1;
    const_cast<int32_t*>(map.dkv_slots)[list * stride + x] = slot;
    const int first = slot >= 0 ? first_of[slot] : INT_MAX, last = slot >= 0 ? last_of[slot] : -1;
    met_by[r] = dkv_slot_met_tiles(first, last, map.block_m);
    const DkvTileRange covered = dkv_slot_covered_tiles(first, last, map.block_m, p.seqlen_q);
    if (met_by[r].lo <= met_by[r].hi) {
      lo = min(lo, met_by[r].lo);
      hi = max(hi, met_by[r].hi);
    }
    cover_lo = max(cover_lo, covered.lo);
    cover_hi = min(cover_hi, covered.hi);
  }
  for (int o = 16; o > 0; o /= 2) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    cover_lo = max(cover_lo, __shfl_xor_sync(0xffffffffu, cover_lo, o));
    cover_hi = min(cover_hi, __shfl_xor_sync(0xffffffffu, cover_hi, o));
  }
  const bool whole = count - n * kGroup >= kGroup;
  if (!whole) cover_hi = -1;  // no full tiles
  int n_full = 0, n_partial = 0;
  if (hi >= 0) {
    for (int w = lo / 32 + lane; w <= hi / 32; w += 32) met[w] = 0;
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      for (int w = met_by[r].lo / 32; met_by[r].lo <= met_by[r].hi && w <= met_by[r].hi / 32; ++w) {
        const int from = max(met_by[r].lo - 32 * w, 0), to = min(met_by[r].hi - 32 * w, 31);
        atomicOr(&met[w], (0xffffffffu >> (31 - to)) & (0xffffffffu << from));
      }
    }
    __syncwarp();
    int32_t* full_out = const_cast<int32_t*>(map.dkv_full_index_t) + col * map.m_blocks;
    int32_t* partial_out = const_cast<int32_t*>(map.dkv_partial_index_t) + col * map.m_blocks;
    const unsigned lower = (1u << lane) - 1u;
    for (int base = lo / 32 * 32; base <= hi; base += 32) {
      const int m = base + lane;
      const bool visited = m >= lo && m <= hi && ((met[m / 32] >> (m % 32)) & 1u);
      const bool full = visited && m >= cover_lo && m <= cover_hi;
      const unsigned is_full = __ballot_sync(0xffffffffu, full);
      const unsigned is_partial = __ballot_sync(0xffffffffu, visited && !full);
      if (full) full_out[n_full + __popc(is_full & lower)] = m;
      if (visited && !full) partial_out[n_partial + __popc(is_partial & lower)] = m;
      n_full += __popc(is_full);
      n_partial += __popc(is_partial);
    }
  }
  if (lane == 0) {
    const_cast<int32_t*>(map.dkv_full_count_t)[col] = n_full;
    const_cast<int32_t*>(map.dkv_partial_count_t)[col] = n_partial;
    if (n_full + n_partial) atomicAdd(p.counters + 4, (unsigned long long)(n_full + n_partial));
    if (n_full) atomicAdd(p.counters + 5, (unsigned long long)n_full);
  }
}

}  // namespace fsa::detail::cuda
