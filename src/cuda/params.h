#pragma once
// POD parameter structs of the CUDA kernels, passed by value as __grid_constant__. Every stride is
// in elements and 64-bit; broadcast dims of mask and bias have stride 0.

#include <cstdint>

#include "core/host_device.h"
#include "core/problem.h"
#include "core/row_end.h"
#include "core/row_topk.h"

namespace fsa::detail::cuda {

// The block map on the device: fixed-stride lists (row r's entries at [r * capacity, ...)).
struct BlockMapParams {
  const int32_t* full_index = nullptr;     // (rows, n_blocks) key blocks, every entry kept
  const int32_t* full_count = nullptr;     // (rows,)
  const int32_t* partial_index = nullptr;  // (rows, n_blocks) key blocks with dropped entries
  const int32_t* partial_count = nullptr;  // (rows,)
  const int32_t* full_index_t = nullptr;     // (cols, m_blocks) query blocks per key block
  const int32_t* full_count_t = nullptr;     // (cols,)
  const int32_t* partial_index_t = nullptr;  // (cols, m_blocks)
  const int32_t* partial_count_t = nullptr;  // (cols,)
  // Per-row top-k over compacted keys (RowEnd::key_last): per row of the map, the slots that some
  // row of its query tile keeps, gathered by index — the slots every row of the tile keeps first,
  // then the rest, -1 past the end of the last tile (gather_lists_kernel). The sm90 forward and
  // dQ passes load their K/V tiles through these instead of walking the slot axis, so a tile
  // visits about topk + block_m slots, not every slot listed before its rows. Null elsewhere.
  const int32_t* gather_slots = nullptr;  // (rows, gather_stride)
  const int32_t* gather_full = nullptr;   // (rows,) leading tiles of slots every row keeps
  const int32_t* gather_tiles = nullptr;  // (rows,) tiles of block_n slots
  int gather_stride = 0;                  // slots per row, a multiple of block_n
  // Per-row top-k over compacted keys, block_n 64: the sm90 dK/dV pass's groups of slots
  // (core/dkv_order.h, dkv_lists_kernel). Per list (map batch, map head), n_blocks * block_n
  // slots, grouped by the band of their last row, -1 past the list's count: CTA n of the pass
  // gathers the K / V rows of group n and walks the group's own transposed lists, in the
  // layout of full_index_t / full_count_t (launch_backward swaps them in). Null elsewhere.
  const int32_t* dkv_slots = nullptr;
  const int32_t* dkv_full_index_t = nullptr;
  const int32_t* dkv_full_count_t = nullptr;
  const int32_t* dkv_partial_index_t = nullptr;
  const int32_t* dkv_partial_count_t = nullptr;
  // Compacted keys: each list's kept keys, (map batch, map head), on the device. A key mask's
  // (no RowEnd::key_last) sm90 dK/dV pass sizes its split by them (BackwardParams::dkv_by_count),
  // and the split reduction skips the slots past them. Null elsewhere.
  const int32_t* kept_count = nullptr;
  int map_batch = 1;   // 1 or B
  int map_heads = 1;   // 1, Hk or H
  int head_group = 1;  // H / map_heads: query heads per map head
  int m_blocks = 0;    // ceil(Sq / block_m)
  int n_blocks = 0;    // ceil(Sk / block_n)
  int block_m = 0;
  int block_n = 0;
};

// A paged K / V cache (ForwardArgs::paged_kv) on the device: batch b's key j is row j % page_size
// of page table[b * max_pages + j / page_size]. The table is never read on the host, so an entry
// outside [0, num_pages) is clamped into it: it reads a page of the cache, never memory past it.
// K / V point at the pages, and their batch stride is the distance between pages. A null table:
// strided K / V.
struct PagedRows {
  const int32_t* table = nullptr;
  int64_t max_pages = 0;
  int page_size = 1;
  int num_pages = 1;
  // Elements from the K / V origin to batch b's key j (head 0).
  FSA_HOST_DEVICE int64_t offset(int64_t b, int64_t j, int64_t stride_b, int64_t stride_s) const {
    if (table == nullptr) return b * stride_b + j * stride_s;
    int64_t page = table[b * max_pages + j / page_size];
    page = page < 0 ? 0 : page >= num_pages ? num_pages - 1 : page;
    return page * stride_b + (j % page_size) * stride_s;
  }
};

// The device form of a paged operand's table (SeqOperand::pages), or a null table.
inline PagedRows paged_rows(const SeqOperand& op) {
  PagedRows r;
  if (op.pages != nullptr) {
    r.table = op.pages;
    r.max_pages = op.pages_stride_b;
    r.page_size = int(op.page_size);
    r.num_pages = int(op.num_pages);
  }
  return r;
}

struct ForwardParams {
  const void* q;  // (B, Sq, H, D)
  const void* k;  // (B, Sk, Hk, D)
  const void* v;  // (B, Sk, Hk, D)
  void* out;      // (B, Sq, H, D)
  float* lse;     // (B, H, Sq) or null
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_s;
  PagedRows paged;  // K / V as pages (the sm80 kernel only), or strided

