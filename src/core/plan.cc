// Block-map planning: one read of the mask (O(Sk) for a key-only mask) turns mask + causality +
// optional block selection into per-tile full / partial / skipped decisions.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/causal.h"
#include "core/compaction.h"
#include "core/problem.h"
#include "core/thresholds.h"
#include "cuda/cuda_backend.h"
#include "cuda/tiles.h"

namespace fsa {
namespace {

using detail::BroadcastOperand;
using detail::CausalBand;

// Kept entries of one mask row segment [c0, c1): the mask is bool bytes, any stride.
int64_t count_true(const uint8_t* row, int64_t stride, int64_t c0, int64_t c1) {
  int64_t n = 0;
  if (stride == 1) {
    for (int64_t j = c0; j < c1; ++j) n += row[j] != 0;
  } else {
    for (int64_t j = c0; j < c1; ++j) n += row[j * stride] != 0;
  }
  return n;
}

// Counts kept entries per key block for one (map batch, map head, query block). The mask's
// effective shape decides how: a mask that varies along both Sq and Sk is read row by row (each
// element once over the whole plan); otherwise every row shares one prefix-sum row (key-only,
// scalar or no mask), optionally weighted per row (query-only mask).
class TileCounter {
 public:
  TileCounter(const std::optional<BroadcastOperand>& mask, int64_t sq, int64_t sk, bool causal,
              int block_m, int block_n)
      : mask_(mask), sk_(sk), band_{sq, sk, causal}, block_m_(block_m), block_n_(block_n) {
    per_row_ = mask_ && mask_->read_stride[2] != 0 && mask_->read_stride[3] != 0;
    prefix_.resize(size_t(sk + 1));
  }

  // Selects the mask slice of map (batch, head) `b`, `h_query` (a query head of that map head).
  void select(int64_t b, int64_t h_query) {
    base_ = nullptr;
    if (mask_) {
      base_ = static_cast<const uint8_t*>(mask_->data) + mask_->offset(b, h_query, 0, 0);
    }
    if (per_row_) return;
    // Shared row: prefix_[j] = kept keys among [0, j) of the (single) key row.
    prefix_[0] = 0;
    if (mask_ && mask_->read_stride[3] != 0) {
      const int64_t s = mask_->read_stride[3];
      for (int64_t j = 0; j < sk_; ++j) prefix_[j + 1] = prefix_[j] + (base_[j * s] != 0);
    } else {
      // No key dim: every key is kept, or, for a mask of one flag per (batch, head) (no query dim
      // either; a query-only mask weighs its rows instead), none is.
      const int64_t flag = mask_ && mask_->read_stride[2] == 0 ? int64_t(base_[0] != 0) : 1;
      for (int64_t j = 0; j < sk_; ++j) prefix_[j + 1] = (j + 1) * flag;
    }
  }

  // counts[n] = kept entries of tile (m, n) for the n with selected[n]; others untouched.
  void count(int64_t m, const std::vector<uint8_t>& selected, std::vector<int64_t>& counts) {
    const int64_t r0 = m * block_m_, r1 = std::min(r0 + block_m_, band_.seqlen_q);
    const int64_t n_blocks = int64_t(counts.size());
    if (per_row_) {
      std::fill(counts.begin(), counts.end(), 0);
      const int64_t sr = mask_->read_stride[2], sc = mask_->read_stride[3];
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t end = band_.visible_end(i);  // keys [0, end) are visible to row i
        const uint8_t* row = base_ + i * sr;
        for (int64_t n = 0; n < n_blocks && n * block_n_ < end; ++n) {
          if (!selected[n]) continue;
          counts[n] += count_true(row, sc, n * block_n_, std::min((n + 1) * block_n_, end));
        }
      }
      return;
    }
    // Per-row weight: 1, or the query-only mask's value for the row.
    const bool weighted = mask_ && mask_->read_stride[2] != 0;
    int64_t weight_sum = 0;
    for (int64_t i = r0; i < r1; ++i) weight_sum += row_weight(weighted, i);
    const int64_t first_end = band_.visible_end(r0), last_end = band_.visible_end(r1 - 1);
    for (int64_t n = 0; n < n_blocks; ++n) {
      if (!selected[n]) continue;
      const int64_t c0 = n * block_n_, c1 = std::min(c0 + block_n_, sk_);
      if (c1 <= first_end) {
        counts[n] = weight_sum * (prefix_[c1] - prefix_[c0]);  // every row sees the whole tile
      } else if (c0 >= last_end) {
        counts[n] = 0;  // no row sees any key of the tile
      } else {
        int64_t kept = 0;  // a causal diagonal tile: O(block_m) work, O(Sq) over the plan
        for (int64_t i = r0; i < r1; ++i) {
          const int64_t e = std::min(c1, band_.visible_end(i));
          if (e > c0) kept += row_weight(weighted, i) * (prefix_[e] - prefix_[c0]);
        }
        counts[n] = kept;
      }
    }
  }

