// CPU backward, deterministic by construction: every output element is written by exactly one
// task, and every sum runs in a fixed order.
//
//   pass 0  rowdot[b,h,i] = sum_d dO . O                          tasks (batch, head)
//   pass A  dK, dV of one key block, summed over the G query heads tasks (batch, kv head, key block)
//           and the plan's (transposed) query blocks; the column
//           sums of dS for a query-broadcast bias (..., 1, Sk|1)
//   pass B  dQ of one query block, recomputing P and dS over the   tasks (dbias owner, query block)
//           plan's key blocks; dBias for a bias with a full query
//           dim, summed over the (batch, head) members that share
//           one dbias element
//   pass C  reduce the column sums to the caller's dbias shape    tasks (dbias batch, dbias head)
//
// P and dS are recomputed in A and B (7 tile products instead of 5) so that no (B, H, Sq, Sk)
// temporary and no atomics are needed.

#include <algorithm>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/thread_pool.h"
#include "cpu/tile.h"

namespace fsa::detail::cpu {
namespace {

template <typename Acc>
struct BackwardScratch {
  std::vector<Acc> q, dout;   // (block_m, D)
  std::vector<Acc> k;         // (block_n, D)
  std::vector<Acc> kt, vt;    // (D, block_n)
  std::vector<Acc> s, dp, t;  // (block_m, block_n): logits -> P; dP -> dS; tanh for softcap
  std::vector<Acc> dk, dv;    // (block_n, D) accumulators
  std::vector<Acc> dq;        // (block_m, D) accumulator
  std::vector<Acc> lse2, rowdot, row_acc;  // (block_m)
  std::vector<Acc> row_buf;   // (max(D, block_n))
  std::vector<Acc> dbias_rows;  // (block_m, Sk) when a full-query bias needs its gradient
};

// Which dims of the bias the gradient is summed over (the caller's size-1 dims).
struct BiasGradShape {
  bool query_full = false;  // dbias has Sq rows (else they are summed)
  bool key_full = false;    // dbias has Sk columns (else they are summed)
};

template <typename Acc>
class Backward {
 public:
  static constexpr Acc kNegInf = kNegInfOf<Acc>;

  Backward(const BackwardProblem& p, const Plan& plan)
      : p_(p), plan_(plan), map_(plan.map()), transform_(p), D_(p.head_dim),
        bm_(map_.block_m), bn_(map_.block_n) {
    if (p.dbias) {
      // A size-1 dim that is also the problem's size is "full": no sum is needed over it.
      grad_.query_full = p.dbias->shape[2] == p.seqlen_q;
      grad_.key_full = p.dbias->shape[3] == p.seqlen_k;
    }
    scratch_.resize(size_t(std::max(1, cpu_threads())));
    for (auto& w : scratch_) {
      w.q.resize(size_t(bm_ * D_));
      w.dout.resize(size_t(bm_ * D_));
      w.k.resize(size_t(bn_ * D_));
      w.kt.resize(size_t(D_ * bn_));
      w.vt.resize(size_t(D_ * bn_));
      w.s.resize(size_t(bm_ * bn_));
      w.dp.resize(size_t(bm_ * bn_));
      if (p.softcap > 0.0f) w.t.resize(size_t(bm_ * bn_));
      w.dk.resize(size_t(bn_ * D_));
      w.dv.resize(size_t(bn_ * D_));
      w.dq.resize(size_t(bm_ * D_));
      w.lse2.resize(size_t(bm_));
      w.rowdot.resize(size_t(bm_));
      w.row_acc.resize(size_t(bm_));
      w.row_buf.resize(size_t(std::max(D_, bn_)));
      if (p.dbias && grad_.query_full && grad_.key_full) {
        w.dbias_rows.resize(size_t(bm_ * p.seqlen_k));
      }
    }
  }

  void run() {
    rowdot_.assign(size_t(p_.batch * p_.num_heads * p_.seqlen_q), Acc(0));
    parallel_for(p_.batch * p_.num_heads, [&](int64_t t, int w) { row_dots(t, w); });
    if (p_.dbias && !grad_.query_full) {
      colsum_.assign(size_t(p_.batch * p_.num_heads * p_.seqlen_k), Acc(0));
    }
    parallel_for(p_.batch * p_.num_kv_heads * map_.n_blocks,
                 [&](int64_t t, int w) { key_block(t, w); });
    owner_batch_ = p_.batch;
    owner_heads_ = p_.num_heads;
    if (p_.dbias && grad_.query_full) {
      owner_batch_ = p_.dbias->shape[0];
      owner_heads_ = p_.dbias->shape[1];
    }
    parallel_for(owner_batch_ * owner_heads_ * map_.m_blocks,
                 [&](int64_t t, int w) { query_block(t, w); });
    if (p_.dbias && !grad_.query_full) {
      parallel_for(p_.dbias->shape[0] * p_.dbias->shape[1],
                   [&](int64_t t, int) { reduce_colsum(t); });
    }
  }