  const uint8_t* mask;     // bool ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}) or null
  int64_t mask_stride[4];  // read strides: 0 on broadcast / expanded dims
  int mask_head_group;     // query heads per mask head
  const void* bias;        // query dtype or fp32, same shapes as the mask, or null
  bool bias_is_fp32;
  bool bias_staged;  // as in BackwardParams: the sm90 kernel stages the bias tiles
  int64_t bias_stride[4];
  int bias_head_group;

  int batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim;
  int group;            // H / Hk
  float scale_log2;     // softmax scale * log2(e)
  float softcap_in;     // scale / c (softcap on), else 0
  float softcap_out;    // c * log2(e) (softcap on), else 0
  bool is_causal;
  RowEnd row_end;        // compacted keys: each row's visible key slots (core/row_end.h), or null
  RowTopK row_topk;      // per-row top-k thresholds (core/row_topk.h), or key null
  // 0 when no V value is non-finite (partial tiles skip their V check): Problem::v_nonfinite (a
  // compacted call's gather), or the sm90 launch's own V check (v_nonfinite_kernel); or null.
  const int32_t* v_nonfinite;

  // GQA packing: the CTA's rows are (query, head-in-group) pairs of one kv head, row r holding
  // query r / group of head hk * group + r % group. Used when Sq * group fits one row tile, so K/V
  // are read once per kv head (decode).
  bool pack_gqa;
  // Split-KV: each CTA walks a 1/num_splits share of its list and, when num_splits > 1, writes
  // normalized partial outputs and their LSE to the workspaces; the combine kernel merges them.
  int num_splits;
  float* o_partial;    // (num_splits, B, H, Sq, kernel head dim) fp32
  float* lse_partial;  // (num_splits, B, H, Sq) fp32
  // Persistent sm90 forward: the tile counter (zero at launch) its CTAs take the next tile from;
  // null: one CTA per tile (forward_launch.cuh).
  int* tile_counter;
  // The persistent band walk (causal): the longest query blocks (the first long_blocks of each
  // (batch, head)'s order, ForwardTileOrder) of every head come before the others
  // (band_long_blocks); 0: one order, head by head.
  int long_blocks;
  // Decode (the sm80 split-key layout): K / V are read once, with L2 evict_first (l2_policy,
  // forward_kernel.cuh); false: unhinted, as every other layout loads.
  bool kv_evict_first;
  // A paged decode: the CTA touches the page table entries of its later tiles at its start (the
  // ring reads each one iteration ahead, which a cold entry outlasted); false: it does not
  // (FSA_CUDA_TOUCH_TABLE=0, A/B measurements).
  bool touch_table;
  // The plan's lists are causality's band alone (Plan::causal_band): the sm90 forward at D <= 128
  // may then walk query blocks and key tiles of its own (forward_launch.cuh, band_forward_call).
  bool causal_band;

