// Compacted keys (src/core/compaction.h) on the CPU backend: a key-only mask's plan lists the kept
// keys, calls run over them gathered into slots, and gradients are scattered back by key. Every
// case runs twice, through the compacted plan and through the block map alone
// (CompactKeys::kNever), and both must pass the SPEC rule against float64.
//
// Sizes are odd on purpose (97 and 130 leave ragged query and key tiles; Sq > Sk leaves empty
// leading rows under causality), and the masks keep scattered keys so that every tile of the
// block map is partial.

#include "core/compaction.h"
#include "core/dkv_order.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "harness.h"

namespace fsa_test {
namespace {

using fsa::DType;

class Compaction : public ::testing::TestWithParam<DType> {};
INSTANTIATE_TEST_SUITE_P(CPU, Compaction, ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         dtype_param_name);

fsa::Plan plan_for(LibraryBuffers& buffers, bool causal, bool compact,
                   fsa::CompactKeys mode = fsa::CompactKeys::kAlways) {
  fsa::PlanOptions options;
  options.compact_keys = compact ? mode : fsa::CompactKeys::kNever;
  return fsa::make_plan(
      buffers.q.view(), buffers.k.view(),
      buffers.mask ? std::optional<fsa::TensorView>(buffers.mask->view()) : std::nullopt, causal,
      options);
}

// Forward and backward through `plan` (without attn_mask where the plan's thresholds alone
// select), then both against float64.
void expect_plan_matches_reference(LibraryBuffers& buffers, const fsa::AttentionOptions& options,
                                   const fsa::Plan& plan, const Problem& problem,
                                   const Inputs& inputs, const CaseSpec& spec,
                                   bool without_mask = false) {
  fsa::ForwardArgs f = buffers.forward_args(options);
  if (without_mask) f.attn_mask.reset();
  f.plan = &plan;
  fsa::forward(f);
  fsa::BackwardArgs b = buffers.backward_args(options);
  if (without_mask) b.attn_mask.reset();
  b.plan = &plan;
  fsa::backward(b);
  expect_matches_reference(problem, inputs, buffers.outputs(true), spec.dtype,
                           spec.resolved_bias_dtype(), true);
}

// Runs the case through a compacted plan and through the block map alone; both must match float64,
// and the two plans must keep the same entries.
void expect_both_paths_match(const CaseSpec& spec) {
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  const fsa::AttentionOptions options = make_options(spec);
  for (const bool compact : {true, false}) {
    SCOPED_TRACE(compact ? "compacted keys" : "block map");
    LibraryBuffers buffers(problem, inputs, spec.dtype, spec.resolved_bias_dtype());
    const fsa::Plan plan = plan_for(buffers, spec.causal, compact);
    ASSERT_EQ(plan.compacted(), compact);
    expect_plan_matches_reference(buffers, options, plan, problem, inputs, spec);
  }
}

// Keeps `keep` keys per (batch, mask head) row: the largest bias entries (the reference's
// create_mask with attention_mask None), or random keys where the bias has no key dim.
auto top_keys(int64_t keep) {
  return [keep](const Problem& p, const Inputs& in, Rng& rng, std::vector<uint8_t>& mask) {
    const Shape4& ms = *p.mask_shape;
    const int64_t sk = ms[3], rows = ms[0] * ms[1] * ms[2];
    std::vector<double> score(static_cast<size_t>(sk));
    std::vector<int64_t> order(static_cast<size_t>(sk));
    for (int64_t r = 0; r < rows; ++r) {
      for (double& s : score) s = rng.uniform();
      if (p.bias_shape && (*p.bias_shape)[3] == sk &&
          (*p.bias_shape)[0] * (*p.bias_shape)[1] == 1) {
        for (int64_t j = 0; j < sk; ++j) score[size_t(j)] = in.bias[size_t(j)];
      }
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t x, int64_t y) { return score[size_t(x)] > score[size_t(y)]; });
      for (int64_t n = 0; n < std::min(keep, sk); ++n) mask[size_t(r * sk + order[size_t(n)])] = 1;
    }
  };
}

TEST_P(Compaction, KeyMaskPerKvHead_BiasPerKvHead_Gqa2_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 2, 1, 130};
  spec.bias_shape = Shape4{2, 2, 1, 130};
  spec.make_mask = top_keys(23);
  expect_both_paths_match(spec);
}

// A mask head per query head with GQA: each query head reads its own gathered copy of its kv
// head, and dK / dV sum the group's copies.
TEST_P(Compaction, KeyMaskPerQueryHead_SharedBias_Gqa2_NonCausal) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.mask_shape = Shape4{2, 4, 1, 130};
  spec.bias_shape = Shape4{1, 1, 1, 130};
  spec.make_mask = top_keys(40);
  expect_both_paths_match(spec);
}

// One list for every batch and head; a per-head scalar bias (key dim 1), whose gradient sums the
// kept keys; Sq > Sk leaves the first 53 rows empty under causality.
TEST_P(Compaction, SharedKeyMask_KeyDim1Bias_SqAboveSk_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 150, 97, 4, 2, 32);
  spec.causal = true;
  spec.mask_shape = Shape4{1, 1, 1, 97};
  spec.bias_shape = Shape4{2, 4, 1, 1};
  spec.make_mask = top_keys(30);
  expect_both_paths_match(spec);
}

