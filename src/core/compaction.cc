// Compacted keys (core/compaction.h): the lowering shared by both backends, and the CPU lists,
// gathers and scatters.

#include "core/compaction.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/causal.h"
#include "core/dkv_order.h"
#include "core/dtype.h"
#include "core/gather_lists.h"
#include "core/thresholds.h"
#include "cpu/cpu_backend.h"
#include "cpu/thread_pool.h"

namespace fsa::detail {

Plan PlanAccess::make(const Geometry& g, bool is_causal, bool has_mask, Device device,
                      std::shared_ptr<const BlockMap> map,
                      std::shared_ptr<const DeviceBlockMap> device_map) {
  Plan plan;
  plan.batch_ = g.batch;
  plan.num_heads_ = g.num_heads;
  plan.num_kv_heads_ = g.num_kv_heads;
  plan.seqlen_q_ = g.seqlen_q;
  plan.seqlen_k_ = g.seqlen_k;
  plan.is_causal_ = is_causal;
  plan.has_mask_ = has_mask;
  plan.device_ = device;
  plan.map_ = std::move(map);
  plan.device_map_ = std::move(device_map);
  return plan;
}

Plan PlanAccess::with_device_map(const Plan& plan,
                                 std::shared_ptr<const DeviceBlockMap> device_map) {
  Plan copy = plan;
  copy.device_map_ = std::move(device_map);
  return copy;
}

bool compactable_mask(const BroadcastOperand& mask) { return mask.read_stride[2] == 0; }

bool runs_compacted(const Plan& plan, const Problem& p) {
  // A bias with a query dim would have to be gathered per row: such calls keep the block map.
  return plan.compacted() && (!p.bias || p.bias->read_stride[2] == 0);
}

bool runs_compacted(const Plan& plan, const BackwardProblem& p) {
  return runs_compacted(plan, static_cast<const Problem&>(p)) &&
         (!p.dbias || p.dbias->shape[2] == 1);
}

CompactGeometry compact_geometry(const Problem& p, const KeyCompaction& c) {
  CompactGeometry g = c.lists;
  if (p.bias) {
    // Each extent is 1 or the problem's (heads: 1, Hk or H, each dividing the next), so the larger
    // one is the finer of the two.
    g.bias_batch = std::max(p.bias->read_extent(0), g.list_batch);
    g.bias_heads = std::max(p.bias->read_extent(1), g.list_heads);
  }
  return g;
}

DType compact_bias_dtype(const Problem& p) {
  return p.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

RowEnd row_end_of(const KeyCompaction& c) {
  const CompactGeometry& g = c.lists;
  RowEnd r;
  r.data = c.row_end;
  r.stride_b = g.list_batch == 1 ? 0 : g.list_heads * g.seqlen_q;
  r.stride_h = g.seqlen_q;
  r.head_group = int32_t(g.num_heads / g.list_heads);
  r.key_last = c.key_last;
  r.key_first = c.key_first;
  r.key_stride_h = key_last_stride(g.slots);
  r.key_stride_b = g.list_batch == 1 ? 0 : g.list_heads * r.key_stride_h;
  return r;
}

namespace {

// A contiguous (B, Sk, heads, D) operand.
SeqOperand packed_rows(void* data, const CompactGeometry& g, int64_t heads, int64_t head_dim) {
  return {data, g.slots * heads * head_dim, heads * head_dim, head_dim};
}

// A contiguous (bias_batch, bias_heads, 1, Sk) operand read by query head.
BroadcastOperand packed_bias(void* data, DType dtype, const CompactGeometry& g) {
  BroadcastOperand op;
  op.data = data;
  op.dtype = dtype;
  const int64_t shape[4] = {g.bias_batch, g.bias_heads, 1, g.slots};
  const int64_t stride[4] = {g.bias_heads * g.slots, g.slots, g.slots, 1};
  for (int d = 0; d < 4; ++d) {
    op.shape[d] = shape[d];
    op.stride[d] = stride[d];
    op.read_stride[d] = shape[d] == 1 ? 0 : stride[d];
  }
  op.head_group = g.num_heads / g.bias_heads;
  return op;
}

}  // namespace

void lower_compacted(const Problem& p, const CompactGeometry& g, const KeyCompaction& c, void* k,
                     void* v, void* bias, Problem& out) {
  out.seqlen_k = g.slots;
  out.num_kv_heads = g.kv_heads;
  out.k = packed_rows(k, g, g.kv_heads, p.head_dim);
  out.v = packed_rows(v, g, g.kv_heads, p.head_dim);
  out.mask.reset();
  if (p.bias) out.bias = packed_bias(bias, compact_bias_dtype(p), g);
  out.row_end = row_end_of(c);
  // Per-row top-k: RowEnd::key_last selects; thresholds only where the CPU plan kept them (in
  // slots; the gathered bias holds the same values widened, so their order keys are the same).
  out.row_topk = c.row_topk;
}

void compacted_grads(const CompactGeometry& g, void* dk, void* dv, void* dbias,
                     BackwardProblem& out) {
  out.dk = packed_rows(dk, g, g.kv_heads, out.head_dim);
  out.dv = packed_rows(dv, g, g.kv_heads, out.head_dim);
  if (out.dbias) out.dbias = packed_bias(dbias, out.bias->dtype, g);
}

// ---- CPU
// -----------------------------------------------------------------------------------------

BroadcastOperand key_flags(void* data, int64_t batch, int64_t heads, const Geometry& g) {
  BroadcastOperand op;
  op.data = data;
  op.dtype = DType::kBool;
  const int64_t shape[4] = {batch, heads, 1, g.seqlen_k};
  const int64_t stride[4] = {heads * g.seqlen_k, g.seqlen_k, g.seqlen_k, 1};
  for (int d = 0; d < 4; ++d) {
    op.shape[d] = shape[d];
    op.stride[d] = stride[d];
    op.read_stride[d] = shape[d] == 1 ? 0 : stride[d];
  }
  op.head_group = g.num_heads / heads;
  return op;
}

CompactGeometry packed_lists_geometry(const Geometry& geo,
                                      const std::optional<BroadcastOperand>& mask) {
  if (mask) return compact_lists_geometry(geo, *mask, 0);
  BroadcastOperand none;  // one list: every read stride 0
  none.shape[0] = none.shape[1] = none.shape[2] = 1;
  none.shape[3] = geo.seqlen_k;
  return compact_lists_geometry(geo, none, 0);
}

CompactGeometry compact_lists_geometry(const Geometry& geo, const BroadcastOperand& mask,
                                       int64_t max_kept_keys) {
  CompactGeometry g;
  g.batch = geo.batch, g.seqlen_q = geo.seqlen_q, g.seqlen_k = geo.seqlen_k;
  g.slots = max_kept_keys > 0 && max_kept_keys < geo.seqlen_k ? max_kept_keys : geo.seqlen_k;
  g.num_heads = geo.num_heads, g.num_kv_heads = geo.num_kv_heads;
  g.list_batch = mask.read_extent(0);
  g.list_heads = mask.read_extent(1);
  // A list per query head with GQA: every query head reads its own gathered copy of its kv head.
  g.kv_heads =
      g.list_heads == g.num_heads && g.num_heads != g.num_kv_heads ? g.num_heads : g.num_kv_heads;
  return g;
}

namespace {

// Host storage of a CPU plan's lists.
struct HostLists {
  std::vector<int32_t> keys, count, slot, row_end, key_last, key_first;
};

// The compaction over filled host lists: their block map (per-row bounds from key_last when the
// lists have it) and the plan over the slots.
std::shared_ptr<KeyCompaction> cpu_compaction_of(std::shared_ptr<HostLists> host,
                                                 const CompactGeometry& g, const Geometry& geo,
                                                 bool is_causal, int block_m, int block_n) {
  const int64_t sq = g.seqlen_q, slots = g.slots;
  const bool per_row = !host->key_last.empty();
  auto map = std::make_shared<BlockMap>();
  map->batch = g.list_batch;
  map->heads = g.list_heads;
  map->block_m = block_m;
  map->block_n = block_n;
  map->m_blocks = (sq + block_m - 1) / block_m;
  map->n_blocks = (slots + block_n - 1) / block_n;
  fill_map_from_row_end(*map, host->row_end.data(), sq, slots,
                        per_row ? host->key_last.data() : nullptr);

  auto c = std::make_shared<KeyCompaction>();
  c->lists = g;
  c->keys = host->keys.data();
  c->count = host->count.data();
  c->slot = host->slot.data();
  c->row_end = host->row_end.data();
  if (per_row) {
    c->key_last = host->key_last.data();
    c->key_first = host->key_first.data();
  }
  c->storage = std::move(host);
  const Geometry compact{geo.batch, sq, slots, geo.num_heads, g.kv_heads};
  c->plan = PlanAccess::make(compact, is_causal, false, Device{}, std::move(map), nullptr);
  return c;
}

}  // namespace

std::shared_ptr<KeyCompaction> make_cpu_compaction(const Geometry& geo,
                                                   const BroadcastOperand& mask, bool is_causal,
                                                   int block_m, int block_n, int64_t max_kept_keys,
                                                   const int32_t* last_row_of_key) {
  const CompactGeometry g = compact_lists_geometry(geo, mask, max_kept_keys);
  const int64_t lists = g.list_batch * g.list_heads, sq = g.seqlen_q, sk = g.seqlen_k;
  const int64_t slots = g.slots;
  auto host = std::make_shared<HostLists>();
  host->keys.assign(size_t(lists * slots), 0);
  host->count.assign(size_t(lists), 0);
  host->slot.assign(size_t(lists * sk), -1);
  host->row_end.assign(size_t(lists * sq), 0);
  const CausalBand band{sq, sk, is_causal};
  std::vector<int32_t> kept_before(size_t(sk + 1));  // kept keys among [0, j)
  for (int64_t l = 0; l < lists; ++l) {
    const int64_t lb = l / g.list_heads, lh = l % g.list_heads;
    const auto* row = static_cast<const uint8_t*>(mask.data) + lb * mask.read_stride[0] +
                      lh * mask.read_stride[1];
    int32_t n = 0;
    for (int64_t j = 0; j < sk; ++j) {
      kept_before[size_t(j)] = n;
      if (row[j * mask.read_stride[3]] != 0) {
        if (n == slots) {
          throw Error(ErrorKind::kValue, "max_kept_keys",
                      "attn_mask keeps more than max_kept_keys = " + std::to_string(slots) +
                          " keys in (batch " + std::to_string(lb) + ", head " + std::to_string(lh) +
                          ")");
        }
        host->keys[size_t(l * slots + n)] = int32_t(j);
        host->slot[size_t(l * sk + j)] = n++;
      }
    }
    kept_before[size_t(sk)] = n;
    host->count[size_t(l)] = n;
    if (last_row_of_key) {
      const int64_t stride = key_last_stride(slots);
      host->key_last.resize(size_t(lists * stride), -1);
      host->key_first.resize(size_t(lists * stride), int32_t(sq));
      for (int32_t w = 0; w < n; ++w) {
        const int64_t j = host->keys[size_t(l * slots + w)];
        host->key_last[size_t(l * stride + w)] = last_row_of_key[l * sk + j];
        host->key_first[size_t(l * stride + w)] =
            int32_t(is_causal ? std::clamp<int64_t>(j - (sk - sq), 0, sq) : 0);
      }
    }
    // The keys a row may see are a prefix of the sorted list: those before its causal end.
    for (int64_t i = 0; i < sq; ++i) {
      host->row_end[size_t(l * sq + i)] = kept_before[size_t(band.visible_end(i))];
    }
  }

  return cpu_compaction_of(std::move(host), g, geo, is_causal, block_m, block_n);
}

namespace {

// Per list (batch, head of the mask's read extents) and key: the first and last row keeping it
// (the mask AND causality; -1: none); per list, whether some key's rows are not one interval.
struct KeyRows {
  std::vector<int32_t> first, last;
  std::vector<uint8_t> broken;
};

KeyRows scan_key_rows(const CompactGeometry& g, const BroadcastOperand& mask, bool is_causal) {
  const int64_t lists = g.list_batch * g.list_heads, sq = g.seqlen_q, sk = g.seqlen_k;
  const int64_t head_group = g.num_heads / g.list_heads;
  const CausalBand band{sq, sk, is_causal};
  KeyRows out;
  out.first.assign(size_t(lists * sk), -1);
  out.last.assign(size_t(lists * sk), -1);
  out.broken.assign(size_t(lists), 0);
  parallel_for(lists, [&](int64_t l, int) {
    const int64_t b = l / g.list_heads, hq = (l % g.list_heads) * head_group;
    int32_t* first = out.first.data() + l * sk;
    int32_t* last = out.last.data() + l * sk;
    std::vector<int32_t> rows(size_t(sk), 0);
    for (int64_t i = 0; i < sq; ++i) {  // row by row: the mask is read in its own order
      const auto* row = static_cast<const uint8_t*>(mask.data) + mask.offset(b, hq, i, 0);
      const int64_t end = band.visible_end(i);
      for (int64_t j = 0; j < end; ++j) {
        if (row[j * mask.read_stride[3]] == 0) continue;
        if (first[j] < 0) first[j] = int32_t(i);
        last[j] = int32_t(i);
        ++rows[size_t(j)];
      }
    }
    for (int64_t j = 0; j < sk; ++j) {
      if (rows[size_t(j)] != 0 && rows[size_t(j)] != last[j] - first[j] + 1) out.broken[size_t(l)] = 1;
    }
  });
  return out;
}

// The compaction of keys whose rows are one interval each (rows.first / rows.last, -1: none):
// slots by first row, then by index, so that row i sees the prefix of slots whose first row is
// <= i.
std::shared_ptr<const KeyCompaction> interval_compaction(const CompactGeometry& g,
                                                         const Geometry& geo, const KeyRows& rows,
                                                         bool is_causal, int block_m,
                                                         int block_n) {
  const int64_t lists = g.list_batch * g.list_heads, sq = g.seqlen_q, sk = g.seqlen_k;
  const int64_t slots = g.slots, stride = key_last_stride(slots);
  auto host = std::make_shared<HostLists>();
  host->keys.assign(size_t(lists * slots), 0);
  host->count.assign(size_t(lists), 0);
  host->slot.assign(size_t(lists * sk), -1);
  host->row_end.assign(size_t(lists * sq), 0);
  host->key_last.assign(size_t(lists * stride), -1);
  host->key_first.assign(size_t(lists * stride), int32_t(sq));
  std::vector<int32_t> order;
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t* first = rows.first.data() + l * sk;
    const int32_t* last = rows.last.data() + l * sk;
    order.clear();
    for (int32_t j = 0; j < int32_t(sk); ++j) {
      if (first[j] >= 0) order.push_back(j);
    }
    // By first row, then by index: row i sees a prefix of the slots.
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return first[a] < first[b]; });
    const int32_t n = int32_t(order.size());
    host->count[size_t(l)] = n;
    for (int32_t s = 0; s < n; ++s) {
      const int32_t j = order[size_t(s)];
      host->keys[size_t(l * slots + s)] = j;
      host->slot[size_t(l * sk + j)] = s;
      host->key_first[size_t(l * stride + s)] = first[j];
      host->key_last[size_t(l * stride + s)] = last[j];
    }
    int32_t seen = 0;
    for (int64_t i = 0; i < sq; ++i) {
      while (seen < n && host->key_first[size_t(l * stride + seen)] <= i) ++seen;
      host->row_end[size_t(l * sq + i)] = seen;
    }
  }