  BlockMapParams map;
  // A cache's per-sequence key lengths (ForwardArgs::cache_seqlens), clamped into [0, Sk] where
  // read (key_shift), or null: all Sk keys. The sm80 kernel only.
  const int32_t* cache_seqlens;
};

// How the bias gradient is produced (the caller's dbias shape decides).
enum class BiasGrad : int {
  kNone = 0,
  kFull = 1,        // dbias (B, H, Sq, Sk): each dS element written once by the dQ pass
  kFullSummed = 2,  // dbias ({B|1}, {H|Hk|1}, Sq, Sk) with a broadcast dim: summed into
                    // dbias_accum (fp32, dbias's own size; atomics, or ordered launches when
                    // deterministic), converted at the end
  kRows = 3,        // dbias (..., Sq, 1): row sums in the dQ pass into row_accum (B, H, Sq)
  kColumns = 4,     // dbias (..., 1, Sk|1): column sums in the dK/dV pass into col_accum (B, H, Sk)
};

// The caller's dK and dV of a compacted call, by key (BackwardParams::scatter). Kv head hk of batch
// b reads list b * list_stride_b + hk / head_group of `slot` (lists x keys: each key's slot, -1
// when no row keeps it). Only for compactions with one gathered kv head per kv head.
struct KeyScatter {
  const int32_t* slot = nullptr;  // null: dK and dV go to BackwardParams::dk / dv by slot
  int keys = 0;                   // the caller's Sk
  int list_stride_b = 0;
  int head_group = 1;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dk_stride_b = 0, dk_stride_s = 0, dk_stride_h = 0;
  int64_t dv_stride_b = 0, dv_stride_s = 0, dv_stride_h = 0;
};

struct BackwardParams {
  const void* q;     // (B, Sq, H, D)
  const void* k;     // (B, Sk, Hk, D)
  const void* v;     // (B, Sk, Hk, D)
  const void* out;   // (B, Sq, H, D) forward output
  const void* dout;  // (B, Sq, H, D)
  const float* lse;  // (B, H, Sq) natural-log LSE from forward
  void* dq;          // (B, Sq, H, D)
  void* dk;          // (B, Sk, Hk, D)
  void* dv;          // (B, Sk, Hk, D)
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t do_stride_b, do_stride_s, do_stride_h;
  int64_t dq_stride_b, dq_stride_s, dq_stride_h;
  int64_t dk_stride_b, dk_stride_s, dk_stride_h;
  int64_t dv_stride_b, dv_stride_s, dv_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_s;
  const float* rowdot;  // (B, H, Sq) sum_d dO * O, from the preprocess kernel
  bool rowdot_chunks;   // out and dout rows are 16-byte chunks: rowdot_chunks_kernel reads them
  // The lean sm90 passes' pair (their kFinite instantiations; launch_sm90_dkdv): a flag zeroed
  // before the preprocess, which sets it where a row's rowdot is not finite or its LSE is NaN,
  // and V's scan ahead where V holds a NaN / Inf. The pass compiled without the per-entry guards
  // (P = 0 at x = -inf, dS = 0 at P = 0) runs where it reads 0, the guarded one elsewhere; null:
  // the guarded one alone.
  int32_t* nonfinite;
  // With it, (B, H, Sq) fp32 scratch that the preprocess fills with each row's LSE in log2 units,
  // an empty row's -inf as +inf: what the dK/dV twins stage in place of lse (probabilities_t).
  float* lse_log2;

  const uint8_t* mask;  // as in ForwardParams
  int64_t mask_stride[4];
  int mask_head_group;
  const void* bias;
  bool bias_is_fp32;
  // 16-bit bias with a query dim, keys contiguous, rows 16-byte aligned, Sk % 8 == 0: the sm90
  // passes copy its (queries x 64 keys) tiles into shared memory with each stage. (Beside
  // bias_is_fp32, in its padding: no later field moves.)
  bool bias_staged;
  int64_t bias_stride[4];
  int bias_head_group;

  BiasGrad bias_grad;
  void* dbias;               // caller's dbias (bias dtype), kFull
  int64_t dbias_stride[4];   // caller strides of dbias
  int dbias_shape[4];        // caller shape of dbias
  float* dbias_accum;        // kFullSummed: fp32, dbias's shape, contiguous
  float* row_accum;          // kRows: (B, H, Sq) fp32
  float* col_accum;          // kColumns: (B, H, dkv_rows) fp32, see dkv_splits
  // The dQ grid's (head, batch): CTA (x, y, z) runs head y * dq_head_step + dq_head0 of batch
  // z + dq_batch0. Normally one launch, grid (m, H, B), step 1 and offsets 0. Ordered kFullSummed
  // (deterministic=True, or launches that still fill the GPU; see backend.cu): one launch per
  // member of a dbias slice (the (b, h) pairs that share one dbias (Sq, Sk) slice), grid
  // (m, dbias heads, dbias batch), each CTA running that member of its slice; no two CTAs of a
  // launch touch one dbias_accum element, so the launch order fixes the order of the sums.
  // Otherwise fp32 atomics from every (b, h) at once.
  bool ordered_dbias;
  // dbias's keys contiguous and every even key's entry aligned for a pair store (two 16-bit
  // values, or two fp32).
  bool dbias_pairs;
  int dq_head_step, dq_head0, dq_batch0;