// Sq < Sk (a cached prefix) with an fp32 bias per batch only, summed over heads in the gradient.
TEST_P(Compaction, KeyMask_BatchBias_SqBelowSk_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 61, 200, 4, 4, 64);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 4, 1, 200};
  spec.bias_shape = Shape4{2, 1, 1, 200};
  spec.bias_dtype = DType::kFloat32;
  spec.make_mask = top_keys(50);
  expect_both_paths_match(spec);
}

// A list that keeps nothing (every row of that head empty: zeros, LSE -inf, zero gradients) next
// to one that keeps everything, without bias.
TEST_P(Compaction, EmptyAndFullLists_NoBias) {
  CaseSpec spec = case_spec(GetParam(), 2, 70, 90, 2, 2, 16);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 2, 1, 90};
  spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (int64_t j = 0; j < 90; ++j) {
      mask[size_t(j)] = 0;                          // (b 0, h 0): nothing
      mask[size_t(90 + j)] = 1;                     // (b 0, h 1): everything
      mask[size_t(180 + j)] = rng.bernoulli(0.2);   // (b 1, h 0)
      mask[size_t(270 + j)] = rng.bernoulli(0.05);  // (b 1, h 1)
    }
  };
  expect_both_paths_match(spec);
}

// A mask whose key dim is broadcast too: one flag per (batch, head).
TEST_P(Compaction, PerHeadFlagMask_KeyDimBroadcast) {
  CaseSpec spec = case_spec(GetParam(), 1, 40, 75, 2, 1, 32);
  spec.mask_shape = Shape4{1, 2, 1, 1};
  spec.bias_shape = Shape4{1, 1, 1, 75};
  spec.make_mask = [](const Problem&, const Inputs&, Rng&, std::vector<uint8_t>& mask) {
    mask[0] = 1;
    mask[1] = 0;
  };
  expect_both_paths_match(spec);
}

// Decode: one query row sees every kept key.
TEST_P(Compaction, Decode_KeyMaskAndBiasPerKvHead) {
  CaseSpec spec = case_spec(GetParam(), 3, 1, 1025, 8, 2, 64);
  spec.causal = true;
  spec.mask_shape = Shape4{3, 2, 1, 1025};
  spec.bias_shape = Shape4{3, 2, 1, 1025};
  spec.make_mask = top_keys(100);
  expect_both_paths_match(spec);
}

// Softcap runs over compacted keys like anywhere else.
TEST_P(Compaction, Softcap_KeyMask_Causal) {
  CaseSpec spec = case_spec(GetParam(), 1, 130, 130, 2, 1, 32);
  spec.causal = true;
  spec.softcap = 5.0;
  spec.q_std = 3.0;
  spec.mask_shape = Shape4{1, 1, 1, 130};
  spec.bias_shape = Shape4{1, 1, 1, 130};
  spec.make_mask = top_keys(33);
  expect_both_paths_match(spec);
}

// A bias with a query dim cannot be gathered by key: such calls run the block map of the same plan.
TEST_P(Compaction, FullBiasKeepsTheBlockMap) {
  CaseSpec spec = case_spec(GetParam(), 1, 97, 130, 2, 2, 32);
  spec.causal = true;
  spec.mask_shape = Shape4{1, 2, 1, 130};
  spec.bias_shape = Shape4{1, 2, 97, 130};
  spec.make_mask = top_keys(20);
  expect_both_paths_match(spec);
}

// ---- Per-row top-k (PlanOptions::topk) over compacted keys ---------------------------------------
// The plan lists every key that some row keeps and renumbers the rows' thresholds into slots. The
// library gets only the bias and the plan; the float64 reference gets the per-row mask built here
// as create_mask builds it: each row's bias with the fill wherever causality drops a key, its top
// `window` (ties to the lower index), never a visible entry equal to the fill.

auto per_row_topk(int64_t window, double fill) {
  return [window, fill](const Problem& p, const Inputs& in, Rng&, std::vector<uint8_t>& mask) {
    const Shape4& ms = *p.mask_shape;  // (Bb, Hb, Sq, Sk): the bias's batch and heads
    const int64_t sq = ms[2], sk = ms[3];
    std::vector<double> row(static_cast<size_t>(sk));
    std::vector<int64_t> order(static_cast<size_t>(sk));
    for (int64_t l = 0; l < ms[0] * ms[1]; ++l) {
      const double* bias = in.bias.data() + l * sk;
      for (int64_t i = 0; i < sq; ++i) {
        const int64_t end = p.causal ? std::clamp<int64_t>(i + sk - sq + 1, 0, sk) : sk;
        for (int64_t j = 0; j < sk; ++j) row[size_t(j)] = j < end ? bias[j] : fill;
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t x, int64_t y) { return row[size_t(x)] > row[size_t(y)]; });
        uint8_t* out = mask.data() + (l * sq + i) * sk;
        for (int64_t n = 0; n < std::min(window, sk); ++n) {
          const int64_t j = order[size_t(n)];
          out[j] = j < end && row[size_t(j)] != fill;
        }
      }
    }
  };
}