  return cpu_compaction_of(std::move(host), g, geo, is_causal, block_m, block_n);
}

// Packed sequences: per key mask head (lists (1, list_heads)) and key, the rows of its sequence
// that see it (all of them, or from its bottom-right causal diagonal on); -1 where the mask drops
// it or its sequence has no rows. The offsets were checked (plan.cc).
KeyRows packed_key_rows(const CompactGeometry& g, const PlanOptions::PackedSequences& packed,
                        const std::optional<BroadcastOperand>& mask, bool is_causal) {
  const int64_t lists = g.list_batch * g.list_heads, sk = g.seqlen_k;
  KeyRows out;
  out.first.assign(size_t(lists * sk), -1);
  out.last.assign(size_t(lists * sk), -1);
  out.broken.assign(size_t(lists), 0);
  const int32_t *cu_q = packed.cu_seqlens_q, *cu_k = packed.cu_seqlens_k;
  for (int64_t l = 0; l < lists; ++l) {
    const auto* keep = mask ? static_cast<const uint8_t*>(mask->data) + l * mask->read_stride[1]
                            : nullptr;
    for (int64_t s = 0; s < packed.sequences; ++s) {
      const int32_t q0 = cu_q[s], q1 = cu_q[s + 1], k0 = cu_k[s], k1 = cu_k[s + 1];
      if (q1 == q0) continue;
      for (int32_t j = k0; j < k1; ++j) {
        if (keep && keep[j * mask->read_stride[3]] == 0) continue;
        const int32_t diagonal = (j - k0) - ((k1 - k0) - (q1 - q0));
        out.first[size_t(l * sk + j)] = q0 + (is_causal ? std::max(diagonal, 0) : 0);
        out.last[size_t(l * sk + j)] = q1 - 1;
      }
    }
  }
  return out;
}

}  // namespace

