#pragma once
// The block map: sparsity as data, planned once per (mask, causality, tile shape) and reused by
// forward and backward. For every (batch, head, query block) of the map it lists the key blocks
// that are *full* (every entry kept: no mask read, no predicate) and *partial* (mask tile and/or
// causal predicate applied); key blocks in neither list are never visited. The transposed lists
// (per key block: full and partial query blocks) drive the backward pass.

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "fsa/tensor.h"

namespace fsa {

// A read-only run of block indices (C++17 has no std::span).
struct BlockSpan {
  const int32_t* first = nullptr;
  int64_t count = 0;
  const int32_t* begin() const { return first; }
  const int32_t* end() const { return first + count; }
  int64_t size() const { return count; }
  bool empty() const { return count == 0; }
  int32_t operator[](int64_t i) const { return first[i]; }
};

// Compressed rows of block indices, ascending within a row.
struct BlockLists {
  std::vector<int64_t> offsets;  // (rows + 1,)
  std::vector<int32_t> blocks;   // (offsets.back(),)
  BlockSpan row(int64_t r) const {
    return {blocks.data() + offsets[r], offsets[r + 1] - offsets[r]};
  }
};

struct BlockMap {
  // Extents of the map. batch is 1 when neither the mask nor the block selection varies with
  // batch; heads is 1, Hk or H (the larger of the mask's and the selection's head counts).
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t m_blocks = 0;  // ceil(Sq / block_m)
  int64_t n_blocks = 0;  // ceil(Sk / block_n)
  int block_m = 0;       // query rows per tile
  int block_n = 0;       // key columns per tile
  BlockLists full;       // row ((b * heads + h) * m_blocks + m) -> key blocks, every entry kept
  BlockLists partial;    // same rows -> key blocks with kept and dropped entries
  BlockLists full_t;     // row ((b * heads + h) * n_blocks + n) -> query blocks, every entry kept
  BlockLists partial_t;  // same rows -> query blocks with kept and dropped entries
  int64_t kept_entries = 0;  // kept (query, key) pairs summed over the map's (batch, head)
};

// Whether a plan for a key-only mask also compacts its keys (Plan::compacted()).
enum class CompactKeys {
  // Where it pays: a key-only mask (query dim 1), no block selection, and at least 128 query rows.
  // A shorter query block (decode) reads each kept K / V row about once, and gathering it first
  // would triple that traffic, so those calls keep the block map.
  kAuto,
  kAlways,  // any key-only mask without a block selection (tests, A/B measurements)
  kNever,   // the block map only
};

struct PlanOptions {
  // Tile shape. 0 = the default of the backend that will run the plan (CPU: 64 x 64; CUDA: the
  // forward kernel's tiles for the head dim). The CPU backend runs any shape; the CUDA kernels
  // need their own (a mismatched plan is rejected with the expected shape).
  int block_m = 0;  // tile rows (queries)
  int block_n = 0;  // tile columns (keys)
  // Optional caller-supplied block selection, bool (B|1, H|Hk|1, ceil(Sq/sel_m), ceil(Sk/sel_n))
  // over selection tiles of sel_m x sel_n: a tile whose entry is False is never visited. It is
  // combined (AND) with attn_mask and causality. Selection tiles are whole multiples of the plan's
  // tiles (e.g. 128 x 128 selections for 128 x 64 CUDA tiles); 0 = the plan's tile.
  std::optional<TensorView> block_mask;
  int block_mask_m = 0;  // sel_m
  int block_mask_n = 0;  // sel_n
  // Compacted keys for a key-only mask: the plan also lists each (batch, mask head)'s kept keys,
  // and calls whose bias is query-invariant (or absent) run over those keys gathered into a dense
  // key axis, so work follows the kept keys even when they are scattered (a top-k mask) and every
  // tile of the block map is partly kept.
  CompactKeys compact_keys = CompactKeys::kAuto;
  // A promise that no (batch, mask head) of a compacted mask keeps more keys than this (e.g. the
  // top-k window the mask was made with): the compacted key axis, its buffers and its grids are
  // sized by it instead of seqlen_k. 0: no bound. On the CPU a list that keeps more raises; on
  // CUDA (where the lists are built asynchronously) its keys past the bound are dropped.
  int64_t max_kept_keys = 0;
  // Per-row top-k without a mask tensor (beyond the reference): with topk > 0 every row keeps
  // only the topk largest entries of topk_bias among the keys it may see (attn_mask and
  // causality) — exactly what create_mask(topk_bias, that mask, window_size=topk, min_dtype =
  // topk_min_value) keeps, ties to the lower key index, never an entry equal to the fill — as one
  // threshold per row, O(B * heads * Sq), never an Sq x Sk mask. topk_bias: fp16 / bf16 / fp32,
  // query-invariant ({B|1}, {H|Hk|1}, 1, {Sk|1}); forward / backward must pass it as attn_bias.
  std::optional<TensorView> topk_bias;
  int64_t topk = 0;
  double topk_min_value = -3.4028234663852886e38;  // the fill (the reference's min_dtype)
  // A promise about an attn_mask with a query dim: for every key, the rows that keep it (the
  // mask AND causality) are one interval, as in create_mask's per-row top-k masks or a sliding
  // window. The plan then compacts its keys like per-row top-k, each key with its first and last
  // row, and a call costs the kept entries instead of every tile of the mask; a CUDA plan has no
  // map of the full key axis (every call runs compacted: a bias or its gradient with a query dim
  // is refused). A mask that breaks the promise: the CPU plan raises, a CUDA call gives wrong
  // results. mask_rows_are_intervals() checks a mask. Ignored for a key-only mask (compacted
  // anyway); not with topk or a block_mask.
  bool mask_key_intervals = false;
  // A promise that every call with this plan has a bias without a query dim (or none), and a
  // bias gradient of that shape: such calls run over the compacted keys, so a compacted CUDA plan
  // skips the map of the full key axis (one classify pass over every tile the mask and causality
  // leave). A call that breaks it gets an attn_bias error. Top-k plans over a bias of query
  // length 1 and interval masks skip that map anyway.
  bool compacted_calls_only = false;
  // Packed sequences (varlen; docs/numerics.md, "Packed sequences"): the problem (batch 1) holds
  // `sequences` sequences one after the other, sequence s owning query rows
  // [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and key rows [cu_seqlens_k[s], cu_seqlens_k[s + 1]).
  // No row sees a key of another sequence, and causality (bottom-right) is per sequence. The
  // offsets are `sequences + 1` int32 values in memory of the query's device (a CUDA plan reads
  // them on the device, asynchronously). attn_mask, if any, is a key mask (1, {H|Hk|1}, 1,
  // total_k). The plan compacts the keys, each key with the rows of its sequence that see it, so
  // work follows every sequence's own (causal) square, and every call runs compacted: a bias with
  // a query dim is refused. Not with topk, a block_mask or mask_key_intervals. A CPU plan checks
  // the offsets (non-decreasing, from 0 to the query's / key's length); a CUDA plan cannot without
  // waiting for the device, so it clamps them into range: bad offsets give wrong rows, never a
  // read out of bounds.
  struct PackedSequences {
    const int32_t* cu_seqlens_q = nullptr;
    const int32_t* cu_seqlens_k = nullptr;
    int64_t sequences = 0;
  };
  std::optional<PackedSequences> packed;
  void* stream = nullptr;  // cudaStream_t on which a CUDA plan is built; ignored on the CPU
};

namespace detail {
struct DeviceBlockMap;  // the CUDA backend's copy of the block map (device memory)
struct KeyCompaction;   // compacted keys: key lists and their block map (core/compaction.h)
struct RowThresholds;   // per-row top-k thresholds (core/thresholds.h)
struct PlanAccess;      // the core's builders of plans
}

// A plan for one problem geometry. Cheap to copy (shared, immutable storage).
class Plan {
 public:
  Plan() = default;

