// Block-map planning (fsa::make_plan) checked tile by tile against the mask it was built from:
// a tile with no kept entry is in no list, a tile whose every in-range entry is kept is full, any
// other tile with a kept entry is partial; lists ascend without duplicates; the transposed lists
// hold the same (query block, key block) pairs; kept_entries counts the kept entries.

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "harness.h"
#include "test_dtypes.h"

namespace fsa_test {
namespace {

using fsa::DType;

// Keep predicate of the problem: mask AND causality AND block selection, for (b, h, i, j).
using KeepFn = std::function<bool(int64_t, int64_t, int64_t, int64_t)>;

struct Geometry {
  int64_t batch, seqlen_q, seqlen_k, heads, kv_heads;
};

// make_plan reads only the shapes of query and key: stride-0 views over one head_dim row.
struct ShapeViews {
  std::vector<float> row = std::vector<float>(8, 0.0f);
  fsa::TensorView query, key;
  explicit ShapeViews(const Geometry& g) {
    query = make_view(row.data(), DType::kFloat32, {g.batch, g.seqlen_q, g.heads, 8}, {0, 0, 0, 1});
    key =
        make_view(row.data(), DType::kFloat32, {g.batch, g.seqlen_k, g.kv_heads, 8}, {0, 0, 0, 1});
  }
};

bool causal_keep(const Geometry& g, int64_t i, int64_t j) {
  return j <= i + g.seqlen_k - g.seqlen_q;
}

enum class Tile : int8_t { kSkipped, kFull, kPartial };

// Expected tile kinds of problem (b, h), from the keep predicate: (m_blocks, n_blocks).
std::vector<Tile> expected_tiles(const fsa::BlockMap& map, const Geometry& g, const KeepFn& keep,
                                 int64_t b, int64_t h) {
  std::vector<int64_t> kept(map.m_blocks * map.n_blocks, 0);
  for (int64_t i = 0; i < g.seqlen_q; ++i) {
    for (int64_t j = 0; j < g.seqlen_k; ++j) {
      if (keep(b, h, i, j)) ++kept[(i / map.block_m) * map.n_blocks + j / map.block_n];
    }
  }
  std::vector<Tile> tiles(kept.size());
  for (int64_t m = 0; m < map.m_blocks; ++m) {
    for (int64_t n = 0; n < map.n_blocks; ++n) {
      const int64_t rows = std::min<int64_t>(map.block_m, g.seqlen_q - m * map.block_m);
      const int64_t cols = std::min<int64_t>(map.block_n, g.seqlen_k - n * map.block_n);
      const int64_t k = kept[m * map.n_blocks + n];
      tiles[m * map.n_blocks + n] =
          k == 0 ? Tile::kSkipped : (k == rows * cols ? Tile::kFull : Tile::kPartial);
    }
  }
  return tiles;
}

// Tile kinds of map (mb, mh) as the plan lists them, checking list order and disjointness.
std::vector<Tile> planned_tiles(const fsa::Plan& plan, int64_t mb, int64_t mh) {
  const fsa::BlockMap& map = plan.map();
  std::vector<Tile> tiles(map.m_blocks * map.n_blocks, Tile::kSkipped);
  for (int64_t m = 0; m < map.m_blocks; ++m) {
    for (const auto& [span, kind] : {std::pair{plan.full_blocks(mb, mh, m), Tile::kFull},
                                     std::pair{plan.partial_blocks(mb, mh, m), Tile::kPartial}}) {
      for (int64_t e = 0; e < span.size(); ++e) {
        const int32_t n = span[e];
        EXPECT_TRUE(n >= 0 && n < map.n_blocks) << "key block " << n << " out of range";
        if (n < 0 || n >= map.n_blocks) continue;
        if (e > 0) {
          EXPECT_LT(span[e - 1], n) << "list not strictly ascending at m " << m;
        }
        EXPECT_EQ(tiles[m * map.n_blocks + n], Tile::kSkipped)
            << "tile (" << m << ", " << n << ") listed twice";
        tiles[m * map.n_blocks + n] = kind;
      }
    }
  }
  return tiles;
}

// The transposed lists must hold exactly the forward lists' pairs, ascending in m.
void expect_transposed_lists_consistent(const fsa::Plan& plan, int64_t mb, int64_t mh,
                                        const std::vector<Tile>& tiles) {
  const fsa::BlockMap& map = plan.map();
  for (int64_t n = 0; n < map.n_blocks; ++n) {
    for (const auto& [span, kind] :
         {std::pair{plan.full_query_blocks(mb, mh, n), Tile::kFull},
          std::pair{plan.partial_query_blocks(mb, mh, n), Tile::kPartial}}) {
      std::vector<int32_t> expected;
      for (int64_t m = 0; m < map.m_blocks; ++m) {
        if (tiles[m * map.n_blocks + n] == kind) expected.push_back(static_cast<int32_t>(m));
      }
      const std::vector<int32_t> got(span.begin(), span.end());
      EXPECT_EQ(got, expected) << "transposed " << (kind == Tile::kFull ? "full" : "partial")
                               << " list of key block " << n << ", map (" << mb << ", " << mh
                               << ")";
    }
  }
}

// Checks the plan against `keep` for the listed problem (b, h) pairs (all of them by default).
void expect_plan_matches(const fsa::Plan& plan, const Geometry& g, const KeepFn& keep,
                         std::vector<std::pair<int64_t, int64_t>> pairs = {}) {
  ASSERT_TRUE(plan.valid());
  const fsa::BlockMap& map = plan.map();
  EXPECT_EQ(map.m_blocks, (g.seqlen_q + map.block_m - 1) / map.block_m);
  EXPECT_EQ(map.n_blocks, (g.seqlen_k + map.block_n - 1) / map.block_n);
  if (pairs.empty()) {
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t h = 0; h < g.heads; ++h) pairs.emplace_back(b, h);
    }
  }
  for (const auto& [b, h] : pairs) {
    const int64_t mb = plan.map_batch(b), mh = plan.map_head(h);
    ASSERT_TRUE(mb >= 0 && mb < map.batch && mh >= 0 && mh < map.heads);
    const std::vector<Tile> expected = expected_tiles(map, g, keep, b, h);
    const std::vector<Tile> got = planned_tiles(plan, mb, mh);
    for (int64_t m = 0; m < map.m_blocks; ++m) {
      for (int64_t n = 0; n < map.n_blocks; ++n) {
        EXPECT_EQ(static_cast<int>(got[m * map.n_blocks + n]),
                  static_cast<int>(expected[m * map.n_blocks + n]))
            << "tile (" << m << ", " << n << ") of problem (b " << b << ", h " << h
            << "): 0 skipped, 1 full, 2 partial";
      }
    }
    expect_transposed_lists_consistent(plan, mb, mh, got);
  }
}