// Each query tile's gathered slots (the lists a CUDA plan gives its sm90 forward and dQ passes,
// built here by cpu_gather_lists from the same rule) against the float64 mask: exactly the keys
// some row of the tile keeps, the leading full tiles only slots every row keeps, and all of
// those in full tiles before any other slot; at most window + 127 slots; -1 after them.
void expect_gather_lists_match_mask(const fsa::Plan& plan, const std::vector<uint8_t>& mask,
                                    int64_t window) {
  using fsa::detail::GatherLists;
  const fsa::detail::KeyCompaction& c = *plan.compaction();
  const fsa::detail::CompactGeometry& g = c.lists;
  constexpr int kBlockM = 128, kBlockN = 64;  // the sm90 kernels' tiles
  const GatherLists lists = fsa::detail::cpu_gather_lists(c, window, kBlockM, kBlockN);
  const int64_t sq = g.seqlen_q, sk = g.seqlen_k;
  ASSERT_EQ(int64_t(mask.size()), g.list_batch * g.list_heads * sq * sk);
  for (int64_t l = 0; l < g.list_batch * g.list_heads; ++l) {
    for (int64_t m = 0; m < lists.m_blocks; ++m) {
      SCOPED_TRACE("list " + std::to_string(l) + ", query tile " + std::to_string(m));
      const int64_t r0 = m * kBlockM, r1 = std::min<int64_t>(r0 + kBlockM, sq) - 1;
      std::set<int32_t> some_row, every_row;
      for (int64_t j = 0; j < sk; ++j) {
        bool some = false, every = true;
        for (int64_t i = r0; i <= r1; ++i) {
          const bool kept = mask[size_t((l * sq + i) * sk + j)] != 0;
          some = some || kept;
          every = every && kept;
        }
        if (!some) continue;
        const int32_t s = c.slot[l * sk + j];
        ASSERT_GE(s, 0) << "key " << j << " is kept but not listed";
        some_row.insert(s);
        if (every) every_row.insert(s);
      }
      ASSERT_LE(int64_t(some_row.size()), window + kBlockM - 1);
      const int64_t row = l * lists.m_blocks + m;
      const int32_t* list = lists.slots.data() + row * lists.stride;
      const int64_t tiles = lists.tiles[size_t(row)], full = lists.full[size_t(row)];
      ASSERT_LE(tiles * kBlockN, lists.stride);
      std::set<int32_t> listed;
      int64_t x = 0;
      for (; x < lists.stride && list[x] >= 0; ++x) {
        EXPECT_TRUE(listed.insert(list[x]).second) << "slot " << list[x] << " listed twice";
        const bool by_every_row = every_row.count(list[x]) != 0;
        if (x < full * kBlockN) {
          EXPECT_TRUE(by_every_row) << "slot " << list[x] << " in a full tile";
        }
        if (x >= int64_t(every_row.size())) {
          EXPECT_FALSE(by_every_row) << "slot " << list[x] << " after the ones of every row";
        }
      }
      EXPECT_EQ(listed, some_row);
      EXPECT_EQ(tiles, (x + kBlockN - 1) / kBlockN);
      EXPECT_EQ(full, int64_t(every_row.size()) / kBlockN);
      for (; x < lists.stride; ++x) EXPECT_EQ(list[x], -1);
    }
  }
}