bool cpu_mask_key_intervals(const Geometry& geo, const BroadcastOperand& mask, bool is_causal) {
  const KeyRows rows = scan_key_rows(compact_lists_geometry(geo, mask, 0), mask, is_causal);
  return std::none_of(rows.broken.begin(), rows.broken.end(), [](uint8_t x) { return x != 0; });
}

std::shared_ptr<const KeyCompaction> make_cpu_interval_compaction(const Geometry& geo,
                                                                  const BroadcastOperand& mask,
                                                                  bool is_causal, int block_m,
                                                                  int block_n) {
  const CompactGeometry g = compact_lists_geometry(geo, mask, 0);
  const int64_t lists = g.list_batch * g.list_heads;
  const KeyRows rows = scan_key_rows(g, mask, is_causal);
  for (int64_t l = 0; l < lists; ++l) {
    if (rows.broken[size_t(l)]) {
      throw Error(ErrorKind::kValue, "attn_mask",
                  "mask_key_intervals: in (batch " + std::to_string(l / g.list_heads) +
                      ", head " + std::to_string(l % g.list_heads) +
                      ") some key is kept by rows that are not one interval; leave "
                      "mask_key_intervals unset for this mask");
    }
  }
  return interval_compaction(g, geo, rows, is_causal, block_m, block_n);
}