 private:
  int64_t row_weight(bool weighted, int64_t i) const {
    return weighted ? int64_t(base_[i * mask_->read_stride[2]] != 0) : 1;
  }

  const std::optional<BroadcastOperand>& mask_;
  int64_t sk_;
  CausalBand band_;
  int block_m_, block_n_;
  bool per_row_ = false;
  const uint8_t* base_ = nullptr;
  std::vector<int64_t> prefix_;
};

void transpose(const BlockLists& rows, int64_t outer, int64_t m_blocks, int64_t n_blocks,
               BlockLists& cols) {
  cols.offsets.assign(size_t(outer * n_blocks + 1), 0);
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t m = 0; m < m_blocks; ++m) {
      for (int32_t n : rows.row(o * m_blocks + m)) ++cols.offsets[size_t(o * n_blocks + n + 1)];
    }
  }
  for (size_t r = 1; r < cols.offsets.size(); ++r) cols.offsets[r] += cols.offsets[r - 1];
  cols.blocks.resize(size_t(cols.offsets.back()));
  std::vector<int64_t> cursor(cols.offsets.begin(), cols.offsets.end() - 1);
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t m = 0; m < m_blocks; ++m) {  // ascending m: each column's list is sorted
      for (int32_t n : rows.row(o * m_blocks + m)) {
        cols.blocks[size_t(cursor[size_t(o * n_blocks + n)]++)] = int32_t(m);
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kCpuBlock = 64;  // CPU tiles: 64 x 64 fp32 scores stay in L1 with a 64-wide head

// attn_mask checked against the problem: bool, on the query's device, SPEC's broadcast shapes.
BroadcastOperand checked_mask(const TensorView& attn_mask, const TensorView& query,
                              const detail::Geometry& g) {
  if (attn_mask.dtype != DType::kBool) {
    throw Error(ErrorKind::kDType, "attn_mask",
                "expected dtype bool (True = keep), got " + to_string(attn_mask.dtype));
  }
  if (attn_mask.device != query.device) {
    throw Error(ErrorKind::kDevice, "attn_mask",
                "expected device " + to_string(query.device) + " (the query's), got " +
                    to_string(attn_mask.device));
  }
  return detail::validate_broadcast(attn_mask, "attn_mask", g, g.seqlen_q, g.seqlen_k);
}

// Packed sequences (PlanOptions::packed): what they combine with, and on the CPU (where the
// offsets are host memory) the offsets themselves.
void check_packed(const PlanOptions& options, const detail::Geometry& g,
                  const std::optional<BroadcastOperand>& mask, Device device) {
  const PlanOptions::PackedSequences& packed = *options.packed;
  if (packed.sequences < 0 || packed.sequences >= INT32_MAX) {
    throw Error(ErrorKind::kValue, "cu_seqlens_q",
                "expected 0 <= sequences < 2^31, got " + std::to_string(packed.sequences));
  }
  if (packed.cu_seqlens_q == nullptr || packed.cu_seqlens_k == nullptr) {
    throw Error(ErrorKind::kValue, packed.cu_seqlens_q == nullptr ? "cu_seqlens_q" : "cu_seqlens_k",
                "expected sequences + 1 int32 offsets, got a null pointer");
  }
  if (g.batch != 1) {
    throw Error(ErrorKind::kShape, "query",
                "packed sequences are one row: expected batch 1 (total_q, H, D) as (1, total_q, H, "
                "D), got batch " + std::to_string(g.batch));
  }
  if (options.topk != 0 || options.topk_bias || options.block_mask || options.mask_key_intervals) {
    throw Error(ErrorKind::kValue, "cu_seqlens_q",
                "packed sequences plan their own keys: expected no topk, block_mask or "
                "mask_key_intervals with them");
  }
  if (options.compact_keys == CompactKeys::kNever) {
    throw Error(ErrorKind::kValue, "compact_keys",
                "packed sequences always compact their keys: expected 'auto' or 'always', got "
                "'never'");
  }
  if (mask && mask->read_extent(2) != 1) {  // (its batch is the query's: 1)
    throw Error(ErrorKind::kShape, "attn_mask",
                "with packed sequences expected a key mask (1, {H|Hk|1}, 1, total_k), got shape (" +
                    std::to_string(mask->shape[0]) + ", " + std::to_string(mask->shape[1]) + ", " +
                    std::to_string(mask->shape[2]) + ", " + std::to_string(mask->shape[3]) + ")");
  }
  if (device.type != DeviceType::kCPU) return;
  const int64_t n = packed.sequences;
  for (int side = 0; side < 2; ++side) {
    const int32_t* cu = side == 0 ? packed.cu_seqlens_q : packed.cu_seqlens_k;
    const int64_t total = side == 0 ? g.seqlen_q : g.seqlen_k;
    bool ok = cu[0] == 0 && cu[n] == total;
    for (int64_t s = 0; ok && s < n; ++s) ok = cu[s] <= cu[s + 1];
    if (!ok) {
      throw Error(ErrorKind::kValue, side == 0 ? "cu_seqlens_q" : "cu_seqlens_k",
                  "expected " + std::to_string(n + 1) + " non-decreasing offsets from 0 to " +
                      std::to_string(total) + " (the packed length), got first " +
                      std::to_string(cu[0]) + ", last " + std::to_string(cu[n]));
    }
  }
}

}  // namespace

Plan make_plan(const TensorView& query, const TensorView& key,
               const std::optional<TensorView>& attn_mask, bool is_causal,
               const PlanOptions& options) {
  const detail::Geometry g = detail::validate_geometry(query, key);
  if (key.device != query.device) {
    throw Error(ErrorKind::kDevice, "key",
                "expected device " + to_string(query.device) + " (the query's), got " +
                    to_string(key.device));
  }
  const bool on_cuda = query.device.type == DeviceType::kCUDA;
  const int head_dim = int(query.shape[3]);
  const int block_m = options.block_m != 0 ? options.block_m
                      : on_cuda            ? detail::cuda::forward_block_m(head_dim)
                                           : kCpuBlock;
  const int block_n = options.block_n != 0 ? options.block_n
                      : on_cuda            ? detail::cuda::forward_block_n(head_dim)
                                           : kCpuBlock;
  if (block_m < 1) {
    throw Error(ErrorKind::kValue, "block_m", "expected >= 1 (0 = default), got " + std::to_string(block_m));
  }
  if (block_n < 1) {
    throw Error(ErrorKind::kValue, "block_n", "expected >= 1 (0 = default), got " + std::to_string(block_n));
  }
  const int64_t m_blocks = ceil_div(g.seqlen_q, block_m);
  const int64_t n_blocks = ceil_div(g.seqlen_k, block_n);
  const int sel_m = options.block_mask_m != 0 ? options.block_mask_m : block_m;
  const int sel_n = options.block_mask_n != 0 ? options.block_mask_n : block_n;
  if (sel_m < 1 || sel_n < 1) {
    throw Error(ErrorKind::kValue, "block_mask_m",
                "expected selection tiles >= 1 (0 = the plan's), got " + std::to_string(sel_m) +
                    "x" + std::to_string(sel_n));
  }

  std::optional<BroadcastOperand> mask, selection;
  std::optional<BroadcastOperand> topk_bias;
  if (options.topk != 0 || options.topk_bias) {
    if (!options.topk_bias) {
      throw Error(ErrorKind::kValue, "topk", "selects keys by a bias: set PlanOptions::topk_bias");
    }
    topk_bias = detail::validate_topk_bias(*options.topk_bias, options.topk, g, query.device);
  }
  if (attn_mask) mask = checked_mask(*attn_mask, query, g);
  // A mask with a query dim whose rows are one interval per key (PlanOptions::mask_key_intervals).
  bool intervals = false;
  if (options.mask_key_intervals) {
    if (!mask) {
      throw Error(ErrorKind::kValue, "mask_key_intervals",
                  "set, but attn_mask is None: expected a bool mask with a query dim");
    }
    if (options.topk != 0 || options.topk_bias || options.block_mask) {
      throw Error(ErrorKind::kValue, "mask_key_intervals",
                  "expected false with topk or a block_mask (they plan their own keys)");
    }
    intervals = !detail::compactable_mask(*mask);  // a key-only mask is compacted as it is
  }
  if (options.packed) check_packed(options, g, mask, query.device);
  if (options.block_mask) {
    if (options.block_mask->dtype != DType::kBool) {
      throw Error(ErrorKind::kDType, "block_mask",
                  "expected dtype bool (True = visit), got " + to_string(options.block_mask->dtype));
    }
    if (options.block_mask->device != query.device) {
      throw Error(ErrorKind::kDevice, "block_mask",
                  "expected device " + to_string(query.device) + " (the query's), got " +
                      to_string(options.block_mask->device));
    }
    if (sel_m % block_m != 0 || sel_n % block_n != 0) {
      throw Error(ErrorKind::kValue, "block_mask",
                  "selection tiles " + std::to_string(sel_m) + "x" + std::to_string(sel_n) +
                      " must be whole multiples of the plan's tiles " + std::to_string(block_m) +
                      "x" + std::to_string(block_n) + " (set PlanOptions block_mask_m/_n)");
    }
    selection = detail::validate_broadcast(*options.block_mask, "block_mask", g,
                                           ceil_div(g.seqlen_q, sel_m), ceil_div(g.seqlen_k, sel_n));
  }

  auto map = std::make_shared<BlockMap>();
  map->block_m = block_m;
  map->block_n = block_n;
  map->m_blocks = m_blocks;
  map->n_blocks = n_blocks;
  // The map's extents are the finest of what varies: batch if the mask or selection does, heads
  // as the larger of their head counts (each of 1, Hk, H divides the next).
  auto batch_of = [](const std::optional<BroadcastOperand>& o) {
    return o ? o->read_extent(0) : int64_t(1);
  };
  auto heads_of = [](const std::optional<BroadcastOperand>& o) {
    return o ? o->read_extent(1) : int64_t(1);
  };
  map->batch = std::max(batch_of(mask), batch_of(selection));
  map->heads = std::max(heads_of(mask), heads_of(selection));
  // An expanded (stride-0) head dim of size H reads as 1 head; H itself is always divisible.
  const int64_t rows = map->batch * map->heads * m_blocks;

  Plan plan = detail::PlanAccess::make(g, is_causal, attn_mask.has_value(), query.device,
                                       nullptr, nullptr);
  detail::PlanAccess::set_causal_band(plan, !attn_mask && !options.block_mask &&
                                                options.topk == 0 && !options.topk_bias &&
                                                !options.packed);
  // Compacted keys: for a key-only mask, its kept keys; for per-row top-k (with a key-only mask
  // or none), every key some row keeps and the last row that keeps it (core/compaction.h).
  const bool wanted = options.compact_keys == CompactKeys::kAlways ||
                      (options.compact_keys == CompactKeys::kAuto &&
                       g.seqlen_q >= detail::kCompactMinQueries);
  const bool compact = options.packed ||
                       (wanted && !selection &&
                        (topk_bias ? detail::compactable_topk(mask)
                                   : mask && (intervals || detail::compactable_mask(*mask))));
  if (on_cuda) {
    const detail::cuda::CurrentDevice device(query.device.index);
    // A top-k over a bias of query length 1 that compacts runs every call compacted (the call's
    // bias is the plan's, and its gradient has the bias's shape: runs_compacted), so the map of
    // the full key axis would be planned and never read: one classify pass over the whole causal
    // triangle per call (35 us of a 1.9 ms training-step attention, H200).
    // So does a promise of interval rows (PlanOptions::mask_key_intervals), where this map would
    // read the whole (Sq x Sk) mask.
    // Packed sequences have no map of the key axis: a row sees its own sequence's keys only.
    const bool key_axis_map =
        !(compact && ((topk_bias && options.topk_bias->shape[2] == 1) || intervals ||
                      options.compacted_calls_only || options.packed));
    if (key_axis_map) {
      plan.device_map_ = detail::cuda::make_device_plan(g, mask, selection, sel_m / block_m,
                                                        sel_n / block_n, is_causal, *map,
                                                        detail::RowEnd{}, topk_bias.has_value(),
                                                        0, options.stream);
    }
    plan.map_ = std::move(map);
    if (topk_bias && compact && !mask && !key_axis_map) {
      // The common per-row top-k plan (Doge's bias, no mask): replayed from a graph per shape.
      detail::cuda::DeviceTopkPlan pieces = detail::cuda::make_device_topk_plan(
          g, *topk_bias, is_causal, options.topk, options.topk_min_value, block_m, block_n,
          options.stream);
      plan.thresholds_ = std::move(pieces.thresholds);
      plan.compaction_ = std::move(pieces.compaction);
    } else if (topk_bias) {
      plan.thresholds_ = detail::cuda::make_device_thresholds(
          g, *topk_bias, mask, is_causal, options.topk, options.topk_min_value, options.stream);
      if (compact) {
        plan.compaction_ = detail::cuda::make_device_topk_compaction(
            g, *topk_bias, mask, is_causal, plan.thresholds_->view, options.topk, block_m,
            block_n, options.stream);
      }
    } else if (options.packed) {
      plan.compaction_ = detail::cuda::make_device_packed_compaction(
          g, *options.packed, mask, is_causal, block_m, block_n, options.stream);
    } else if (compact && intervals) {
      plan.compaction_ = detail::cuda::make_device_interval_compaction(g, *mask, is_causal, block_m,
                                                                       block_n, options.stream);
    } else if (compact) {
      plan.compaction_ = detail::cuda::make_device_compaction(
          g, *mask, is_causal, block_m, block_n, options.max_kept_keys, options.stream);
    }
    return plan;
  }

  if (options.packed) {  // no map of the key axis (its lists stay empty: calls run compacted)
    plan.map_ = std::move(map);
    plan.compaction_ = detail::make_cpu_packed_compaction(g, *options.packed, mask, is_causal,
                                                          block_m, block_n);
    return plan;
  }
  TileCounter counter(mask, g.seqlen_q, g.seqlen_k, is_causal, block_m, block_n);
  std::vector<int64_t> counts(size_t(n_blocks), 0);
  std::vector<uint8_t> selected(size_t(n_blocks), 1);
  map->full.offsets.assign(size_t(rows + 1), 0);
  map->partial.offsets.assign(size_t(rows + 1), 0);
  const int64_t head_group = g.num_heads / map->heads;
  for (int64_t b = 0; b < map->batch; ++b) {
    for (int64_t h = 0; h < map->heads; ++h) {
      const int64_t h_query = h * head_group;  // any query head of this map head
      counter.select(b, h_query);
      for (int64_t m = 0; m < m_blocks; ++m) {
        const int64_t row = (b * map->heads + h) * m_blocks + m;
        if (selection) {  // plan tile (m, n) lies in selection tile (m / ratio_m, n / ratio_n)
          const auto* sel = static_cast<const uint8_t*>(selection->data) +
                            selection->offset(b, h_query, m / (sel_m / block_m), 0);
          for (int64_t n = 0; n < n_blocks; ++n) {
            selected[size_t(n)] = sel[(n / (sel_n / block_n)) * selection->read_stride[3]] != 0;
          }
        }
        counter.count(m, selected, counts);
        const int64_t tile_rows = std::min<int64_t>(block_m, g.seqlen_q - m * block_m);
        for (int64_t n = 0; n < n_blocks; ++n) {
          if (!selected[size_t(n)] || counts[size_t(n)] == 0) continue;
          const int64_t tile_cols = std::min<int64_t>(block_n, g.seqlen_k - n * block_n);
          map->kept_entries += counts[size_t(n)];
          BlockLists& list = counts[size_t(n)] == tile_rows * tile_cols ? map->full : map->partial;
          list.blocks.push_back(int32_t(n));
        }
        map->full.offsets[size_t(row + 1)] = int64_t(map->full.blocks.size());
        map->partial.offsets[size_t(row + 1)] = int64_t(map->partial.blocks.size());
      }
    }
  }
  transpose(map->full, map->batch * map->heads, m_blocks, n_blocks, map->full_t);
  transpose(map->partial, map->batch * map->heads, m_blocks, n_blocks, map->partial_t);

  plan.map_ = std::move(map);
  if (topk_bias) {
    plan.thresholds_ = detail::make_cpu_thresholds(g, *topk_bias, mask, is_causal, options.topk,
                                                   options.topk_min_value);
    if (compact) {
      plan.compaction_ = detail::make_cpu_topk_compaction(
          g, *topk_bias, mask, is_causal, plan.thresholds_->view, block_m, block_n);
    }
  } else if (compact && intervals) {
    plan.compaction_ = detail::make_cpu_interval_compaction(g, *mask, is_causal, block_m, block_n);
  } else if (compact) {
    plan.compaction_ = detail::make_cpu_compaction(g, *mask, is_causal, block_m, block_n,
                                                   options.max_kept_keys);
  }
  return plan;
}

bool mask_rows_are_intervals(const TensorView& query, const TensorView& key,
                             const TensorView& attn_mask, bool is_causal, void* stream) {
  const detail::Geometry g = detail::validate_geometry(query, key);
  if (key.device != query.device) {
    throw Error(ErrorKind::kDevice, "key",
                "expected device " + to_string(query.device) + " (the query's), got " +
                    to_string(key.device));
  }
  const BroadcastOperand mask = checked_mask(attn_mask, query, g);
  if (query.device.type == DeviceType::kCUDA) {
    const detail::cuda::CurrentDevice device(query.device.index);
    return detail::cuda::mask_key_intervals(g, mask, is_causal, stream);
  }
  return detail::cpu_mask_key_intervals(g, mask, is_causal);
}

namespace detail {

void fill_map_from_row_end(BlockMap& map, const int32_t* row_end, int64_t seqlen_q,
                           int64_t seqlen_k, const int32_t* key_last) {
  const int64_t outer = map.batch * map.heads, rows = outer * map.m_blocks;
  map.full.offsets.assign(size_t(rows + 1), 0);
  map.partial.offsets.assign(size_t(rows + 1), 0);
  map.kept_entries = 0;
  for (int64_t o = 0; o < outer; ++o) {
    const int32_t* end = row_end + o * seqlen_q;  // non-decreasing in the row
    const int32_t* last = key_last ? key_last + o * key_last_stride(seqlen_k) : nullptr;
    for (int64_t m = 0; m < map.m_blocks; ++m) {
      const int64_t r0 = m * map.block_m, r1 = std::min<int64_t>(r0 + map.block_m, seqlen_q);
      for (int64_t n = 0; n < map.n_blocks; ++n) {
        const int64_t c0 = n * map.block_n, cols = std::min<int64_t>(map.block_n, seqlen_k - c0);
        if (c0 >= end[r1 - 1]) break;  // this tile and every later one: no row sees a slot
        int64_t kept = 0;
        for (int64_t i = r0; i < r1; ++i) {
          if (!last) {
            kept += std::clamp<int64_t>(end[i] - c0, 0, cols);
            continue;
          }
          for (int64_t s = c0; s < std::min<int64_t>(end[i], c0 + cols); ++s) kept += i <= last[s];
        }
        if (kept == 0) continue;
        map.kept_entries += kept;
        BlockLists& list = kept == (r1 - r0) * cols ? map.full : map.partial;
        list.blocks.push_back(int32_t(n));
      }
      const int64_t row = o * map.m_blocks + m;
      map.full.offsets[size_t(row + 1)] = int64_t(map.full.blocks.size());
      map.partial.offsets[size_t(row + 1)] = int64_t(map.partial.blocks.size());
    }
  }
  transpose(map.full, outer, map.m_blocks, map.n_blocks, map.full_t);
  transpose(map.partial, outer, map.m_blocks, map.n_blocks, map.partial_t);
}

}  // namespace detail

double Plan::kept_density() const {
  const double total = double(map_->batch) * double(map_->heads) * double(seqlen_q_) *
                       double(seqlen_k_);
  const int64_t kept =
      device_map_ ? detail::cuda::device_plan_stats(*device_map_).kept_entries : map_->kept_entries;
  return total > 0 ? double(kept) / total : 0.0;
}

double Plan::compacted_tile_fraction() const {
  // The slot axis is as long as the key axis, so the compacted map's grid is the full one.
  return compaction_ ? compaction_->plan.visited_tile_fraction() : 0.0;
}

double Plan::gathered_tile_fraction() const {
  if (!compaction_ || !compaction_->plan.device_map_) return 0.0;
  const BlockMap& map = *compaction_->plan.map_;  // (Sq rows) x (slots), slots as long as Sk
  const double total =
      double(map.batch) * double(map.heads) * double(map.m_blocks) * double(map.n_blocks);
  const auto stats = detail::cuda::device_plan_stats(*compaction_->plan.device_map_);
  return total > 0 ? double(stats.gathered_tiles) / total : 0.0;
}

double Plan::gathered_full_fraction() const {
  if (!compaction_ || !compaction_->plan.device_map_) return 0.0;
  const auto stats = detail::cuda::device_plan_stats(*compaction_->plan.device_map_);
  return stats.gathered_tiles > 0 ? double(stats.gathered_full_tiles) / stats.gathered_tiles : 0.0;
}

double Plan::dkv_tile_fraction() const {
  if (!compaction_ || !compaction_->plan.device_map_) return 0.0;
  const BlockMap& map = *compaction_->plan.map_;
  const double total =
      double(map.batch) * double(map.heads) * double(map.m_blocks) * double(map.n_blocks);
  const auto stats = detail::cuda::device_plan_stats(*compaction_->plan.device_map_);
  return total > 0 ? double(stats.dkv_tiles) / total : 0.0;
}

double Plan::dkv_full_fraction() const {
  if (!compaction_ || !compaction_->plan.device_map_) return 0.0;
  const auto stats = detail::cuda::device_plan_stats(*compaction_->plan.device_map_);
  return stats.dkv_tiles > 0 ? double(stats.dkv_full_tiles) / stats.dkv_tiles : 0.0;
}

double Plan::visited_tile_fraction() const {
  const double total = double(map_->batch) * double(map_->heads) * double(map_->m_blocks) *
                       double(map_->n_blocks);
  const int64_t visited =
      device_map_ ? detail::cuda::device_plan_stats(*device_map_).visited_tiles
                  : int64_t(map_->full.blocks.size() + map_->partial.blocks.size());
  return total > 0 ? double(visited) / total : 0.0;
}

}  // namespace fsa