// kept_entries sums the map's own (batch, head) entries: one representative problem pair each.
int64_t count_map_kept(const fsa::Plan& plan, const Geometry& g, const KeepFn& keep) {
  int64_t kept = 0;
  for (int64_t mb = 0; mb < plan.map().batch; ++mb) {
    for (int64_t mh = 0; mh < plan.map().heads; ++mh) {
      const int64_t h = mh * (g.heads / plan.map().heads);
      for (int64_t i = 0; i < g.seqlen_q; ++i) {
        for (int64_t j = 0; j < g.seqlen_k; ++j) kept += keep(mb, h, i, j);
      }
    }
  }
  return kept;
}

TEST(Plan, CausalWithoutMask_DiagonalTilesPartial_BelowFull_AboveSkipped) {
  const Geometry g{2, 256, 256, 4, 2};
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, std::nullopt, true);
  ASSERT_TRUE(plan.valid());
  EXPECT_EQ(plan.map().batch, 1) << "nothing varies with batch";
  EXPECT_EQ(plan.map().heads, 1) << "nothing varies with heads";
  EXPECT_EQ(plan.map().block_m, 64) << "the CPU default tile (plan.h)";
  EXPECT_EQ(plan.map().block_n, 64) << "the CPU default tile (plan.h)";
  for (int32_t m = 0; m < 4; ++m) {
    std::vector<int32_t> below(m);
    for (int32_t n = 0; n < m; ++n) below[n] = n;
    const fsa::BlockSpan full = plan.full_blocks(0, 0, m), partial = plan.partial_blocks(0, 0, m);
    EXPECT_EQ(std::vector<int32_t>(full.begin(), full.end()), below) << "m " << m;
    EXPECT_EQ(std::vector<int32_t>(partial.begin(), partial.end()), std::vector<int32_t>{m})
        << "m " << m;
  }
  const KeepFn keep = [&](int64_t, int64_t, int64_t i, int64_t j) { return causal_keep(g, i, j); };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, 256 * 257 / 2);
  EXPECT_DOUBLE_EQ(plan.kept_density(), (256.0 * 257.0 / 2.0) / (256.0 * 256.0));
  EXPECT_DOUBLE_EQ(plan.visited_tile_fraction(), 10.0 / 16.0);
}