 private:
  Acc& rowdot(int64_t b, int64_t h, int64_t i) {
    return rowdot_[size_t((b * p_.num_heads + h) * p_.seqlen_q + i)];
  }

  void row_dots(int64_t task, int worker) {
    BackwardScratch<Acc>& w = scratch_[size_t(worker)];
    const int64_t b = task / p_.num_heads, h = task % p_.num_heads;
    for (int64_t i = 0; i < p_.seqlen_q; ++i) {
      load_values(element_ptr(p_.dout.data, p_.dtype, p_.dout.offset(b, i, h)), p_.dtype, D_,
                  w.q.data());
      load_values(element_ptr(p_.out.data, p_.dtype, p_.out.offset(b, i, h)), p_.dtype, D_,
                  w.dout.data());
      Acc sum = 0;
      for (int64_t d = 0; d < D_; ++d) sum += w.q[size_t(d)] * w.dout[size_t(d)];
      rowdot(b, h, i) = sum;
    }
  }

  // Loads what a query block contributes for head h: q, dO, LSE (log2 units) and rowdot.
  void load_query_side(BackwardScratch<Acc>& w, int64_t b, int64_t h, const Tile& tile) {
    load_rows(p_.q, p_.dtype, b, tile.r0, tile.rows, h, D_, w.q.data());
    load_rows(p_.dout, p_.dtype, b, tile.r0, tile.rows, h, D_, w.dout.data());
    for (int64_t r = 0; r < tile.rows; ++r) {
      const Acc lse =
          p_.lse[b * p_.lse_stride_b + h * p_.lse_stride_h + (tile.r0 + r) * p_.lse_stride_s];
      w.lse2[size_t(r)] = lse * Acc(kLog2e);
      w.rowdot[size_t(r)] = rowdot(b, h, tile.r0 + r);
    }
  }

  // Recomputes P and dS of one tile: on return w.s holds P, w.dp holds dS, and (softcap) w.t
  // holds the tanh values. Needs w.q, w.dout, w.lse2, w.rowdot, w.kt and w.vt loaded.
  void probabilities_and_grad(BackwardScratch<Acc>& w, const Tile& tile, int64_t b, int64_t h,
                              bool partial) {
    Acc* s = w.s.data();
    Acc* dp = w.dp.data();
    matmul_nn(w.q.data(), D_, w.kt.data(), bn_, s, bn_, tile.rows, tile.cols, D_);
    transform_.apply(s, bn_, tile, b, h, partial, w.row_buf.data(),
                     p_.softcap > 0.0f ? w.t.data() : nullptr);
    matmul_nn(w.dout.data(), D_, w.vt.data(), bn_, dp, bn_, tile.rows, tile.cols, D_);
    for (int64_t r = 0; r < tile.rows; ++r) {
      Acc* sr = s + r * bn_;
      Acc* dr = dp + r * bn_;
      const Acc lse2 = w.lse2[size_t(r)];
      const Acc rd = w.rowdot[size_t(r)];
      if (lse2 == kNegInf) {  // empty row: contributes exactly nothing
        for (int64_t c = 0; c < tile.cols; ++c) sr[c] = dr[c] = 0;
        continue;
      }
      // A dropped entry (logit -inf) has P = 0 and dS = 0 exactly, even when its row's LSE or
      // its key's value is NaN: in exact math it contributes nothing (SPEC section 2).
      for (int64_t c = 0; c < tile.cols; ++c) {
        const bool kept = sr[c] != kNegInf;
        sr[c] = kept ? fast_exp2(sr[c] - lse2) : Acc(0);  // P
        dr[c] = kept ? sr[c] * (dr[c] - rd) : Acc(0);     // dS = P * (dP - rowdot)
      }
    }
  }

  // dX = dS (no softcap) or dS * (1 - t^2); written into w.t (softcap) or aliased to dS.
  const Acc* score_grad(BackwardScratch<Acc>& w, const Tile& tile) {
    if (p_.softcap <= 0.0f) return w.dp.data();
    for (int64_t r = 0; r < tile.rows; ++r) {
      const Acc* dr = w.dp.data() + r * bn_;
      Acc* tr = w.t.data() + r * bn_;
      for (int64_t c = 0; c < tile.cols; ++c) tr[c] = dr[c] * (Acc(1) - tr[c] * tr[c]);
    }
    return w.t.data();
  }