std::shared_ptr<const KeyCompaction> make_cpu_packed_compaction(
    const Geometry& geo, const PlanOptions::PackedSequences& packed,
    const std::optional<BroadcastOperand>& mask, bool is_causal, int block_m, int block_n) {
  const CompactGeometry g = packed_lists_geometry(geo, mask);
  return interval_compaction(g, geo, packed_key_rows(g, packed, mask, is_causal), is_causal,
                             block_m, block_n);
}

std::shared_ptr<const KeyCompaction> make_cpu_topk_compaction(
    const Geometry& geo, const BroadcastOperand& bias, const std::optional<BroadcastOperand>& mask,
    bool is_causal, const RowTopK& t, int block_m, int block_n) {
  const TopkLists extents = topk_lists(bias, mask);
  const int64_t batch = extents.batch, heads = extents.heads;
  const int64_t lists = batch * heads, sq = geo.seqlen_q, sk = geo.seqlen_k;
  const int64_t head_group = geo.num_heads / heads;
  const CausalBand band{sq, sk, is_causal};
  // Every row is checked (O(Sq * Sk) per list, as the CPU thresholds themselves): key j is listed
  // iff some row keeps it, its last row is the last that does, and `interval` says whether the
  // rows keeping it are exactly those from the first that sees it to that last one (which
  // RowEnd::key_last assumes). With a fill above some values they need not be: an entry below
  // the fill ranks under the dropped keys, so a row may keep it only once few keys are dropped.
  std::vector<uint8_t> kept(size_t(lists * sk), 0);
  std::vector<int32_t> last_row(size_t(lists * sk), -1);
  std::vector<uint8_t> interval(size_t(lists), 1);
  parallel_for(lists, [&](int64_t l, int) {
    const int64_t b = l / heads, hq = (l % heads) * head_group;
    for (int64_t j = 0; j < sk; ++j) {
      if (mask && static_cast<const uint8_t*>(mask->data)[mask->offset(b, hq, 0, j)] == 0) {
        continue;
      }
      const float value = load_float(bias.data, bias.dtype, bias.offset(b, hq, 0, j));
      int64_t first = -1, last = -1, rows = 0;
      for (int64_t i = 0; i < sq; ++i) {
        if (j < band.visible_end(i) && t.keeps(value, j, t.at(b, hq, i))) {
          if (first < 0) first = i;
          last = i;
          ++rows;
        }
      }
      if (first < 0) continue;
      kept[size_t(l * sk + j)] = 1;
      last_row[size_t(l * sk + j)] = int32_t(last);
      const int64_t sees = is_causal ? std::max<int64_t>(j - (sk - sq), 0) : 0;
      if (first != sees || rows != last - first + 1) interval[size_t(l)] = 0;
    }
  });
  std::shared_ptr<KeyCompaction> c = make_cpu_compaction(
      geo, key_flags(kept.data(), batch, heads, geo), is_causal, block_m, block_n, 0,
      last_row.data());
  if (std::all_of(interval.begin(), interval.end(), [](uint8_t x) { return x != 0; })) return c;

  // Some key's rows are not an interval: the calls also apply the thresholds, in slots.
  struct Arrays {
    std::vector<uint32_t> key;
    std::vector<int32_t> last;
  };
  auto arrays = std::make_shared<Arrays>();
  arrays->key.resize(size_t(lists * sq));
  arrays->last.resize(arrays->key.size());
  for (int64_t l = 0; l < lists; ++l) {
    const int64_t b = l / heads, hq = (l % heads) * head_group;
    for (int64_t i = 0; i < sq; ++i) {
      const int64_t at = t.at(b, hq, i);
      arrays->key[size_t(l * sq + i)] = t.key[at];
      arrays->last[size_t(l * sq + i)] =
          last_as_slot(t.last[at], c->keys + l * c->lists.slots, c->count[l]);
    }
  }
  c->row_topk = t;
  c->row_topk.key = arrays->key.data();
  c->row_topk.last = arrays->last.data();
  c->row_topk.stride_b = batch == 1 ? 0 : heads * sq;
  c->row_topk.stride_h = sq;
  c->row_topk.head_group = head_group;
  c->topk_storage = arrays;
  return c;
}