// Bottom-right alignment with ragged tiles: Sq < Sk (every row sees a prefix longer than its
// index) and Sq > Sk (the first Sq - Sk rows see nothing, so whole query blocks have no tiles).
TEST(Plan, CausalBottomRight_SqBelowAndAboveSk_RaggedTiles) {
  for (const auto& [sq, sk] : {std::pair<int64_t, int64_t>{100, 300}, {300, 100}, {1, 1025}}) {
    SCOPED_TRACE("Sq " + std::to_string(sq) + ", Sk " + std::to_string(sk));
    const Geometry g{1, sq, sk, 2, 1};
    ShapeViews views(g);
    const fsa::Plan plan = fsa::make_plan(views.query, views.key, std::nullopt, true);
    const KeepFn keep = [&](int64_t, int64_t, int64_t i, int64_t j) {
      return causal_keep(g, i, j);
    };
    expect_plan_matches(plan, g, keep);
    EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
    if (sq > sk) {
      // Rows 0..199 see nothing: query blocks 0..2 (rows 0..191) have no tiles at all.
      for (int64_t m = 0; m < 3; ++m) {
        EXPECT_TRUE(plan.full_blocks(0, 0, m).empty() && plan.partial_blocks(0, 0, m).empty());
      }
    }
  }
}

// Tile (m, n) of a (1,1,256,256) mask is all False, all True or mixed by (m + n) % 3.
TEST(Plan, WholeFalseTilesAreNeverListed_AllTrueTilesAreFull_MixedArePartial) {
  const Geometry g{1, 256, 256, 2, 2};
  std::vector<uint8_t> mask(256 * 256);
  Rng rng(11);
  for (int64_t i = 0; i < 256; ++i) {
    for (int64_t j = 0; j < 256; ++j) {
      const int64_t kind = (i / 64 + j / 64) % 3;
      const bool corner = (i % 64 == 0 && j % 64 == 0);  // guarantees mixed tiles are mixed
      mask[i * 256 + j] =
          kind == 1 || (kind == 2 && (corner || (j % 64 != 1 && rng.bernoulli(0.5))));
    }
  }
  HostTensor mask_tensor = HostTensor::from_mask({1, 1, 256, 256}, mask);
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, mask_tensor.view(), false);
  for (int64_t m = 0; m < 4; ++m) {
    for (int64_t n = 0; n < 4; ++n) {
      const fsa::BlockSpan full = plan.full_blocks(0, 0, m), partial = plan.partial_blocks(0, 0, m);
      const bool in_full = std::find(full.begin(), full.end(), n) != full.end();
      const bool in_partial = std::find(partial.begin(), partial.end(), n) != partial.end();
      const int64_t kind = (m + n) % 3;
      EXPECT_EQ(in_full, kind == 1) << "tile (" << m << ", " << n << ")";
      EXPECT_EQ(in_partial, kind == 2) << "tile (" << m << ", " << n << ")";
    }
  }
  const KeepFn keep = [&](int64_t, int64_t, int64_t i, int64_t j) {
    return mask[i * 256 + j] != 0;
  };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
}