  void key_block(int64_t task, int worker) {
    BackwardScratch<Acc>& w = scratch_[size_t(worker)];
    const int64_t n = task % map_.n_blocks;
    const int64_t hk = (task / map_.n_blocks) % p_.num_kv_heads;
    const int64_t b = task / (map_.n_blocks * p_.num_kv_heads);
    const int64_t c0 = n * bn_, cols = std::min(bn_, p_.seqlen_k - c0);
    load_rows_transposed(p_.k, p_.dtype, b, c0, cols, hk, D_, w.row_buf.data(), w.kt.data(), bn_);
    load_rows_transposed(p_.v, p_.dtype, b, c0, cols, hk, D_, w.row_buf.data(), w.vt.data(), bn_);
    std::fill(w.dk.begin(), w.dk.end(), Acc(0));
    std::fill(w.dv.begin(), w.dv.end(), Acc(0));
    const int64_t mb = plan_.map_batch(b);
    for (int64_t h = hk * p_.group(); h < (hk + 1) * p_.group(); ++h) {
      const int64_t mh = plan_.map_head(h);
      Acc* colsum = colsum_.empty() ? nullptr
                                      : colsum_.data() + (b * p_.num_heads + h) * p_.seqlen_k + c0;
      for (int pass = 0; pass < 2; ++pass) {
        const bool partial = pass == 1;
        const BlockSpan blocks = partial ? plan_.partial_query_blocks(mb, mh, n)
                                         : plan_.full_query_blocks(mb, mh, n);
        for (int32_t m : blocks) {
          const Tile tile{m * bm_, std::min(bm_, p_.seqlen_q - m * bm_), c0, cols};
          load_query_side(w, b, h, tile);
          probabilities_and_grad(w, tile, b, h, partial);
          // dV (cols, D) += P^T (cols, rows) . dO (rows, D)
          matmul_tn_acc(w.s.data(), bn_, w.dout.data(), D_, w.dv.data(), D_, tile.rows, cols, D_);
          const Acc* dx = score_grad(w, tile);
          // dK (cols, D) += dX^T (cols, rows) . Q (rows, D)     (scale applied at the end)
          matmul_tn_acc(dx, bn_, w.q.data(), D_, w.dk.data(), D_, tile.rows, cols, D_);
          if (colsum) {
            for (int64_t r = 0; r < tile.rows; ++r) {
              const Acc* dr = w.dp.data() + r * bn_;
              for (int64_t c = 0; c < cols; ++c) colsum[c] += dr[c];
            }
          }
        }
      }
    }
    for (Acc& x : w.dk) x *= Acc(p_.scale);
    store_rows(w.dk.data(), p_.dk, p_.dtype, b, c0, cols, hk, D_);
    store_rows(w.dv.data(), p_.dv, p_.dtype, b, c0, cols, hk, D_);
  }

  void query_block(int64_t task, int worker) {
    BackwardScratch<Acc>& w = scratch_[size_t(worker)];
    const int64_t m = task % map_.m_blocks;
    const int64_t oh = (task / map_.m_blocks) % owner_heads_;
    const int64_t ob = task / (map_.m_blocks * owner_heads_);
    const int64_t r0 = m * bm_, rows = std::min(bm_, p_.seqlen_q - r0);
    // Members: the (batch, head) pairs whose dS lands on this owner's dbias rows.
    const int64_t b_begin = owner_batch_ == p_.batch ? ob : 0;
    const int64_t b_end = owner_batch_ == p_.batch ? ob + 1 : p_.batch;
    const int64_t heads_per_owner = p_.num_heads / owner_heads_;
    const bool full_bias_grad = p_.dbias && grad_.query_full && grad_.key_full;
    const bool row_bias_grad = p_.dbias && grad_.query_full && !grad_.key_full;
    if (full_bias_grad) std::fill(w.dbias_rows.begin(), w.dbias_rows.end(), Acc(0));
    if (row_bias_grad) std::fill(w.row_acc.begin(), w.row_acc.end(), Acc(0));

    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t h = oh * heads_per_owner; h < (oh + 1) * heads_per_owner; ++h) {
        const int64_t hk = h / p_.group();
        const int64_t mb = plan_.map_batch(b), mh = plan_.map_head(h);
        const Tile q_tile{r0, rows, 0, 0};
        load_query_side(w, b, h, q_tile);
        std::fill(w.dq.begin(), w.dq.end(), Acc(0));
        for (int pass = 0; pass < 2; ++pass) {
          const bool partial = pass == 1;
          const BlockSpan blocks =
              partial ? plan_.partial_blocks(mb, mh, m) : plan_.full_blocks(mb, mh, m);
          for (int32_t n : blocks) {
            const Tile tile{r0, rows, n * bn_, std::min(bn_, p_.seqlen_k - n * bn_)};
            load_rows(p_.k, p_.dtype, b, tile.c0, tile.cols, hk, D_, w.k.data());
            for (int64_t c = 0; c < tile.cols; ++c) {
              for (int64_t d = 0; d < D_; ++d) w.kt[size_t(d * bn_ + c)] = w.k[size_t(c * D_ + d)];
            }
            load_rows_transposed(p_.v, p_.dtype, b, tile.c0, tile.cols, hk, D_, w.row_buf.data(),
                                 w.vt.data(), bn_);
            probabilities_and_grad(w, tile, b, h, partial);
            const Acc* dx = score_grad(w, tile);
            // dQ (rows, D) += dX (rows, cols) . K (cols, D)       (scale applied at the end)
            matmul_nn_acc(dx, bn_, w.k.data(), D_, w.dq.data(), D_, rows, tile.cols, D_);
            for (int64_t r = 0; r < rows && (full_bias_grad || row_bias_grad); ++r) {
              const Acc* dr = w.dp.data() + r * bn_;
              if (full_bias_grad) {
                Acc* out = w.dbias_rows.data() + r * p_.seqlen_k + tile.c0;
                for (int64_t c = 0; c < tile.cols; ++c) out[c] += dr[c];
              } else {
                Acc sum = 0;
                for (int64_t c = 0; c < tile.cols; ++c) sum += dr[c];
                w.row_acc[size_t(r)] += sum;
              }
            }
          }
        }
        for (Acc& x : w.dq) x *= Acc(p_.scale);
        store_rows(w.dq.data(), p_.dq, p_.dtype, b, r0, rows, h, D_);
      }
    }

