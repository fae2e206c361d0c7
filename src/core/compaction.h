#pragma once
// Compacted keys (DESIGN.md, "compacted key lists"). A key-only mask (query dim 1, e.g. the
// reference's top-k key mask (B, Hk, 1, Sk)) scatters its kept keys over the whole sequence, so
// every tile of the block map is partly kept and skipping tiles saves nothing. For such a mask the
// plan also keeps, per (batch, mask head), the sorted list of kept key indices. A call then runs
// over the kept keys gathered into a dense key axis of "slots": K and V rows (and a
// query-invariant bias) are gathered by the lists, the kernels run the usual block map over the
// slots, and row i of the problem sees slots [0, row_end[i]) — the mask and causality by the
// *original* key index folded into one bound per row (the lists are sorted, so the kept keys a
// row may see under causality are always a prefix of its list). dK, dV and the bias gradient are
// scattered back by key (zeros for dropped keys). Work and traffic follow the kept keys.
//
// The index math below (which list a compacted head reads, which source rows a slot copies, which
// slots a bias-gradient element sums) is shared by the CPU loops and the CUDA kernels, so the CPU
// tests in CI cover it.

#include <cstdint>
#include <memory>
#include <vector>

#include "core/host_device.h"
#include "core/problem.h"
#include "core/row_topk.h"
#include "fsa/plan.h"
namespace fsa::detail {

// Extents of a compacted call: the problem's, the key lists', and the gathered operands'.
struct CompactGeometry {
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  // Slots per list: the compacted key axis, seqlen_k or PlanOptions::max_kept_keys if smaller.
  int64_t slots = 0;
  int64_t num_heads = 0, num_kv_heads = 0;  // H, Hk of the problem
  int64_t list_batch = 1, list_heads = 1;   // key lists: the mask's read extents
  // Kv heads of the gathered K / V: Hk, or H when the mask has a head per query head and
  // GQA shares a kv head among several of them (each query head then reads its own gathered copy).
  int64_t kv_heads = 0;
  // Gathered bias (B | 1, bias_heads, 1, Sk) fp32: the finer of the bias's and the lists' batch and
  // heads. bias_heads == 0: no bias.
  int64_t bias_batch = 1, bias_heads = 0;