namespace {

// Gathers K and V rows into slots (rows past a list's count stay zero) and the bias by the lists.
void cpu_gather(const Problem& p, const CompactGeometry& g, const KeyCompaction& c, void* k,
                void* v, void* bias) {
  const int64_t slots = g.slots, D = p.head_dim;
  const size_t row_bytes = size_t(D) * dtype_size(p.dtype);
  parallel_for(g.batch * g.kv_heads, [&](int64_t task, int) {
    const int64_t b = task / g.kv_heads, hc = task % g.kv_heads;
    const int64_t l = g.list_of_kv(b, hc), hk = g.source_kv_head(hc);
    for (int64_t w = 0; w < c.count[l]; ++w) {
      const int64_t key = c.keys[l * slots + w];
      const int64_t dst = ((b * slots + w) * g.kv_heads + hc) * D;
      std::memcpy(element_ptr(k, p.dtype, dst),
                  element_ptr(p.k.data, p.dtype, p.k.offset(b, key, hk)), row_bytes);
      std::memcpy(element_ptr(v, p.dtype, dst),
                  element_ptr(p.v.data, p.dtype, p.v.offset(b, key, hk)), row_bytes);
    }
  });
  if (!p.bias) return;
  const DType bias_dtype = compact_bias_dtype(p);
  for (int64_t bx = 0; bx < g.bias_batch; ++bx) {
    for (int64_t hx = 0; hx < g.bias_heads; ++hx) {
      const int64_t l = g.list_of_bias(bx, hx), hq = g.query_head_of_bias(hx);
      const int64_t base = (bx * g.bias_heads + hx) * slots;
      for (int64_t w = 0; w < c.count[l]; ++w) {
        const double value = load_value<double>(p.bias->data, p.bias->dtype,
                                                p.bias->offset(bx, hq, 0, c.keys[l * slots + w]));
        store_value(value, bias_dtype, bias, base + w);
      }
    }
  }
}

// dK (or dV) of the caller from the gathered gradient: key j of kv head hk sums, over the
// gathered heads that copy hk, the gradient of its slot (none where the key was dropped).
template <typename Acc>
void cpu_scatter_rows(const CompactGeometry& g, const KeyCompaction& c, DType dtype,
                      int64_t head_dim, const void* src, const SeqOperand& dst) {
  const int64_t sk = g.seqlen_k, D = head_dim, per = g.kv_heads / g.num_kv_heads;
  parallel_for(g.batch * g.num_kv_heads, [&](int64_t task, int) {
    const int64_t b = task / g.num_kv_heads, hk = task % g.num_kv_heads;
    const size_t width = size_t(D);
    std::vector<Acc> sum(width), row(width);
    for (int64_t j = 0; j < sk; ++j) {
      std::fill(sum.begin(), sum.end(), Acc(0));
      for (int64_t hc = hk * per; hc < (hk + 1) * per; ++hc) {
        const int32_t s = c.slot[g.list_of_kv(b, hc) * sk + j];
        if (s < 0) continue;
        load_values(element_ptr(src, dtype, ((b * g.slots + s) * g.kv_heads + hc) * D), dtype, D,
                    row.data());
        for (int64_t d = 0; d < D; ++d) sum[size_t(d)] += row[size_t(d)];
      }
      store_values(sum.data(), D, dtype, element_ptr(dst.data, dtype, dst.offset(b, j, hk)));
    }
  });
}

// The caller's dbias (its shape: (Bb, Hb, 1, Sk | 1)) from the gathered one: each element sums
// the gathered rows that share it, at the key's slot (or over every kept slot for a key dim of 1).
template <typename Acc>
void cpu_scatter_dbias(const CompactGeometry& g, const KeyCompaction& c, DType src_dtype,
                       const void* src, const BroadcastOperand& dbias) {
  const int64_t sk = g.seqlen_k;
  const int64_t bb = dbias.shape[0], hb = dbias.shape[1], keys = dbias.shape[3];
  for (int64_t b = 0; b < bb; ++b) {
    for (int64_t h = 0; h < hb; ++h) {
      for (int64_t j = 0; j < keys; ++j) {
        Acc sum = 0;
        for (int64_t bx = 0; bx < g.bias_batch; ++bx) {
          if (bb != 1 && bx != b) continue;
          for (int64_t hx = 0; hx < g.bias_heads; ++hx) {
            if (hx / (g.bias_heads / hb) != h) continue;
            const int64_t l = g.list_of_bias(bx, hx), row = (bx * g.bias_heads + hx) * g.slots;
            if (keys == sk) {
              const int32_t s = c.slot[l * sk + j];
              if (s >= 0) sum += load_value<Acc>(src, src_dtype, row + s);
            } else {
              for (int64_t w = 0; w < c.count[l]; ++w)
                sum += load_value<Acc>(src, src_dtype, row + w);
            }
          }
        }
        store_value(sum, dbias.dtype, dbias.data,
                    b * dbias.stride[0] + h * dbias.stride[1] + j * dbias.stride[3]);
      }
    }
  }
}

}  // namespace

