// CPU forward: one task per (batch, query head, query block); the online softmax runs over the
// plan's full key blocks (no predicates) and then its partial ones (mask / causal applied).

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/thread_pool.h"
#include "cpu/tile.h"

namespace fsa::detail::cpu {
namespace {

// Per-worker scratch, sized once per call.
template <typename Acc>
struct ForwardScratch {
  std::vector<Acc> q;        // (block_m, D)
  std::vector<Acc> kt;       // (D, block_n): K transposed so score rows are contiguous
  std::vector<Acc> v;        // (block_n, D)
  std::vector<Acc> s;        // (block_m, block_n) logits, then probabilities
  std::vector<Acc> acc;      // (block_m, D) unnormalized output
  std::vector<Acc> row_max;  // (block_m) running max of the log2 logits
  std::vector<Acc> row_sum;  // (block_m) running sum of exp2(s2 - row_max)
  std::vector<Acc> row_buf;  // (max(D, block_n)) conversion / bias row
};

// Online-softmax state of one row, in the log2 domain. The -inf guards are what makes empty rows
// exact: while no key has been kept, max = -inf and we subtract 0 instead of -inf, so every
// exp2 is exp2(-inf) = 0 rather than exp2(NaN).
template <typename Acc>
inline Acc rescale_for(Acc& row_max, Acc tile_max) {
  const Acc new_max = std::max(row_max, tile_max);
  const Acc correction = row_max == kNegInfOf<Acc> ? Acc(0) : std::exp2(row_max - new_max);
  row_max = new_max;
  return correction;
}

template <typename Acc>
void run_forward(const ForwardProblem& p, const Plan& plan) {
  constexpr Acc kNegInf = kNegInfOf<Acc>;
  const BlockMap& map = plan.map();
  const int64_t bm = map.block_m, bn = map.block_n, D = p.head_dim;
  const int64_t tasks = p.batch * p.num_heads * map.m_blocks;
  std::vector<ForwardScratch<Acc>> scratch(size_t(std::max(1, cpu_threads())));
  for (auto& w : scratch) {
    w.q.resize(size_t(bm * D));
    w.kt.resize(size_t(D * bn));
    w.v.resize(size_t(bn * D));
    w.s.resize(size_t(bm * bn));
    w.acc.resize(size_t(bm * D));
    w.row_max.resize(size_t(bm));
    w.row_sum.resize(size_t(bm));
    w.row_buf.resize(size_t(std::max(D, bn)));
  }
  const ScoreTransform<Acc> transform(p);

  parallel_for(tasks, [&](int64_t task, int worker) {
    ForwardScratch<Acc>& w = scratch[size_t(worker)];
    const int64_t m = task % map.m_blocks;
    const int64_t h = (task / map.m_blocks) % p.num_heads;
    const int64_t b = task / (map.m_blocks * p.num_heads);
    const int64_t hk = h / p.group();
    const int64_t r0 = m * bm, rows = std::min(bm, p.seqlen_q - r0);

    load_rows(p.q, p.dtype, b, r0, rows, h, D, w.q.data());
    std::fill(w.acc.begin(), w.acc.end(), Acc(0));
    std::fill(w.row_max.begin(), w.row_max.end(), kNegInf);
    std::fill(w.row_sum.begin(), w.row_sum.end(), Acc(0));

    const int64_t mb = plan.map_batch(b), mh = plan.map_head(h);
    // A cache's length (cache_seqlens) bounds the keys: tiles past every row's end are skipped,
    // tiles past some row's end drop entries like partial ones. Without lengths the plan's
    // classification stands.
    const CausalBand band = p.band(b);
    const int64_t keys_hi = band.visible_end(r0 + rows - 1), keys_lo = band.visible_end(r0);
    for (int pass = 0; pass < 2; ++pass) {
      const BlockSpan blocks =
          pass == 1 ? plan.partial_blocks(mb, mh, m) : plan.full_blocks(mb, mh, m);
      for (int32_t n : blocks) {
        const Tile tile{r0, rows, n * bn, std::min(bn, p.seqlen_k - n * bn)};
        if (p.cache_seqlens && tile.c0 >= keys_hi) continue;
        const bool partial = pass == 1 || (p.cache_seqlens && tile.c0 + tile.cols > keys_lo);
        load_rows_transposed(p.k, p.dtype, b, tile.c0, tile.cols, hk, D, w.row_buf.data(),
                             w.kt.data(), bn);
        load_rows(p.v, p.dtype, b, tile.c0, tile.cols, hk, D, w.v.data());
        // s (rows, cols) = q (rows, D) . k^T (D, cols)
        matmul_nn(w.q.data(), D, w.kt.data(), bn, w.s.data(), bn, rows, tile.cols, D);
        transform.apply(w.s.data(), bn, tile, b, h, partial, w.row_buf.data());
        for (int64_t r = 0; r < rows; ++r) {
          Acc* sr = w.s.data() + r * bn;
          Acc tile_max = kNegInf;
          for (int64_t c = 0; c < tile.cols; ++c) tile_max = std::max(tile_max, sr[c]);
          const Acc correction = rescale_for(w.row_max[size_t(r)], tile_max);
          const Acc shift = w.row_max[size_t(r)] == kNegInf ? Acc(0) : w.row_max[size_t(r)];
          Acc sum = 0;
          for (int64_t c = 0; c < tile.cols; ++c) {
            sr[c] = fast_exp2(sr[c] - shift);
            sum += sr[c];
          }
          w.row_sum[size_t(r)] = w.row_sum[size_t(r)] * correction + sum;
          if (correction != Acc(1)) {
            Acc* ar = w.acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
          }
        }
        // acc (rows, D) += p (rows, cols) . v (cols, D)
        matmul_nn_acc(w.s.data(), bn, w.v.data(), D, w.acc.data(), D, rows, tile.cols, D);
      }
    }

    // Normalize; a row with no kept key (sum 0) is exactly 0 with LSE = -inf.
    for (int64_t r = 0; r < rows; ++r) {
      const Acc sum = w.row_sum[size_t(r)];
      const Acc inv = sum > 0 ? Acc(1) / sum : Acc(0);
      Acc* ar = w.acc.data() + r * D;
      if (sum != sum) {
        for (int64_t d = 0; d < D; ++d) ar[d] = sum;  // NaN in, NaN out (this row only)
      } else {
        for (int64_t d = 0; d < D; ++d) ar[d] *= inv;
      }
      if (p.lse) {
        const Acc lse = sum > 0 ? (w.row_max[size_t(r)] + std::log2(sum)) * Acc(kLn2)
                                : (sum != sum ? sum : kNegInf);
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + (r0 + r) * p.lse_stride_s] = float(lse);
      }
    }
    store_rows(w.acc.data(), p.out, p.dtype, b, r0, rows, h, D);
  });
}

}  // namespace

void forward(const ForwardProblem& p, const Plan& plan) {
  if (p.dtype == DType::kFloat64) {
    run_forward<double>(p, plan);
  } else {
    run_forward<float>(p, plan);
  }
}

}  // namespace fsa::detail::cpu