  int batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim;
  int group;
  float scale;        // softmax scale (natural units): dQ and dK are scaled by it
  float scale_log2;   // scale * log2(e)
  float softcap_in;   // scale / c, or 0
  float softcap_out;  // c * log2(e), or 0
  bool is_causal;
  RowEnd row_end;        // as in ForwardParams
  RowTopK row_topk;      // as in ForwardParams

  // The sm90 dK/dV pass's split of a key tile's query work (grid x = n_blocks << dkv_split_log2),
  // when too few key tiles would leave SMs idle and the longest tile alone sets the time (few
  // keys: compacted top-k, short Sk). dkv_splits = 1 << dkv_split_log2 (a power of two: the
  // producer warpgroup's 40 registers have no room for a division). A CTA's shares (DkvShares):
  // 2^log2 of them, share s of key row `key` at row s * stride + key of a region of dkv_rows rows
  // per (which, batch): dkv_partial is (2: dK then dV, B, dkv_rows, Hk, kernel head dim) fp32, and
  // col_accum's rows are the same. Fixed split (dkv_by_count false): log2 = dkv_split_log2,
  // stride = Sk, dkv_rows = Sk << log2; log2 > 0 writes the shares of dK (scaled) and dV there and
  // dkv_reduce_kernel sums them in split order (deterministic).
  int dkv_splits;
  int dkv_split_log2;
  float* dkv_partial;
  int dkv_rows;
  // Compacted key masks (BlockMapParams::kept_count, no RowEnd::key_last): the split follows each
  // list's count on the device, as the host's rule would with the count known, within the grid's
  // n_blocks << dkv_split_log2 CTAs: stride = the count's tiles * block_n, dkv_rows = n_blocks *
  // block_n << dkv_split_log2; CTAs past the count exit, and dkv_reduce_kernel always runs. A mask
  // given as a tensor has a slot axis as long as the key axis (its count is unknown on the host),
  // so the fixed rule saw every slot tile and split nothing: 16 of 512 tiles at (1, 32768, 2, 1,
  // 64) top 1024 ran on 16 CTAs.
  bool dkv_by_count;
  // With it, from the host: ceil(2 SMs' worth of CTAs / (Hk * B)), the tiles per list that fill
  // the GPU unsplit; the most shares (8, and about two query tiles per share); the grid's CTAs
  // per (kv head, batch), n_blocks << dkv_split_log2.
  int dkv_target_tiles, dkv_max_shares, dkv_grid_tiles;
  // The sm90 dK/dV grid is (Hk, x, B) rather than (x, Hk, B) (dkv_cta): the CTAs start
  // tile-major, every kv head's tile x before any tile x + 1. Set for compacted key masks
  // (dkv_by_count), where a tile's query work falls with its index in every list (its keys come
  // later) and the lists are few: head after head left the last heads' longest tiles for the end
  // of the pass (H200, (1, 16384, 32, 8, 128) top 2048: 1.90 -> 1.67 ms). Also for the fused
  // pass over packed sequences, and for ordered units (dkv_order; launch_sm90_dkdv).
  bool dkv_tile_major;
  // Compacted calls (cuda/compact.cu) whose dK/dV pass splits every list (dkv_splits > 1, not
  // dkv_by_count): dkv_reduce_kernel sums the shares straight into the caller's key axis, zeros
  // for dropped keys, instead of the compacted rows that scatter_rows then copied out (one pass
  // over dK and dV less). Set by launch_backward from a caller's request (KeyScatter::slot).
  KeyScatter scatter;

  BlockMapParams map;