// The dK/dV pass's groups (what a CUDA plan gives its sm90 dK/dV pass, built here by cpu_dkv_lists
// from the same rule) against the float64 mask: each list's slots in chunks of consecutive slots,
// each chunk by descending last query tile, then -1; each group visits exactly the query tiles
// where one of its keys is kept by some row, listed full exactly where the group is whole and
// every row of the tile keeps every one of its keys.
// Returns the full (group, query tile) pairs.
int64_t expect_dkv_lists_match_mask(const fsa::Plan& plan, const std::vector<uint8_t>& mask) {
  const fsa::detail::KeyCompaction& c = *plan.compaction();
  const fsa::detail::CompactGeometry& g = c.lists;
  constexpr int kBlockM = 128, kBlockN = 64;  // the sm90 dK/dV pass's tiles
  const fsa::detail::DkvLists lists = fsa::detail::cpu_dkv_lists(c, kBlockM, kBlockN);
  const int64_t sq = g.seqlen_q, sk = g.seqlen_k, stride = lists.n_blocks * kBlockN;
  const int64_t stride_k = fsa::detail::key_last_stride(g.slots);
  int64_t full_pairs = 0;
  for (int64_t l = 0; l < g.list_batch * g.list_heads; ++l) {
    SCOPED_TRACE("list " + std::to_string(l));
    const int32_t* order = lists.slots.data() + l * stride;
    const int32_t* last = c.key_last + l * stride_k;
    const int64_t count = c.count[l];
    std::vector<int32_t> seen(order, order + count);
    std::sort(seen.begin(), seen.end());
    for (int64_t x = 0; x < count; ++x) {
      EXPECT_EQ(seen[size_t(x)], x) << "not a permutation";
      if (seen[size_t(x)] != x) return full_pairs;
    }
    for (int64_t x = count; x < stride; ++x) EXPECT_EQ(order[x], -1);
    // The order: chunks of kDkvChunkGroups * 64 slots in slot order, each by descending last
    // query tile, in slot order among equal tiles (the tile is not shifted at these sizes).
    constexpr int64_t kChunk = 64 * fsa::detail::kDkvChunkGroups;
    for (int64_t x = 1; x < count; ++x) {
      const int32_t s0 = order[x - 1], s1 = order[x];
      const int64_t t0 = last[s0] / kBlockM, t1 = last[s1] / kBlockM;
      EXPECT_TRUE(s0 / kChunk < s1 / kChunk ||
                  (s0 / kChunk == s1 / kChunk && (t0 > t1 || (t0 == t1 && s0 < s1))))
          << "position " << x;
    }
    for (int64_t n = 0; n < lists.n_blocks; ++n) {
      const int64_t col = l * lists.n_blocks + n;
      const int64_t in_group = std::clamp<int64_t>(count - n * kBlockN, 0, kBlockN);
      std::vector<int32_t> want_full, want_partial;
      for (int64_t m = 0; m < lists.m_blocks; ++m) {
        const int64_t r0 = m * kBlockM, r1 = std::min<int64_t>(r0 + kBlockM, sq) - 1;
        bool some = false, every = in_group == kBlockN;
        for (int64_t x = 0; x < in_group; ++x) {
          const int64_t j = c.keys[l * g.slots + order[n * kBlockN + x]];
          for (int64_t i = r0; i <= r1; ++i) {
            const bool kept = mask[size_t((l * sq + i) * sk + j)] != 0;
            some = some || kept;
            every = every && kept;
          }
        }
        if (some) (every ? want_full : want_partial).push_back(int32_t(m));
      }
      auto listed = [&](const std::vector<int32_t>& counts, const std::vector<int32_t>& index) {
        return std::vector<int32_t>(index.begin() + col * lists.m_blocks,
                                    index.begin() + col * lists.m_blocks + counts[size_t(col)]);
      };
      EXPECT_EQ(listed(lists.full_count, lists.full_index), want_full) << "group " << n;
      EXPECT_EQ(listed(lists.partial_count, lists.partial_index), want_partial) << "group " << n;
      full_pairs += int64_t(want_full.size());
    }
  }
  return full_pairs;
}

// Runs the per-row top-k through the compacted plan and through the thresholds over the block map
// alone; both must match float64 with the mask above.
// thresholds_kept: whether the compacted plan must also keep the thresholds (some key's rows are
// not an interval); otherwise each slot's last row alone selects (KeyCompaction::key_last).
// full_dkv_groups: the case must give the dK/dV pass some full (group, query tile) pairs.
// several_chunks: some list must hold more slots than one chunk of the dK/dV order.
void expect_topk_paths_match(CaseSpec spec, int64_t window, double fill,
                             double max_tile_fraction = 1.0, bool thresholds_kept = false,
                             bool full_dkv_groups = false, bool several_chunks = false) {
  spec.make_mask = per_row_topk(window, fill);
  const Shape4& bs = *spec.bias_shape;
  spec.mask_shape = Shape4{bs[0], bs[1], spec.seqlen_q, spec.seqlen_k};
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  const fsa::AttentionOptions options = make_options(spec);
  for (const bool compact : {true, false}) {
    SCOPED_TRACE(compact ? "compacted keys" : "thresholds over the block map");
    LibraryBuffers buffers(problem, inputs, spec.dtype, spec.resolved_bias_dtype());
    fsa::PlanOptions po;
    po.compact_keys = compact ? fsa::CompactKeys::kAlways : fsa::CompactKeys::kNever;
    po.topk_bias = buffers.bias->view();
    po.topk = window;
    po.topk_min_value = fill;
    const fsa::Plan plan =
        fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, spec.causal, po);
    ASSERT_EQ(plan.compacted(), compact);
    if (compact) {
      EXPECT_LE(plan.compacted_tile_fraction(), max_tile_fraction);
      ASSERT_NE(plan.compaction()->key_last, nullptr);
      EXPECT_EQ(plan.compaction()->row_topk.key != nullptr, thresholds_kept);
      if (thresholds_kept) {  // some key's rows are not an interval: no gathered lists
        EXPECT_THROW(fsa::detail::cpu_gather_lists(*plan.compaction(), window, 128, 64),
                     fsa::Error);
        EXPECT_THROW(fsa::detail::cpu_dkv_lists(*plan.compaction(), 128, 64), fsa::Error);
      } else {
        expect_gather_lists_match_mask(plan, inputs.mask, window);
        const int64_t full_pairs = expect_dkv_lists_match_mask(plan, inputs.mask);
        if (full_dkv_groups) {
          EXPECT_GT(full_pairs, 0);
        }
        if (several_chunks) {
          const fsa::detail::KeyCompaction& c = *plan.compaction();
          const int64_t lists = c.lists.list_batch * c.lists.list_heads;
          const int32_t most = *std::max_element(c.count, c.count + lists);
          EXPECT_GT(most, 64 * fsa::detail::kDkvChunkGroups);
        }
      }
    }
    // The selection comes from the plan's thresholds alone.
    expect_plan_matches_reference(buffers, options, plan, problem, inputs, spec, true);
  }
}

