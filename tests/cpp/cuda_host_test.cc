// Host-side rules of the CUDA backend that need no device: split-KV's count (cuda/split_kv.h), a
// paged cache's addressing (cuda/params.h, PagedRows) and the check for a build's kernels
// (cuda/cuda_backend.h, require_built), checked on every machine.

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/params.h"
#include "cuda/split_kv.h"
#include "fsa/error.h"

namespace {

using fsa::detail::SeqOperand;
using fsa::detail::cuda::choose_splits;
using fsa::detail::cuda::paged_rows;
using fsa::detail::cuda::PagedRows;

TEST(SplitKv, FillsWholeWaves) {
  const int64_t slots = 264;  // an H200: 132 SMs, two CTAs each
  // Batch 8, 512K keys, 8 kv heads: 64 CTAs. Five ways (320 CTAs) would leave a second wave of
  // 56; four fill one wave.
  EXPECT_EQ(choose_splits(64, 8192, slots), 4);
  // Batch 1: 8 CTAs, 33 ways fill the 264 slots exactly.
  EXPECT_EQ(choose_splits(8, 8192, slots), 33);
  // A grid that fills the GPU already, too few key tiles, or degenerate sizes: no split.
  EXPECT_EQ(choose_splits(264, 8192, slots), 1);
  EXPECT_EQ(choose_splits(1000, 8192, slots), 1);
  EXPECT_EQ(choose_splits(8, 7, slots), 1);
  EXPECT_EQ(choose_splits(0, 8192, slots), 1);
  // At least 4 key tiles per split: 64 tiles allow 16 ways at most.
  EXPECT_EQ(choose_splits(1, 64, slots), 16);
}

TEST(SplitKv, StaysWithinItsBounds) {
  for (int64_t slots : {108, 132, 264}) {
    for (int64_t ctas = 1; ctas < 2 * slots; ++ctas) {
      for (int64_t n_blocks : {8, 33, 512, 8192}) {
        const int s = choose_splits(ctas, n_blocks, slots);
        ASSERT_GE(s, 1);
        if (s == 1) continue;
        EXPECT_LT(ctas, slots);
        EXPECT_LE(s, 128);
        EXPECT_LE(s, n_blocks / 4) << "ctas " << ctas << " n_blocks " << n_blocks;
        EXPECT_LE(ctas * s, 2 * slots) << "ctas " << ctas << " slots " << slots;
        // Never a grid that fills its waves worse than no split at all.
        const int64_t total = ctas * s, waves = (total + slots - 1) / slots;
        EXPECT_GT(double(total) / double(waves * slots), double(ctas) / double(slots));
      }
    }
  }
}

TEST(PagedRows, AddressesThroughTheTableAndClamps) {
  // Two batches of 3 pages of 16 rows; strides in elements: pages 1000 apart, rows 10.
  std::vector<int32_t> table = {4, 0, 2, -5, 7, 1 << 30};
  SeqOperand op;
  op.pages = table.data();
  op.pages_stride_b = 3;
  op.page_size = 16;
  op.num_pages = 5;
  const PagedRows r = paged_rows(op);
  ASSERT_EQ(r.table, table.data());
  EXPECT_EQ(r.max_pages, 3);
  EXPECT_EQ(r.page_size, 16);
  EXPECT_EQ(r.num_pages, 5);
  EXPECT_EQ(r.offset(0, 0, 1000, 10), 4 * 1000);
  EXPECT_EQ(r.offset(0, 17, 1000, 10), 0 * 1000 + 1 * 10);
  EXPECT_EQ(r.offset(0, 47, 1000, 10), 2 * 1000 + 15 * 10);
  // Out of range entries read the nearest page of the cache, never past it.
  EXPECT_EQ(r.offset(1, 3, 1000, 10), 0 * 1000 + 3 * 10);    // -5 -> page 0
  EXPECT_EQ(r.offset(1, 20, 1000, 10), 4 * 1000 + 4 * 10);   // 7 -> page 4
  EXPECT_EQ(r.offset(1, 40, 1000, 10), 4 * 1000 + 8 * 10);   // 2^30 -> page 4
  // A strided operand has no table: batch and row strides.
  const PagedRows none = paged_rows(SeqOperand{});
  EXPECT_EQ(none.table, nullptr);
  EXPECT_EQ(none.offset(2, 5, 1000, 10), 2 * 1000 + 5 * 10);
}

// A CUDA call needing kernels this build lacks (FSA_CUDA_INSTANCES; CI builds two of the six) is
// rejected naming the query, which dispatch.cc asks before planning; the kernels a build has
// pass. Without CUDA nothing is built and every call is rejected the same way. Head dims map to
// their kernel width (100 runs the 128-wide kernels), and no kernel takes fp32.
TEST(CudaInstances, MissingKernelsAreRejectedByName) {
  using fsa::DType;
  namespace cuda = fsa::detail::cuda;
  auto expect = [](bool built, const std::function<void()>& call, const char* what) {
    if (built) {
      EXPECT_NO_THROW(call()) << what;
      return;
    }
    try {
      call();
      ADD_FAILURE() << what << ": not rejected";
    } catch (const fsa::Error& e) {
      EXPECT_EQ(e.argument(), "query") << what;
      const std::string message = e.what();
      EXPECT_TRUE(message.find("was not built") != std::string::npos ||
                  message.find("no CUDA backend") != std::string::npos)
          << what << ": " << message;
    }
  };
  for (int64_t d : {8, 64, 100, 128, 200, 256}) {
    for (DType t : {DType::kBFloat16, DType::kFloat16}) {
      fsa::detail::ForwardProblem f;
      fsa::detail::BackwardProblem b;
      f.head_dim = b.head_dim = d;
      f.dtype = b.dtype = t;
      const int64_t width = d <= 64 ? 64 : d <= 128 ? 128 : 256;
      EXPECT_EQ(cuda::forward_built(d, t), cuda::forward_built(width, t));
      expect(cuda::forward_built(d, t), [&] { cuda::require_built(f); }, "forward");
      expect(cuda::backward_built(d, t), [&] { cuda::require_built(b); }, "backward");
    }
  }
  EXPECT_FALSE(cuda::forward_built(128, DType::kFloat32));
  EXPECT_FALSE(cuda::backward_built(128, DType::kFloat32));
}

}  // namespace