  // The caller asked for a bitwise reproducible backward (BackwardProblem::deterministic).
  bool deterministic;
  // The fused backward (launch_backward, fused_backward; backward_fused_sm90.cuh): one sm90 pass
  // over pairs of key tiles computes dK, dV and dQ, and no dQ pass runs. Its work per pair: for
  // list L (map batch, map head) and pair P (key tiles 2P, 2P + 1), pair_count[L * n_pairs + P]
  // entries at pair_list + (L * n_pairs + P) * m_blocks, ascending query tiles m, each
  // m << 4 | flags (bit 2w: tile 2P + w lists m; bit 2w + 1: as a partial tile). dq_accum: zeroed
  // fp32 tiles of 64 queries x kernel head dim per (b, h), in the order the pass's warpgroups hold
  // them (dq_convert_kernel), that its bulk reductions add into (their order varies: not
  // deterministic); dq_convert_kernel then scales them into dq. Null: the dQ pass writes dq.
  const int32_t* pair_list;
  const int32_t* pair_count;
  // The order the sm90 dK/dV pass's CTAs take their units in (dkv_order_kernel, dkv_unit), or
  // null: index order. Per (map batch, kv head), the indices of its units (key tiles, n_blocks of
  // them; pairs, n_pairs, in the fused pass), longest work first, so that a unit whose list is far
  // longer than the rest (a key block that every query of a block selection picks) starts in the
  // first wave rather than setting the pass's time at its tail. The grid then runs tile-major
  // (dkv_tile_major): every kv head's longest unit before any head's second.
  const int32_t* dkv_order;
  int n_pairs;
  float* dq_accum;
};

constexpr int kPlanCounters = 6;  // PlanParams::counters

// Planning kernel inputs.
struct PlanParams {
  const uint8_t* mask;       // or null
  int64_t mask_stride[4];    // read strides (0 on broadcast dims)
  int mask_head_group;       // query heads per mask head
  const uint8_t* selection;  // block selection (…, m_blocks, n_blocks) or null
  int64_t sel_stride[4];
  int sel_head_group;
  int sel_ratio_m, sel_ratio_n;  // plan tiles per selection tile along queries / keys
  int seqlen_q, seqlen_k;
  bool is_causal;
  RowEnd row_end;            // compacted keys: rows' visible slots (then no mask or selection)
  bool all_partial;          // no full tiles: a per-row predicate (top-k thresholds) everywhere
  uint8_t* tile_class;       // (rows, n_blocks): 0 skipped, 1 partial, 2 full
  int classify_tiles_per_warp;  // classify_kernel: tiles one warp walks (classify_tiles_per_warp())
  // [kept entries, visited tiles, gathered tiles, gathered full tiles, dK/dV group tiles, of
  // those full], accumulated
  unsigned long long* counters;
  BlockMapParams map;        // output lists (const-cast in the kernel)
};

// Whether causality (and the key and query ranges) alone drops entries: no mask, per-row top-k or
// compacted row bounds. The first condition of the sm90 kernels' lean instantiations
// (lean_forward_call, lean_dq_call, lean_dkdv_call; ForwardParams or BackwardParams).
template <class Params>
inline bool causal_only_drops(const Params& p) {
  return p.mask == nullptr && p.row_topk.key == nullptr && p.row_end.data == nullptr &&
         p.row_end.key_last == nullptr;
}

// Whether every (batch, head) row of a query-invariant bias (..., 1, Sk) can travel with its key
// tiles into shared memory (the sm90 forward and dQ pass copy such rows with 16-byte cp.async):
// keys contiguous and each row 16-byte aligned. The host's restatement of the kernels' per-row
// test, for choosing instantiations that assume it (ForwardParams or BackwardParams).
template <class Params>
inline bool key_bias_rows_aligned(const Params& p) {
  const int64_t bytes = p.bias_is_fp32 ? 4 : 2;
  const int bias_heads = (p.num_heads + p.bias_head_group - 1) / p.bias_head_group;
  return p.bias != nullptr && p.bias_stride[2] == 0 && p.bias_stride[3] == 1 &&
         reinterpret_cast<uintptr_t>(p.bias) % 16 == 0 &&
         (p.batch == 1 || p.bias_stride[0] * bytes % 16 == 0) &&
         (bias_heads == 1 || p.bias_stride[1] * bytes % 16 == 0);
}

}  // namespace fsa::detail::cuda