GatherLists cpu_gather_lists(const KeyCompaction& c, int64_t topk, int block_m, int block_n) {
  const CompactGeometry& g = c.lists;
  if (c.key_last == nullptr || c.row_topk.key != nullptr) {
    throw Error(ErrorKind::kValue, "plan",
                "gathered lists need a per-row top-k compaction whose rows are intervals");
  }
  GatherLists out;
  out.m_blocks = (g.seqlen_q + block_m - 1) / block_m;
  out.stride = gather_stride(topk, block_m, block_n, (g.slots + block_n - 1) / block_n);
  const int64_t rows = g.list_batch * g.list_heads * out.m_blocks;
  out.slots.assign(size_t(rows * out.stride), -1);
  out.full.assign(size_t(rows), 0);
  out.tiles.assign(size_t(rows), 0);
  const int64_t stride_k = key_last_stride(g.slots);
  for (int64_t l = 0; l < g.list_batch * g.list_heads; ++l) {
    const int32_t* end = c.row_end + l * g.seqlen_q;
    const int32_t* last = c.key_last + l * stride_k;
    for (int64_t m = 0; m < out.m_blocks; ++m) {
      const int64_t r0 = m * block_m, r1 = std::min<int64_t>(r0 + block_m, g.seqlen_q) - 1;
      const int64_t row = l * out.m_blocks + m;
      int32_t* list = out.slots.data() + row * out.stride;
      int64_t listed = 0, by_all = 0;
      for (const GatherKind kind : {GatherKind::kFull, GatherKind::kPartial}) {
        for (int64_t s = 0; s < end[r1]; ++s) {
          if (gather_kind(s, last[s], end[r0], end[r1], r0, r1) != kind) continue;
          if (listed == out.stride) {
            throw Error(ErrorKind::kValue, "plan",
                        "a query tile keeps more than topk + block_m - 1 slots");
          }
          list[listed++] = int32_t(s);
        }
        if (kind == GatherKind::kFull) by_all = listed;
      }
      out.full[size_t(row)] = int32_t(by_all / block_n);
      out.tiles[size_t(row)] = int32_t((listed + block_n - 1) / block_n);
    }
  }
  return out;
}