    if (full_bias_grad || row_bias_grad) {
      const BroadcastOperand& g = *p_.dbias;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = ob * g.stride[0] + oh * g.stride[1] + (r0 + r) * g.stride[2];
        if (row_bias_grad) {
          store_value(w.row_acc[size_t(r)], g.dtype, g.data, base);
          continue;
        }
        const Acc* src = w.dbias_rows.data() + r * p_.seqlen_k;
        if (g.stride[3] == 1) {
          store_values(src, p_.seqlen_k, g.dtype, element_ptr(g.data, g.dtype, base));
        } else {
          for (int64_t j = 0; j < p_.seqlen_k; ++j) {
            store_value(src[j], g.dtype, g.data, base + j * g.stride[3]);
          }
        }
      }
    }
  }

  // dbias (bb, hb, 0, j | 0) = sum over its member (batch, head) pairs (and keys, when the key
  // dim is 1 too) of the per-(b, h) column sums, in a fixed order.
  void reduce_colsum(int64_t task) {
    const BroadcastOperand& g = *p_.dbias;
    const int64_t hb = task % g.shape[1], bb = task / g.shape[1];
    const int64_t b_begin = g.shape[0] == p_.batch ? bb : 0;
    const int64_t b_end = g.shape[0] == p_.batch ? bb + 1 : p_.batch;
    const int64_t heads_per = p_.num_heads / g.shape[1];
    const int64_t base = bb * g.stride[0] + hb * g.stride[1];
    std::vector<Acc> acc(size_t(g.shape[3]), Acc(0));
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t h = hb * heads_per; h < (hb + 1) * heads_per; ++h) {
        const Acc* cs = colsum_.data() + (b * p_.num_heads + h) * p_.seqlen_k;
        if (grad_.key_full) {
          for (int64_t j = 0; j < p_.seqlen_k; ++j) acc[size_t(j)] += cs[j];
        } else {
          Acc sum = 0;
          for (int64_t j = 0; j < p_.seqlen_k; ++j) sum += cs[j];
          acc[0] += sum;
        }
      }
    }
    for (int64_t j = 0; j < g.shape[3]; ++j) {
      store_value(acc[size_t(j)], g.dtype, g.data, base + j * g.stride[3]);
    }
  }

  const BackwardProblem& p_;
  const Plan& plan_;
  const BlockMap& map_;
  ScoreTransform<Acc> transform_;
  const int64_t D_, bm_, bn_;
  BiasGradShape grad_;
  std::vector<BackwardScratch<Acc>> scratch_;
  std::vector<Acc> rowdot_;  // (B, H, Sq)
  std::vector<Acc> colsum_;  // (B, H, Sk) column sums of dS, for a query-broadcast bias
  int64_t owner_batch_ = 0, owner_heads_ = 0;
};

}  // namespace

void backward(const BackwardProblem& p, const Plan& plan) {
  if (p.dtype == DType::kFloat64) {
    Backward<double>(p, plan).run();
  } else {
    Backward<float>(p, plan).run();
  }
}

}  // namespace fsa::detail::cpu