constexpr double kBf16Lowest = -3.3895313892515355e38;

// Doge's shape: bias per kv head, GQA 2, causal; bf16 values repeat (ties across rows). The
// compacted map visits well under the causal triangle's half of the tiles.
TEST(CompactionTopk, PerKvHeadBias_Gqa2_Causal_Bf16) {
  CaseSpec spec = case_spec(DType::kBFloat16, 2, 300, 300, 4, 2, 32);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 2, 1, 300};
  expect_topk_paths_match(spec, 25, kBf16Lowest, 0.45);
}

// A window wider than the dK/dV pass's 64-slot groups over several query tiles: groups of keys
// that every row of a tile keeps (full pairs) next to partial ones, and a ragged last tile.
TEST(CompactionTopk, WideWindow_DkvGroups_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 900, 900, 2, 1, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 1, 1, 900};
  expect_topk_paths_match(spec, 200, -3.4028234663852886e38, 1.0, false, true);
}

// More kept keys than one chunk of the dK/dV order (core/dkv_order.h): groups from two chunks,
// each by last query tile, still visit exactly the tiles with a kept entry.
TEST(CompactionTopk, ManySlots_DkvChunks_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 3000, 3000, 1, 1, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 1, 1, 3000};
  expect_topk_paths_match(spec, 512, -3.4028234663852886e38, 1.0, false, true, true);
}

// The dK/dV order's sort key (core/dkv_order.h) where list, chunk and last tile need more than 32
// bits: the last tile is coarsened, and the key still orders by list, then chunk, then descending
// tile, with a slot past its list's count after every counted slot of its chunk.
TEST(CompactionTopk, DkvSlotKeyFitsIn32Bits) {
  using fsa::detail::dkv_key_bits;
  using fsa::detail::dkv_slot_key;
  constexpr int kBlockM = 128, kChunk = 64 * fsa::detail::kDkvChunkGroups;
  const int64_t lists = int64_t(1) << 12, stride = int64_t(1) << 19, m_blocks = int64_t(1) << 14;
  const fsa::detail::DkvKeyBits bits = dkv_key_bits(lists, stride, m_blocks);
  EXPECT_EQ(bits.list_bits, 12);
  EXPECT_EQ(bits.chunk_bits, 9);
  EXPECT_EQ(bits.list_bits + bits.chunk_bits + bits.tile_bits, 32);
  EXPECT_EQ(bits.tile_shift, 3);
  const int32_t count = int32_t(stride) - 100, last_row = int32_t(m_blocks * kBlockM) - 1;
  auto key = [&](int64_t list, int32_t slot, int32_t last) {
    return dkv_slot_key(bits, list, slot, count, last, kBlockM);
  };
  // Descending last tile within a chunk, coarsened by 2^3 tiles.
  EXPECT_LT(key(5, 10, last_row), key(5, 11, 0));
  EXPECT_EQ(key(5, 10, 8 * kBlockM - 1), key(5, 11, 0));
  EXPECT_LT(key(5, 10, 8 * kBlockM), key(5, 11, 0));
  // Chunk before tile, list before chunk.
  EXPECT_LT(key(5, kChunk - 1, 0), key(5, kChunk, last_row));
  EXPECT_LT(key(5, int32_t(stride) - 1, 0), key(6, 0, last_row));
  EXPECT_LT(key(lists - 2, int32_t(stride) - 1, 0), key(lists - 1, 0, last_row));
  // A slot past the count: after every counted slot of its chunk, before the next list.
  EXPECT_GE(key(7, count, -1), key(7, count - 1, 0));
  EXPECT_GE(key(7, count + 5, -1), key(7, count - 2, last_row));
  EXPECT_LT(key(7, int32_t(stride) - 1, -1), key(8, 0, last_row));
  // Small extents keep every tile bit.
  const fsa::detail::DkvKeyBits small = dkv_key_bits(8, 16384, 128);
  EXPECT_EQ(small.tile_shift, 0);
  EXPECT_EQ(small.tile_bits, 7);
  EXPECT_EQ(small.chunk_bits, 4);
  EXPECT_EQ(small.list_bits, 3);
}

// Sq > Sk: the first rows see nothing (empty rows, exact zeros); one shared bias.
TEST(CompactionTopk, SharedBias_SqAboveSk_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 150, 97, 2, 1, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 1, 1, 97};
  expect_topk_paths_match(spec, 20, -3.4028234663852886e38);
}

// A bias per query head with GQA: each query head has its own lists and gathered K / V copy; Sq <
// Sk (a cached prefix) and a window longer than some rows' candidates.
TEST(CompactionTopk, PerQueryHeadBias_SqBelowSk_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 61, 200, 4, 2, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 4, 1, 200};
  expect_topk_paths_match(spec, 150, -3.4028234663852886e38);
}

// A fill inside the values' range (most values below it): entries below the fill rank under the
// dropped keys, so the last rows, which drop few keys, keep some of them that earlier rows did
// not. Their rows start after the first that sees them: the plan keeps the thresholds (in slots).
TEST(CompactionTopk, FillInsideTheValues_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 130, 130, 2, 2, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 2, 1, 130};
  expect_topk_paths_match(spec, 12, 1.5, 1.0, true);
}