DkvLists cpu_dkv_lists(const KeyCompaction& c, int block_m, int block_n) {
  const CompactGeometry& g = c.lists;
  if (c.key_last == nullptr || c.key_first == nullptr || c.row_topk.key != nullptr) {
    throw Error(ErrorKind::kValue, "plan",
                "dK/dV groups need a per-row top-k compaction whose rows are intervals");
  }
  DkvLists out;
  out.n_blocks = (g.slots + block_n - 1) / block_n;
  out.m_blocks = (g.seqlen_q + block_m - 1) / block_m;
  const int64_t lists = g.list_batch * g.list_heads, stride = out.n_blocks * block_n;
  const int64_t cols = lists * out.n_blocks;
  out.slots.assign(size_t(lists * stride), -1);
  out.full_count.assign(size_t(cols), 0);
  out.partial_count.assign(size_t(cols), 0);
  out.full_index.assign(size_t(cols * out.m_blocks), 0);
  out.partial_index.assign(size_t(cols * out.m_blocks), 0);
  const int64_t stride_k = key_last_stride(g.slots);
  const DkvKeyBits bits = dkv_key_bits(lists, stride, out.m_blocks);
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t* first = c.key_first + l * stride_k;
    const int32_t* last = c.key_last + l * stride_k;
    int32_t* order = out.slots.data() + l * stride;
    const int32_t count = c.count[l];
    for (int32_t s = 0; s < count; ++s) order[s] = s;
    std::stable_sort(order, order + count, [&](int32_t a, int32_t b) {
      return dkv_slot_key(bits, l, a, count, last[a], block_m) <
             dkv_slot_key(bits, l, b, count, last[b], block_m);
    });
    for (int64_t n = 0; n < out.n_blocks; ++n) {
      const int32_t* group = order + n * block_n;
      const int64_t col = l * out.n_blocks + n;
      int64_t slots_in = 0;
      while (slots_in < block_n && n * block_n + slots_in < count) ++slots_in;
      for (int64_t m = 0; m < out.m_blocks; ++m) {
        bool meets = false, covers = slots_in == block_n;
        for (int64_t x = 0; x < slots_in; ++x) {
          const int32_t f = first[group[x]], e = last[group[x]];
          const DkvTileRange met = dkv_slot_met_tiles(f, e, block_m);
          const DkvTileRange covered = dkv_slot_covered_tiles(f, e, block_m, g.seqlen_q);
          meets = meets || (met.lo <= m && m <= met.hi);
          covers = covers && covered.lo <= m && m <= covered.hi;
        }
        if (!meets) continue;
        int32_t& n_listed = (covers ? out.full_count : out.partial_count)[size_t(col)];
        (covers ? out.full_index : out.partial_index)[size_t(col * out.m_blocks + n_listed++)] =
            int32_t(m);
      }
    }
  }
  return out;
}