  bool valid() const { return map_ != nullptr; }
  // Extents and tile shape; the lists are filled for CPU plans. A CUDA plan keeps its lists in
  // device memory (device_map()), and its host lists are empty.
  const BlockMap& map() const { return *map_; }
  const detail::DeviceBlockMap* device_map() const { return device_map_.get(); }

  // The problem the plan was built for; forward/backward check their arguments against it.
  int64_t batch() const { return batch_; }
  int64_t num_heads() const { return num_heads_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  int64_t seqlen_q() const { return seqlen_q_; }
  int64_t seqlen_k() const { return seqlen_k_; }
  bool is_causal() const { return is_causal_; }
  bool has_mask() const { return has_mask_; }
  // Whether causality alone (if any) drops entries: no attn_mask, block_mask, top-k or packed
  // sequences. Every query tile's key tiles are then [0, the last one its last row sees).
  bool causal_band() const { return causal_band_; }
  Device device() const { return device_; }

  // Problem (batch, query head) -> map (batch, head).
  int64_t map_batch(int64_t b) const { return map_->batch == 1 ? 0 : b; }
  int64_t map_head(int64_t h) const { return h / (num_heads_ / map_->heads); }

  BlockSpan full_blocks(int64_t mb, int64_t mh, int64_t m) const {
    return map_->full.row((mb * map_->heads + mh) * map_->m_blocks + m);
  }
  BlockSpan partial_blocks(int64_t mb, int64_t mh, int64_t m) const {
    return map_->partial.row((mb * map_->heads + mh) * map_->m_blocks + m);
  }
  BlockSpan full_query_blocks(int64_t mb, int64_t mh, int64_t n) const {
    return map_->full_t.row((mb * map_->heads + mh) * map_->n_blocks + n);
  }
  BlockSpan partial_query_blocks(int64_t mb, int64_t mh, int64_t n) const {
    return map_->partial_t.row((mb * map_->heads + mh) * map_->n_blocks + n);
  }

  // Fraction of (query, key) entries kept by mask and causality: the work the kernels do,
  // relative to dense non-causal attention, is about visited_tile_fraction(). For a CUDA plan
  // these wait for the planning kernels and copy two counters to the host. A CUDA top-k plan
  // that compacted the keys of a bias with query length 1 has no map of the full key axis
  // (device_map() is null: every call runs compacted) and reports 0 here; see
  // compacted_tile_fraction().
  double kept_density() const;
  // Fraction of all tiles that are visited (full + partial).
  double visited_tile_fraction() const;

  // Whether the plan holds compacted keys (PlanOptions::compact_keys): calls whose bias is
  // query-invariant or absent then run over the kept keys.
  bool compacted() const { return compaction_ != nullptr; }
  // Fraction of the key tiles of the full (Sq x Sk) grid that a compacted call visits: tiles of
  // the compacted key axis (slots), which ends after the longest list. 0 when not compacted. For
  // a CUDA plan this waits for the planning kernels.
  double compacted_tile_fraction() const;
  // Per-row top-k over compacted keys on CUDA (PlanOptions::topk with a causal or query-dependent
  // mask): the sm90 forward and dQ passes walk each query tile's gathered slots, the ones some row
  // of the tile keeps. The fraction of the full grid's tiles they visit, and the fraction of
  // those that every row of their query tile keeps whole; 0 when the plan has no gathered lists
  // (CPU plans, every other selection). Waits for the planning kernels.
  double gathered_tile_fraction() const;
  double gathered_full_fraction() const;
  // The same plans on CUDA, for the sm90 dK/dV pass: its groups of 64 slots (by the band of
  // their last row, core/dkv_order.h) and the query tiles each one visits. The fraction of the
  // full grid's tiles that the pass visits, and the fraction of those whose every entry is kept;
  // 0 without the groups. Waits for the planning kernels.
  double dkv_tile_fraction() const;
  double dkv_full_fraction() const;
  const detail::KeyCompaction* compaction() const { return compaction_.get(); }
  // Per-row top-k thresholds (PlanOptions::topk), or null.
  const detail::RowThresholds* thresholds() const { return thresholds_.get(); }

 private:
  friend Plan make_plan(const TensorView&, const TensorView&, const std::optional<TensorView>&,
                        bool, const PlanOptions&);
  friend struct detail::PlanAccess;
  std::shared_ptr<const BlockMap> map_;
  std::shared_ptr<const detail::DeviceBlockMap> device_map_;
  std::shared_ptr<const detail::KeyCompaction> compaction_;
  std::shared_ptr<const detail::RowThresholds> thresholds_;
  int64_t batch_ = 0, num_heads_ = 0, num_kv_heads_ = 0, seqlen_q_ = 0, seqlen_k_ = 0;
  bool is_causal_ = false, has_mask_ = false, causal_band_ = false;
  Device device_{};
};

// Builds the block map for query (B, Sq, H, D) and key (B, Sk, Hk, D) (only their shapes are
// read), an optional bool attn_mask of any SPEC shape, causality and the tile shape, on the
// device of `query` (CUDA: asynchronously, on options.stream). The mask is read once; a stride-0
// (expanded) dimension is treated as broadcast and read once; on the CPU a key-only mask
// (..., 1, Sk) costs O(Sk) reads plus O(blocks) bookkeeping.
Plan make_plan(const TensorView& query, const TensorView& key,
               const std::optional<TensorView>& attn_mask, bool is_causal,
               const PlanOptions& options = {});

// Whether, for every (batch, head) and key of a bool attn_mask over query (B, Sq, H, D) and key
// (B, Sk, Hk, D), the rows that keep the key (the mask AND causality, bottom-right) are one
// interval (or none): PlanOptions::mask_key_intervals. Reads the mask once; on CUDA it runs on
// `stream` and waits for the answer (one 4-byte copy to the host).
bool mask_rows_are_intervals(const TensorView& query, const TensorView& key,
                             const TensorView& attn_mask, bool is_causal, void* stream = nullptr);

}  // namespace fsa