// The same fill above only a few values: every kept key's rows still start where it is first seen.
TEST(CompactionTopk, FillBelowMostValues_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 130, 130, 2, 2, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 2, 1, 130};
  expect_topk_paths_match(spec, 12, -0.25);
}

// Without causality every row keeps the same keys: one list of `window` keys.
TEST(CompactionTopk, NonCausal_Bf16) {
  CaseSpec spec = case_spec(DType::kBFloat16, 2, 97, 130, 2, 2, 32);
  spec.bias_shape = Shape4{2, 2, 1, 130};
  expect_topk_paths_match(spec, 17, kBf16Lowest);
}

// ---- A mask with a query dim whose rows are one interval per key (mask_key_intervals) ------------
// The library gets the (B, H, Sq, Sk) bool mask and a plan promising intervals: the plan lists the
// keys some row keeps, ordered by their first row, each with its first and last row, and the
// calls run them as per-row top-k's. The lists' rules (gathered per query tile, dK/dV groups) are
// checked against the mask, and forward + backward against float64 with the mask.

// Every key kept by one random run of rows or by none: runs start anywhere, so the order of the
// first rows is not the keys' order.
auto random_key_intervals(int64_t max_rows) {
  return [max_rows](const Problem& p, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    const Shape4& ms = *p.mask_shape;
    const int64_t sq = ms[2], sk = ms[3];
    std::fill(mask.begin(), mask.end(), uint8_t(0));
    for (int64_t l = 0; l < ms[0] * ms[1]; ++l) {
      for (int64_t j = 0; j < sk; ++j) {
        if (rng.bernoulli(0.2)) continue;
        const int64_t first = int64_t(rng.next() % uint64_t(sq));
        const int64_t rows = 1 + int64_t(rng.next() % uint64_t(max_rows));
        for (int64_t i = first; i < std::min(first + rows, sq); ++i) mask[size_t((l * sq + i) * sk + j)] = 1;
      }
    }
  };
}

// window: a bound on the slots a row keeps (the gathered lists' window + 127 check).
void expect_interval_path_matches(CaseSpec spec, int64_t window) {
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  const fsa::AttentionOptions options = make_options(spec);
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.resolved_bias_dtype());
  ASSERT_TRUE(fsa::mask_rows_are_intervals(buffers.q.view(), buffers.k.view(),
                                           buffers.mask->view(), spec.causal));
  fsa::PlanOptions po;
  po.mask_key_intervals = true;
  po.compact_keys = fsa::CompactKeys::kAlways;
  const fsa::Plan plan =
      fsa::make_plan(buffers.q.view(), buffers.k.view(), buffers.mask->view(), spec.causal, po);
  ASSERT_TRUE(plan.compacted());
  const fsa::detail::KeyCompaction& c = *plan.compaction();
  ASSERT_NE(c.key_last, nullptr);
  ASSERT_NE(c.key_first, nullptr);
  // Slots by first row: row i sees exactly the slots whose first row is <= i.
  const int64_t stride = fsa::detail::key_last_stride(c.lists.slots);
  for (int64_t l = 0; l < c.lists.list_batch * c.lists.list_heads; ++l) {
    for (int64_t s = 1; s < c.count[l]; ++s) {
      ASSERT_LE(c.key_first[l * stride + s - 1], c.key_first[l * stride + s]);
    }
  }
  // The entries kept: the mask AND causality (bottom-right).
  std::vector<uint8_t> kept = inputs.mask;
  const int64_t sq = spec.seqlen_q, sk = spec.seqlen_k;
  for (size_t x = 0; spec.causal && x < kept.size(); ++x) {
    const int64_t i = int64_t(x / size_t(sk)) % sq, j = int64_t(x % size_t(sk));
    if (j > i + sk - sq) kept[x] = 0;
  }
  expect_gather_lists_match_mask(plan, kept, window);
  expect_dkv_lists_match_mask(plan, kept);
  expect_plan_matches_reference(buffers, options, plan, problem, inputs, spec);
}

// The reference benchmark's mask: create_mask's per-row causal top-k, handed over as a tensor.
TEST(CompactionIntervals, PerRowTopkMask_Gqa2_Causal_Bf16) {
  CaseSpec spec = case_spec(DType::kBFloat16, 2, 300, 300, 4, 2, 32);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 2, 1, 300};
  spec.mask_shape = Shape4{2, 2, 300, 300};
  spec.make_mask = per_row_topk(25, kBf16Lowest);
  expect_interval_path_matches(spec, 25);
}

// Runs starting anywhere (first rows out of key order), Sq < Sk, causal: the mask AND causality.
TEST(CompactionIntervals, RandomRuns_SqBelowSk_Causal_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 257, 300, 4, 1, 16);
  spec.causal = true;
  spec.bias_shape = Shape4{1, 1, 1, 300};
  spec.mask_shape = Shape4{1, 4, 257, 300};  // a list per query head (GQA 4)
  spec.make_mask = random_key_intervals(90);
  expect_interval_path_matches(spec, 300);
}