  // The list a gathered kv head of batch b reads: (list batch, list head) flattened.
  FSA_HOST_DEVICE int64_t list_of_kv(int64_t b, int64_t hc) const {
    return (list_batch == 1 ? 0 : b) * list_heads + hc / (kv_heads / list_heads);
  }
  // The problem's kv head a gathered kv head copies.
  FSA_HOST_DEVICE int64_t source_kv_head(int64_t hc) const {
    return hc / (kv_heads / num_kv_heads);
  }
  // The list a gathered bias row (bias batch bx, bias head hx) follows.
  FSA_HOST_DEVICE int64_t list_of_bias(int64_t bx, int64_t hx) const {
    return (list_batch == 1 ? 0 : bx) * list_heads + hx / (bias_heads / list_heads);
  }
  // A query head of gathered bias head hx (any: they share the bias and the list).
  FSA_HOST_DEVICE int64_t query_head_of_bias(int64_t hx) const {
    return hx * (num_heads / bias_heads);
  }
};

// The lists of a compacted plan, in the plan's device memory (host memory for a CPU plan).
struct KeyCompaction {
  CompactGeometry lists;             // list_batch, list_heads and the problem extents (bias unset)
  const int32_t* keys = nullptr;     // (list_batch, list_heads, slots): kept keys ascending
  const int32_t* count = nullptr;    // (list_batch, list_heads): kept keys per list
  const int32_t* slot = nullptr;     // (list_batch, list_heads, Sk): slot of key j, or -1 (dropped)
  const int32_t* row_end = nullptr;  // (list_batch, list_heads, Sq): row i sees slots [0, row_end)
  std::shared_ptr<void> storage;     // owns the arrays (a device allocation or host vector)
  Plan plan;                         // the block map over (Sq rows) x (slots), bounded by row_end
  // Per-row top-k (a plan with PlanOptions::topk; null otherwise). The lists hold every key that
  // some row keeps, and key_last (lists, key_last_stride(slots)) the last row that keeps each
  // slot (-1 past the count): the rows keeping a key run from the first that sees it to
  // key_last, because a row's candidates (the allowed keys of its causal prefix) only grow down
  // the rows, so its top-k threshold only tightens. Calls then need no thresholds: s < row_end[i]
  // and i <= key_last[s] is the selection (RowEnd::key_last), and whole tiles of it are full.
  const int32_t* key_last = nullptr;
  const int32_t* key_first = nullptr;  // same layout: the first row that sees each slot
  // The CPU thresholds let entries below the fill rank under the dropped keys, which can loosen a
  // threshold further down; when some key's rows are not an interval, the CPU plan also keeps the
  // thresholds, renumbered into slots (the last kept index as a slot: last_as_slot), and applies
  // them per entry. Key null otherwise (always on CUDA, whose thresholds never loosen).
  RowTopK row_topk;
  std::shared_ptr<void> topk_storage;  // owns row_topk's arrays (key_last is in storage)
};

// Builds plans (Plan's fields are private to the core's builders).
struct PlanAccess {
  static Plan make(const Geometry& g, bool is_causal, bool has_mask, Device device,
                   std::shared_ptr<const BlockMap> map,
                   std::shared_ptr<const DeviceBlockMap> device_map);
  // The same plan over another copy of its device map.
  static Plan with_device_map(const Plan& plan, std::shared_ptr<const DeviceBlockMap> device_map);
  static void set_causal_band(Plan& plan, bool causal_band) { plan.causal_band_ = causal_band; }
};

// Fills map's lists (full, partial and their transposes) and kept_entries from row bounds: row i
// of map row (b, h) sees slots [0, row_end[(b * heads + h) * Sq + i]), and, with key_last
// ((b * heads + h) * key_last_stride(slots) + s), only while i <= key_last[s]. map's extents are
// set.
void fill_map_from_row_end(BlockMap& map, const int32_t* row_end, int64_t seqlen_q,
                           int64_t seqlen_k, const int32_t* key_last = nullptr);

// CompactKeys::kAuto compacts problems with at least this many query rows (one CUDA query tile):
// below it each kept K / V row is used about once and gathering it would cost more than it saves.
inline constexpr int64_t kCompactMinQueries = 128;

// Whether the mask is one a plan compacts: a bool mask whose query dim is broadcast.
bool compactable_mask(const BroadcastOperand& mask);

// Whether a call with this problem runs over a compacted plan's lists: the plan has them and the
// bias, if any, is query-invariant (a bias with a query dim would have to be gathered per row).
bool runs_compacted(const Plan& plan, const Problem& p);
// ... and for a backward call, a bias gradient without a query dim (an expanded bias's gradient
// has one row per query).
bool runs_compacted(const Plan& plan, const BackwardProblem& p);

// The geometry of a compacted call of `p` over lists `c`.
CompactGeometry compact_geometry(const Problem& p, const KeyCompaction& c);

// The dtype of the gathered bias and its gradient: fp32, or fp64 for an fp64 problem (CPU).
DType compact_bias_dtype(const Problem& p);

// The problem over the gathered operands: K / V (B, slots, kv_heads, D) contiguous, in the
// problem's dtype; the bias, if any, (bias_batch, bias_heads, 1, slots) contiguous in
// compact_bias_dtype; no mask; RowEnd from the lists. dk / dv / dbias of a backward problem are
// the caller's until replaced (compacted_grads).
void lower_compacted(const Problem& p, const CompactGeometry& g, const KeyCompaction& c, void* k,
                     void* v, void* bias, Problem& out);
// Points a lowered backward problem's gradients at the gathered layouts: dk / dv like its k / v,
// dbias (if any) like its bias.
void compacted_grads(const CompactGeometry& g, void* dk, void* dv, void* dbias,
                     BackwardProblem& out);

// Row bounds of the lists, for Problem::row_end: head `h` of the problem reads list head
// h / (H / list_heads).
RowEnd row_end_of(const KeyCompaction& c);

// Compacted keys of a key-only mask on the CPU, with a block map of block_m x block_n tiles.
// max_kept_keys > 0 bounds the slots (PlanOptions::max_kept_keys); a list that keeps more raises.
// last_row_of_key (lists, Sk), optional: per-row top-k's last row keeping each key, which fills
// KeyCompaction::key_last by slot (the map then follows it).
std::shared_ptr<KeyCompaction> make_cpu_compaction(const Geometry& g,
                                                   const BroadcastOperand& mask, bool is_causal,
                                                   int block_m, int block_n, int64_t max_kept_keys,
                                                   const int32_t* last_row_of_key = nullptr);

// A mask with a query dim whose rows are one interval per key (PlanOptions::mask_key_intervals),
// on the CPU: whether it is, and its compacted keys. Lists per (batch, head) of the mask's read
// extents; slots are the keys some row keeps, ordered by their first row (then by index), so that
// row i sees slots [0, row_end[i]) = those whose first row is <= i; key_first / key_last are each
// slot's rows (RowEnd::key_last), and the calls run them as per-row top-k's. A mask that breaks
// the promise raises (attn_mask).
bool cpu_mask_key_intervals(const Geometry& g, const BroadcastOperand& mask, bool is_causal);
std::shared_ptr<const KeyCompaction> make_cpu_interval_compaction(const Geometry& g,
                                                                  const BroadcastOperand& mask,
                                                                  bool is_causal, int block_m,
                                                                  int block_n);

// Packed sequences (PlanOptions::packed) as interval rows: every key of a sequence with rows is
// kept by that sequence's rows (from its bottom-right causal diagonal on, with is_causal), unless
// the key mask (1, {H|Hk|1}, 1, total_k) drops it; then as make_cpu_interval_compaction. Lists
// per mask head (one without a mask).
CompactGeometry packed_lists_geometry(const Geometry& g,
                                      const std::optional<BroadcastOperand>& mask);
std::shared_ptr<const KeyCompaction> make_cpu_packed_compaction(
    const Geometry& g, const PlanOptions::PackedSequences& packed,
    const std::optional<BroadcastOperand>& mask, bool is_causal, int block_m, int block_n);

// A contiguous bool (batch, heads, 1, Sk) key mask over `data` (the keys per-row top-k lists).
BroadcastOperand key_flags(void* data, int64_t batch, int64_t heads, const Geometry& g);

// Row length of KeyCompaction::key_last: slots rounded up to whole 64-slot tiles, so that a kernel
// may copy a tile's values in 16-byte chunks (entries past the count hold -1).
FSA_HOST_DEVICE inline int64_t key_last_stride(int64_t slots) { return (slots + 63) / 64 * 64; }

// Whether a plan with per-row top-k thresholds can also compact its keys (KeyCompaction::
// key_last): with a key-only mask or none (the thresholds' own condition on CUDA).
inline bool compactable_topk(const std::optional<BroadcastOperand>& mask) {
  return !mask || compactable_mask(*mask);
}

// Per-row top-k over compacted keys on the CPU: lists of the keys some row of (batch, heads) of
// the thresholds keeps and each one's last row (every row is checked: exact for any bias and
// fill), plus the thresholds in slots where a key's rows are not an interval.
std::shared_ptr<const KeyCompaction> make_cpu_topk_compaction(
    const Geometry& g, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, const RowTopK& thresholds, int block_m, int block_n);

// Per-row top-k over compacted keys: each query tile's gathered slots (core/gather_lists.h), the
// lists a CUDA plan holds in BlockMapParams::gather_slots, built on the host from a CPU plan's
// compaction (key_last set, thresholds not kept): per row ((b * heads + h) * m_blocks + m) of
// tiles block_m x block_n, `stride` slots from row * stride, the ones every row of the tile keeps
// first, then the others, -1 to the end of the last tile; `full` leading tiles of the first kind
// and `tiles` tiles in all.
struct GatherLists {
  int64_t stride = 0, m_blocks = 0;
  std::vector<int32_t> slots, full, tiles;
};
GatherLists cpu_gather_lists(const KeyCompaction& c, int64_t topk, int block_m, int block_n);

// Per-row top-k over compacted keys: the dK/dV pass's groups of slots (core/dkv_order.h), what a
// CUDA plan holds in BlockMapParams::dkv_slots and dkv_*_t, built on the host from a CPU plan's
// compaction (key_last set, thresholds not kept). Per list l (lists of the compaction), `slots`
// from l * n_blocks * block_n: the list's count slots by ascending dkv_slot_key (chunks of slots,
// each by descending last query tile), stably, then -1; group n is its block_n entries from
// n * block_n. Per column (l * n_blocks + n), the query tiles the group visits, in the transposed
// lists' layout: full_count / partial_count, and the tiles from column * m_blocks in full_index /
// partial_index (ascending).
struct DkvLists {
  int64_t n_blocks = 0, m_blocks = 0;
  std::vector<int32_t> slots, full_count, partial_count, full_index, partial_index;
};
DkvLists cpu_dkv_lists(const KeyCompaction& c, int block_m, int block_n);

// The last kept index of a threshold renumbered into slots of a list whose keys are sorted:
// (listed keys <= last) - 1, so that for a listed key j, j <= last iff slot(j) <= the result;
// "keep every tie" (INT32_MAX) stays as it is.
FSA_HOST_DEVICE inline int32_t last_as_slot(int32_t last, const int32_t* keys, int32_t count) {
  if (last == 0x7fffffff) return last;
  int32_t lo = 0, hi = count;  // the first slot whose key is > last
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (keys[mid] <= last) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// The lists' geometry of a compacted plan for this problem and key-only mask: lists per (mask
// batch, mask head), slots = seqlen_k or max_kept_keys when that is smaller, gathered kv heads.
CompactGeometry compact_lists_geometry(const Geometry& g, const BroadcastOperand& mask,
                                       int64_t max_kept_keys);

// The CPU backend's compacted calls (gathers, runs cpu::forward / backward, scatters).
void cpu_compacted_forward(const ForwardProblem& p, const Plan& plan);
void cpu_compacted_backward(const BackwardProblem& p, const Plan& plan);

}  // namespace fsa::detail