// A key-only mask (1,1,1,Sk) with causality: key block 0 all True, 1 all False, 2 mixed, the
// ragged block 3 (Sk = 200) all True.
TEST(Plan, KeyOnlyMask_CombinedWithCausal) {
  const Geometry g{2, 200, 200, 4, 2};
  std::vector<uint8_t> mask(200);
  for (int64_t j = 0; j < 200; ++j) mask[j] = j < 64 || (j >= 128 && (j % 3 != 0 || j >= 192));
  HostTensor mask_tensor = HostTensor::from_mask({1, 1, 1, 200}, mask);
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, mask_tensor.view(), true);
  EXPECT_EQ(plan.map().batch, 1);
  EXPECT_EQ(plan.map().heads, 1);
  const KeepFn keep = [&](int64_t, int64_t, int64_t i, int64_t j) {
    return mask[j] != 0 && causal_keep(g, i, j);
  };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
}

// Sk bytes of memory with an inaccessible page on either side: reading outside them faults.
class GuardedBytes {
 public:
  explicit GuardedBytes(size_t size) {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t body = (size + page_ - 1) / page_ * page_;
    total_ = body + 2 * page_;
    void* base = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return;
    base_ = static_cast<uint8_t*>(base);
    mprotect(base_, page_, PROT_NONE);
    mprotect(base_ + page_ + body, page_, PROT_NONE);
    data_ = base_ + page_ + body - size;  // ends exactly at the trailing guard page
  }
  ~GuardedBytes() {
    if (base_) munmap(base_, total_);
  }
  GuardedBytes(const GuardedBytes&) = delete;
  GuardedBytes& operator=(const GuardedBytes&) = delete;
  uint8_t* data() const { return data_; }

 private:
  size_t page_ = 0, total_ = 0;
  uint8_t* base_ = nullptr;
  uint8_t* data_ = nullptr;
};

// A (B, H, Sq, Sk) = (4, 16, 4096, 8192) mask expanded with strides (0, 0, 0, 1) from one key row
// of Sk bytes (guard pages around it): 2^31 logical entries. The plan must treat the expanded
// dims as broadcast (map batch = heads = 1) and never read outside the Sk bytes; materializing it
// would need 2 GiB.
TEST(Plan, Stride0ExpandedMask_ReadAsBroadcastWithinItsBuffer) {
  const Geometry g{4, 4096, 8192, 16, 4};
  GuardedBytes row(8192);
  ASSERT_NE(row.data(), nullptr);
  for (int64_t j = 0; j < 8192; ++j)
    row.data()[j] = (j / 64) % 4 == 1 ? 0 : ((j / 64) % 4 != 2 || j % 2);
  const fsa::TensorView expanded =
      make_view(row.data(), DType::kBool, {4, 16, 4096, 8192}, {0, 0, 0, 1});
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, expanded, true);
  EXPECT_EQ(plan.map().batch, 1);
  EXPECT_EQ(plan.map().heads, 1);
  EXPECT_TRUE(plan.has_mask());
  const uint8_t* keep_row = row.data();
  const KeepFn keep = [&](int64_t, int64_t, int64_t i, int64_t j) {
    return keep_row[j] != 0 && causal_keep(g, i, j);
  };
  expect_plan_matches(plan, g, keep, {{0, 0}, {3, 15}});
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
}