// Not causal, Sq > Sk, no bias: empty rows and keys no row keeps.
TEST(CompactionIntervals, RandomRuns_SqAboveSk_Fp32) {
  CaseSpec spec = case_spec(DType::kFloat32, 2, 200, 150, 2, 2, 16);
  spec.mask_shape = Shape4{2, 1, 200, 150};
  spec.make_mask = random_key_intervals(40);
  expect_interval_path_matches(spec, 150);
}

// A key kept by two runs of rows: the check says no, and a plan promising intervals raises.
TEST(CompactionIntervals, TwoRunsAreRefused) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 200, 150, 2, 2, 16);
  spec.mask_shape = Shape4{1, 1, 200, 150};
  spec.make_mask = [](const Problem& p, const Inputs& in, Rng& rng, std::vector<uint8_t>& mask) {
    random_key_intervals(40)(p, in, rng, mask);
    mask[size_t(10 * 150 + 7)] = mask[size_t(150 * 150 + 7)] = 1;
    for (int64_t i = 11; i < 150; ++i) mask[size_t(i * 150 + 7)] = 0;  // key 7: rows 10 and 150
  };
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.resolved_bias_dtype());
  EXPECT_FALSE(fsa::mask_rows_are_intervals(buffers.q.view(), buffers.k.view(),
                                            buffers.mask->view(), false));
  fsa::PlanOptions po;
  po.mask_key_intervals = true;
  try {
    fsa::make_plan(buffers.q.view(), buffers.k.view(), buffers.mask->view(), false, po);
    ADD_FAILURE() << "expected an attn_mask error";
  } catch (const fsa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("attn_mask"), std::string::npos) << e.what();
  }
  po.mask_key_intervals = true;
  EXPECT_THROW(fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, false, po),
               fsa::Error);  // no mask to promise anything about
}

// ---- Packed sequences (PlanOptions::packed) ------------------------------------------------------
// The library gets one row of sequences (batch 1), their offsets and no mask; the float64
// reference gets the equivalent (1, 1, total_q, total_k) mask: a row sees the keys of its own
// sequence, from the sequence's bottom-right causal diagonal on when causal.

struct PackedCase {
  std::vector<int32_t> cu_q, cu_k;
};

PackedCase packed_offsets(const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k) {
  PackedCase c{{0}, {0}};
  for (size_t s = 0; s < lens_q.size(); ++s) {
    c.cu_q.push_back(c.cu_q.back() + lens_q[s]);
    c.cu_k.push_back(c.cu_k.back() + lens_k[s]);
  }
  return c;
}

void expect_packed_matches_reference(DType dtype, const std::vector<int32_t>& lens_q,
                                     const std::vector<int32_t>& lens_k, bool causal,
                                     bool with_bias) {
  const PackedCase pc = packed_offsets(lens_q, lens_k);
  const int64_t tq = pc.cu_q.back(), tk = pc.cu_k.back();
  CaseSpec spec = case_spec(dtype, 1, tq, tk, 4, 2, 32);
  spec.causal = false;  // the reference's mask holds each sequence's causality
  spec.mask_shape = Shape4{1, 1, tq, tk};
  if (with_bias) spec.bias_shape = Shape4{1, 2, 1, tk};
  spec.make_mask = [&pc, causal](const Problem&, const Inputs&, Rng&, std::vector<uint8_t>& mask) {
    const int64_t tk_ = pc.cu_k.back();
    std::fill(mask.begin(), mask.end(), uint8_t(0));
    for (size_t s = 0; s + 1 < pc.cu_q.size(); ++s) {
      const int32_t q0 = pc.cu_q[s], q1 = pc.cu_q[s + 1], k0 = pc.cu_k[s], k1 = pc.cu_k[s + 1];
      for (int32_t i = q0; i < q1; ++i) {
        for (int32_t j = k0; j < k1; ++j) {
          const bool seen = !causal || (j - k0) <= (i - q0) + (k1 - k0) - (q1 - q0);
          mask[size_t(i * tk_ + j)] = seen ? 1 : 0;
        }
      }
    }
  };
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  fsa::AttentionOptions options = make_options(spec);
  options.is_causal = causal;
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.resolved_bias_dtype());
  fsa::PlanOptions po;
  po.packed = fsa::PlanOptions::PackedSequences{pc.cu_q.data(), pc.cu_k.data(),
                                                int64_t(lens_q.size())};
  const fsa::Plan plan =
      fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, causal, po);
  ASSERT_TRUE(plan.compacted());
  // The kept entries are exactly the reference mask's.
  int64_t kept = 0;
  for (const uint8_t m : inputs.mask) kept += m;
  EXPECT_EQ(int64_t(plan.compaction()->plan.kept_density() * double(tq * tk) + 0.5), kept);
  expect_plan_matches_reference(buffers, options, plan, problem, inputs, spec, true);
}

TEST(CompactionPacked, RaggedLengths_Causal_Bias_Fp32) {
  expect_packed_matches_reference(DType::kFloat32, {0, 1, 127, 128, 129, 64, 65},
                                  {0, 1, 127, 128, 129, 64, 65}, true, true);
}

TEST(CompactionPacked, RaggedLengths_Causal_Bf16) {
  expect_packed_matches_reference(DType::kBFloat16, {70, 0, 1, 129, 3},
                                  {70, 0, 1, 129, 3}, true, false);
}