void cpu_compacted_forward(const ForwardProblem& p, const Plan& plan) {
  const KeyCompaction& c = *plan.compaction();
  const CompactGeometry g = compact_geometry(p, c);
  const size_t rows = size_t(g.batch * g.slots * g.kv_heads * p.head_dim);
  std::vector<uint8_t> k(rows * dtype_size(p.dtype)), v(k.size());
  std::vector<uint8_t> bias(size_t(g.bias_batch * g.bias_heads * g.slots) *
                            dtype_size(compact_bias_dtype(p)));
  cpu_gather(p, g, c, k.data(), v.data(), bias.data());
  ForwardProblem cp = p;
  lower_compacted(p, g, c, k.data(), v.data(), bias.data(), cp);
  cpu::forward(cp, c.plan);
}

void cpu_compacted_backward(const BackwardProblem& p, const Plan& plan) {
  const KeyCompaction& c = *plan.compaction();
  const CompactGeometry g = compact_geometry(p, c);
  const size_t rows = size_t(g.batch * g.slots * g.kv_heads * p.head_dim);
  const DType bias_dtype = compact_bias_dtype(p);
  const size_t bias_bytes = size_t(g.bias_batch * g.bias_heads * g.slots) * dtype_size(bias_dtype);
  std::vector<uint8_t> k(rows * dtype_size(p.dtype)), v(k.size()), dk(k.size()), dv(k.size());
  std::vector<uint8_t> bias(bias_bytes), dbias(p.dbias ? bias_bytes : 0);
  cpu_gather(p, g, c, k.data(), v.data(), bias.data());
  BackwardProblem cp = p;
  lower_compacted(p, g, c, k.data(), v.data(), bias.data(), cp);
  compacted_grads(g, dk.data(), dv.data(), dbias.data(), cp);
  cpu::backward(cp, c.plan);
  if (p.dtype == DType::kFloat64) {
    cpu_scatter_rows<double>(g, c, p.dtype, p.head_dim, dk.data(), p.dk);
    cpu_scatter_rows<double>(g, c, p.dtype, p.head_dim, dv.data(), p.dv);
    if (p.dbias) cpu_scatter_dbias<double>(g, c, bias_dtype, dbias.data(), *p.dbias);
  } else {
    cpu_scatter_rows<float>(g, c, p.dtype, p.head_dim, dk.data(), p.dk);
    cpu_scatter_rows<float>(g, c, p.dtype, p.head_dim, dv.data(), p.dv);
    if (p.dbias) cpu_scatter_dbias<float>(g, c, bias_dtype, dbias.data(), *p.dbias);
  }
}

}  // namespace fsa::detail