// A per-kv-head mask (B, Hk, Sq, Sk) with H = 8, Hk = 2: the map has the mask's 2 heads and B
// batches, and query head h reads map head h / 4.
TEST(Plan, PerKvHeadMask_MapFollowsMaskHeadsAndBatch) {
  const Geometry g{2, 97, 130, 8, 2};
  std::vector<uint8_t> mask(2 * 2 * 97 * 130);
  Rng rng(5);
  for (uint8_t& m : mask) m = rng.bernoulli(0.5);
  // Make some whole tiles False and some True so every kind occurs.
  for (int64_t i = 0; i < 64; ++i) {
    for (int64_t j = 0; j < 64; ++j) {
      mask[((0 * 2 + 1) * 97 + i) * 130 + j] = 0;
      mask[((1 * 2 + 0) * 97 + i) * 130 + 64 + j] = 1;
    }
  }
  HostTensor mask_tensor = HostTensor::from_mask({2, 2, 97, 130}, mask);
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, mask_tensor.view(), false);
  EXPECT_EQ(plan.map().batch, 2);
  EXPECT_EQ(plan.map().heads, 2);
  for (int64_t h = 0; h < 8; ++h) EXPECT_EQ(plan.map_head(h), h / 4);
  const KeepFn keep = [&](int64_t b, int64_t h, int64_t i, int64_t j) {
    return mask[((b * 2 + h / 4) * 97 + i) * 130 + j] != 0;
  };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
}

// PlanOptions::block_mask (1, H, m_blocks, n_blocks) ANDed with a (B,1,Sq,Sk) mask and causality,
// on a 32 x 48 tile shape: a tile whose selection is False is never listed.
TEST(Plan, BlockMaskSelection_CombinedWithMaskAndCausal_CustomTileShape) {
  const Geometry g{2, 150, 200, 4, 2};
  fsa::PlanOptions options;
  options.block_m = 32;
  options.block_n = 48;
  const int64_t mblocks = 5, nblocks = 5;  // ceil(150 / 32), ceil(200 / 48)
  Rng rng(9);
  std::vector<uint8_t> selection(4 * mblocks * nblocks), mask(2 * 150 * 200);
  for (uint8_t& s : selection) s = rng.bernoulli(0.6);
  for (uint8_t& m : mask) m = rng.bernoulli(0.8);
  HostTensor selection_tensor = HostTensor::from_mask({1, 4, mblocks, nblocks}, selection);
  HostTensor mask_tensor = HostTensor::from_mask({2, 1, 150, 200}, mask);
  options.block_mask = selection_tensor.view();
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, mask_tensor.view(), true, options);
  EXPECT_EQ(plan.map().batch, 2) << "the mask varies with batch";
  EXPECT_EQ(plan.map().heads, 4) << "the selection varies with heads";
  EXPECT_EQ(plan.map().block_m, 32);
  EXPECT_EQ(plan.map().block_n, 48);
  const KeepFn keep = [&](int64_t b, int64_t h, int64_t i, int64_t j) {
    return selection[(h * mblocks + i / 32) * nblocks + j / 48] != 0 &&
           mask[(b * 150 + i) * 200 + j] != 0 && causal_keep(g, i, j);
  };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));
}

// 0 means the backend's default tile; a negative size is an error.
TEST(Plan, NegativeTileShapeRaisesNamingIt) {
  const Geometry g{1, 16, 16, 1, 1};
  ShapeViews views(g);
  for (const bool rows : {true, false}) {
    fsa::PlanOptions options;
    (rows ? options.block_m : options.block_n) = -1;
    try {
      fsa::make_plan(views.query, views.key, std::nullopt, false, options);
      ADD_FAILURE() << "a negative tile size was accepted";
    } catch (const fsa::Error& e) {
      EXPECT_EQ(e.argument(), rows ? "block_m" : "block_n") << e.what();
    }
  }
}