// Query and key lengths differ per sequence (bottom-right causality per sequence), sequences
// without keys (empty rows) and without queries (keys no row sees).
TEST(CompactionPacked, QueriesAndKeysDiffer_Causal_Bias_Fp32) {
  expect_packed_matches_reference(DType::kFloat32, {5, 0, 40, 3, 90}, {20, 7, 30, 0, 150}, true,
                                  true);
}

TEST(CompactionPacked, QueriesAndKeysDiffer_NonCausal_Bias_Bf16) {
  expect_packed_matches_reference(DType::kBFloat16, {5, 0, 40, 3, 90}, {20, 7, 30, 0, 150}, false,
                                  true);
}

TEST(CompactionPacked, BadInputIsNamed) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 10, 10, 2, 2, 16);
  spec.bias_shape = Shape4{1, 2, 10, 10};  // a bias with a query dim: refused by packed calls
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.dtype);
  auto expect_error = [&](fsa::PlanOptions po, const std::string& name) {
    try {
      fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, true, po);
      ADD_FAILURE() << "expected an error naming " << name;
    } catch (const fsa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  const std::vector<int32_t> good = {0, 4, 10}, decreasing = {0, 6, 4}, short_end = {0, 4, 9};
  fsa::PlanOptions po;
  po.packed = fsa::PlanOptions::PackedSequences{decreasing.data(), good.data(), 2};
  expect_error(po, "cu_seqlens_q");
  po.packed = fsa::PlanOptions::PackedSequences{good.data(), short_end.data(), 2};
  expect_error(po, "cu_seqlens_k");
  po.packed = fsa::PlanOptions::PackedSequences{good.data(), nullptr, 2};
  expect_error(po, "cu_seqlens_k");
  po.packed = fsa::PlanOptions::PackedSequences{good.data(), good.data(), 2};
  po.compact_keys = fsa::CompactKeys::kNever;
  expect_error(po, "compact_keys");
  po.compact_keys = fsa::CompactKeys::kAuto;
  // A bias with a query dim cannot run over the compacted keys, and the plan has no other map.
  const fsa::Plan plan = fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, true, po);
  fsa::ForwardArgs f = buffers.forward_args(make_options(spec));
  f.options.is_causal = true;
  f.plan = &plan;
  try {
    fsa::forward(f);
    ADD_FAILURE() << "expected an attn_bias error";
  } catch (const fsa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("attn_bias"), std::string::npos) << e.what();
  }
}

TEST(CompactionPlan, KeepsTheSameEntriesAndVisitsFewerTiles) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 1024, 1024, 2, 2, 16);
  spec.causal = true;
  spec.mask_shape = Shape4{1, 2, 1, 1024};
  spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (uint8_t& m : mask) m = rng.bernoulli(0.125) ? 1 : 0;  // scattered: every tile partial
  };
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.dtype);
  const fsa::Plan compacted = plan_for(buffers, true, true);
  const fsa::Plan blocks = plan_for(buffers, true, false);
  ASSERT_TRUE(compacted.compacted());
  ASSERT_FALSE(blocks.compacted());
  // The block map of a compacted plan is still there (for calls with a full bias) and the same.
  EXPECT_DOUBLE_EQ(compacted.kept_density(), blocks.kept_density());
  EXPECT_DOUBLE_EQ(compacted.visited_tile_fraction(), blocks.visited_tile_fraction());
  // The compacted map keeps exactly the same (query, key) pairs ...
  EXPECT_DOUBLE_EQ(compacted.compaction()->plan.kept_density(), blocks.kept_density());
  // ... over about 1/8 of the tiles: every causal tile of the block map is visited.
  EXPECT_GT(blocks.visited_tile_fraction(), 0.5);
  EXPECT_LT(compacted.compacted_tile_fraction(), 0.2);
  EXPECT_EQ(blocks.compacted_tile_fraction(), 0.0);
}

TEST(CompactionPlan, AutoCompactsFromOneFullQueryTile) {
  for (const int64_t sq : {1, 127, 128, 300}) {
    CaseSpec spec = case_spec(DType::kFloat32, 1, sq, 64, 2, 2, 16);
    spec.mask_shape = Shape4{1, 2, 1, 64};
    const Problem problem = make_problem(spec);
    const Inputs inputs = make_inputs(spec, problem);
    LibraryBuffers buffers(problem, inputs, spec.dtype, spec.dtype);
    EXPECT_EQ(plan_for(buffers, true, true, fsa::CompactKeys::kAuto).compacted(), sq >= 128)
        << "seqlen_q " << sq;
  }
}

TEST(CompactionPlan, OnlyKeyOnlyMasksAreCompacted) {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 64, 64, 2, 2, 16);
  spec.mask_shape = Shape4{1, 2, 64, 64};
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  LibraryBuffers buffers(problem, inputs, spec.dtype, spec.dtype);
  EXPECT_FALSE(plan_for(buffers, false, true).compacted());  // a mask with a query dim
  fsa::PlanOptions options;
  EXPECT_FALSE(fsa::make_plan(buffers.q.view(), buffers.k.view(), std::nullopt, true, options)
                   .compacted());  // no mask
}

}  // namespace
}  // namespace fsa_test