// A caller-built plan (32 x 48 tiles, block selection) drives forward and backward: the result is
// attention under the mask AND the selection expanded to entries, per the fp64 reference.
TEST(Plan, ForwardAndBackwardFollowACallerPlanWithBlockSelection) {
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    CaseSpec spec = case_spec(dtype, 2, 150, 200, 4, 2, 40);
    spec.causal = true;
    spec.mask_shape = Shape4{2, 1, 150, 200};
    spec.bias_shape = Shape4{1, 2, 1, 200};
    spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
      for (uint8_t& m : mask) m = rng.bernoulli(0.8);
    };
    const Problem p = make_problem(spec);
    const Inputs in = make_inputs(spec, p);
    const int64_t mblocks = 5, nblocks = 5;
    Rng rng(21);
    std::vector<uint8_t> selection(4 * mblocks * nblocks);
    for (uint8_t& s : selection) s = rng.bernoulli(0.6);
    HostTensor selection_tensor = HostTensor::from_mask({1, 4, mblocks, nblocks}, selection);

    LibraryBuffers buffers(p, in, dtype, dtype);
    fsa::PlanOptions plan_options;
    plan_options.block_m = 32;
    plan_options.block_n = 48;
    plan_options.block_mask = selection_tensor.view();
    const fsa::Plan plan = fsa::make_plan(buffers.q.view(), buffers.k.view(), buffers.mask->view(),
                                          true, plan_options);
    const fsa::AttentionOptions options = make_options(spec);
    fsa::ForwardArgs forward_args = buffers.forward_args(options);
    forward_args.plan = &plan;
    fsa::forward(forward_args);
    fsa::BackwardArgs backward_args = buffers.backward_args(options);
    backward_args.plan = &plan;
    fsa::backward(backward_args);

    // The reference sees the effective (B, H, Sq, Sk) mask.
    Problem effective = p;
    effective.mask_shape = Shape4{2, 4, 150, 200};
    Inputs effective_in = in;
    effective_in.mask.assign(2 * 4 * 150 * 200, 0);
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t h = 0; h < 4; ++h) {
        for (int64_t i = 0; i < 150; ++i) {
          for (int64_t j = 0; j < 200; ++j) {
            effective_in.mask[((b * 4 + h) * 150 + i) * 200 + j] =
                in.mask[(b * 150 + i) * 200 + j] &&
                selection[(h * mblocks + i / 32) * nblocks + j / 48];
          }
        }
      }
    }
    expect_matches_reference(effective, effective_in, buffers.outputs(true), dtype, dtype, true);
  }
}

// A selection over coarser tiles than the plan's (here 2 x 3 plan tiles each) keeps or drops
// whole groups of plan tiles; a selection tile that is not a whole multiple is an error naming
// block_mask.
TEST(Plan, BlockMaskSelection_CoarserSelectionTilesThanPlanTiles) {
  const Geometry g{1, 130, 300, 2, 1};
  fsa::PlanOptions options;
  options.block_m = 32;
  options.block_n = 32;
  options.block_mask_m = 64;
  options.block_mask_n = 96;
  const int64_t sel_m = 3, sel_n = 4;  // ceil(130 / 64), ceil(300 / 96)
  Rng rng(21);
  std::vector<uint8_t> selection(2 * sel_m * sel_n);
  for (uint8_t& s : selection) s = rng.bernoulli(0.5);
  HostTensor selection_tensor = HostTensor::from_mask({1, 2, sel_m, sel_n}, selection);
  options.block_mask = selection_tensor.view();
  ShapeViews views(g);
  const fsa::Plan plan = fsa::make_plan(views.query, views.key, std::nullopt, true, options);
  const KeepFn keep = [&](int64_t, int64_t h, int64_t i, int64_t j) {
    return selection[(h * sel_m + i / 64) * sel_n + j / 96] != 0 && causal_keep(g, i, j);
  };
  expect_plan_matches(plan, g, keep);
  EXPECT_EQ(plan.map().kept_entries, count_map_kept(plan, g, keep));

  options.block_mask_n = 48;  // not a multiple of 32
  try {
    fsa::make_plan(views.query, views.key, std::nullopt, true, options);
    ADD_FAILURE() << "expected fsa::Error for a selection tile that is not a multiple";
  } catch (const fsa::Error& e) {
    EXPECT_EQ(e.argument(), "block_mask") << e.what();
  }
}

}  // namespace
}  // namespace fsa_test
