#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

#include "test_dtypes.h"

namespace fsa_test {

int64_t numel(const Shape4& shape) { return shape[0] * shape[1] * shape[2] * shape[3]; }

namespace {

// The fp64 reference: no rounding anywhere.
struct ExactArith {
  using Acc = double;
  // SPEC section 3: D_i = <dO_i, O_i>.
  static constexpr bool kDeltaFromOutput = true;
  double round(double x) const { return x; }        // after an op in the compute dtype
  double round_score(double x) const { return x; }  // after the bias add (and its gradient)
  double round_bias(double x) const { return x; }   // dbias as stored
};

// What a naive framework implementation in `dtype` does: fp32 arithmetic, rounded to the dtype
// after every operation.
struct NaiveArith {
  using Acc = float;
  // Autograd differentiates the softmax itself: D_i = sum_j dP_ij * P_ij.
  static constexpr bool kDeltaFromOutput = false;
  fsa::DType dtype;
  fsa::DType score_dtype;  // scores + an fp32 bias promote to fp32
  fsa::DType bias_dtype;
  float round(float x) const { return round_to(dtype, x); }
  float round_score(float x) const { return round_to(score_dtype, x); }
  float round_bias(float x) const { return round_to(bias_dtype, x); }
};

// Four partial sums: the same for both arithmetics, and fast enough for the large SPEC cases.
template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < n; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

template <class T>
std::vector<T> convert(const std::vector<double>& values) {
  return std::vector<T>(values.begin(), values.end());
}

// Row-major offsets of a broadcast 4-D mask or bias: size-1 dims get stride 0, and query head h
// reads tensor head h / (H / Hx).
struct BroadcastIndex {
  int64_t stride_b = 0, stride_h = 0, stride_i = 0, stride_j = 0, heads_per_entry = 1;
  BroadcastIndex() = default;
  BroadcastIndex(const Shape4& shape, int64_t heads) {
    stride_j = shape[3] == 1 ? 0 : 1;
    stride_i = shape[2] == 1 ? 0 : shape[3];
    stride_h = shape[1] == 1 ? 0 : shape[2] * shape[3];
    stride_b = shape[0] == 1 ? 0 : shape[1] * shape[2] * shape[3];
    heads_per_entry = heads / shape[1];
  }
  int64_t row(int64_t b, int64_t h, int64_t i) const {
    return b * stride_b + (h / heads_per_entry) * stride_h + i * stride_i;
  }
};

template <class Arith>
class AttentionLoops {
 public:
  using Acc = typename Arith::Acc;

  AttentionLoops(const Problem& p, const Inputs& in, const Arith& arith, bool with_backward)
      : p_(p),
        arith_(arith),
        backward_(with_backward),
        q_(convert<Acc>(in.q)),
        k_(convert<Acc>(in.k)),
        v_(convert<Acc>(in.v)),
        dout_(with_backward ? convert<Acc>(in.dout) : std::vector<Acc>()),
        bias_(convert<Acc>(in.bias)),
        mask_(in.mask) {
    if (p.mask_shape) mask_index_ = BroadcastIndex(*p.mask_shape, p.heads);
    if (p.bias_shape) bias_index_ = BroadcastIndex(*p.bias_shape, p.heads);
  }

  Outputs run(Structure* structure) {
    const double inf = std::numeric_limits<double>::infinity();
    Outputs o;
    o.out.assign(p_.q_numel(), 0.0);
    o.lse.assign(p_.lse_numel(), -inf);
    Structure s;
    s.row_kept.assign(p_.lse_numel(), 0);
    s.key_kept.assign(p_.batch * p_.seqlen_k * p_.kv_heads, 0);
    const int64_t bias_numel = p_.bias_shape ? numel(*p_.bias_shape) : 0;
    if (backward_) {
      o.dq.assign(p_.q_numel(), 0.0);
      o.dk.assign(p_.kv_numel(), 0.0);
      o.dv.assign(p_.kv_numel(), 0.0);
    }

    // Work units are (batch, kv head): a unit owns its dk/dv rows, so only dbias (which may be
    // broadcast over batch and heads) needs per-worker partial sums, merged in a fixed order.
    const int64_t units = p_.batch * p_.kv_heads;
    const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
    const int64_t workers = std::max<int64_t>(1, std::min(units, hw));
    std::vector<Worker> state(workers);
    for (Worker& w : state) {
      if (backward_) {
        w.dbias.assign(bias_numel, Acc(0));
        w.dbias_magnitude.assign(bias_numel, Acc(0));
      }
      w.bias_kept.assign(bias_numel, 0);
    }
    std::vector<std::thread> threads;
    for (int64_t w = 0; w < workers; ++w) {
      threads.emplace_back([&, w] {
        for (int64_t unit = w; unit < units; unit += workers) {
          run_unit(unit / p_.kv_heads, unit % p_.kv_heads, state[w], o, s);
        }
      });
    }
    for (std::thread& t : threads) t.join();

    s.bias_kept.assign(bias_numel, 0);
    if (backward_ && p_.bias_shape) {
      o.dbias.assign(bias_numel, 0.0);
      o.dbias_magnitude.assign(bias_numel, 0.0);
    }
    for (int64_t e = 0; e < bias_numel; ++e) {
      Acc sum = 0, magnitude = 0;
      for (const Worker& w : state) {
        if (backward_) {
          sum += w.dbias[e];
          magnitude += w.dbias_magnitude[e];
        }
        s.bias_kept[e] |= w.bias_kept[e];
      }
      if (backward_) {
        o.dbias[e] = arith_.round_bias(sum);
        o.dbias_magnitude[e] = magnitude;
      }
    }
    if (structure) *structure = std::move(s);
    return o;
  }

 private:
  struct Worker {
    std::vector<Acc> dbias, dbias_magnitude;  // partial sums of dS and |dS|, bias shape
    std::vector<uint8_t> bias_kept;
    // Per-row scratch: kept key indices and, per kept key, the score, tanh, probability.
    std::vector<int64_t> keys;
    std::vector<Acc> score, tanh_value, prob, prob_rounded, dp, o, dq;
    // Per (batch, kv head): dk/dv of the current query head and of the whole group.
    std::vector<Acc> dk_head, dv_head, dk_group, dv_group;
  };

  int64_t q_offset(int64_t b, int64_t i, int64_t h) const {
    return ((b * p_.seqlen_q + i) * p_.heads + h) * p_.head_dim;
  }
  int64_t kv_offset(int64_t b, int64_t j, int64_t hk) const {
    return ((b * p_.seqlen_k + j) * p_.kv_heads + hk) * p_.head_dim;
  }

  void run_unit(int64_t b, int64_t hk, Worker& w, Outputs& o, Structure& s) {
    const int64_t D = p_.head_dim, Sk = p_.seqlen_k, group = p_.heads / p_.kv_heads;
    if (backward_) {
      w.dk_group.assign(Sk * D, Acc(0));
      w.dv_group.assign(Sk * D, Acc(0));
    }
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      if (backward_) {
        w.dk_head.assign(Sk * D, Acc(0));
        w.dv_head.assign(Sk * D, Acc(0));
      }
      for (int64_t i = 0; i < p_.seqlen_q; ++i) run_row(b, h, hk, i, w, o, s);
      if (backward_) {
        // Autograd's GQA: per-query-head gradients in the dtype, summed over the group.
        for (int64_t e = 0; e < Sk * D; ++e) {
          w.dk_group[e] += arith_.round(w.dk_head[e]);
          w.dv_group[e] += arith_.round(w.dv_head[e]);
        }
      }
    }
    if (!backward_) return;
    for (int64_t j = 0; j < Sk; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        o.dk[kv_offset(b, j, hk) + d] = arith_.round(w.dk_group[j * D + d]);
        o.dv[kv_offset(b, j, hk) + d] = arith_.round(w.dv_group[j * D + d]);
      }
    }
  }

  void run_row(int64_t b, int64_t h, int64_t hk, int64_t i, Worker& w, Outputs& o, Structure& s) {
    const int64_t D = p_.head_dim, Sq = p_.seqlen_q, Sk = p_.seqlen_k;
    const Acc scale = static_cast<Acc>(p_.scale), cap = static_cast<Acc>(p_.softcap);

    // keep_ij = mask_ij AND (not causal OR j <= i + Sk - Sq), decided before any arithmetic.
    const int64_t visible_end = p_.causal ? std::clamp<int64_t>(i + Sk - Sq + 1, 0, Sk) : Sk;
    w.keys.clear();
    if (p_.mask_shape) {
      const uint8_t* mask_row = mask_.data() + mask_index_.row(b, h, i);
      for (int64_t j = 0; j < visible_end; ++j) {
        if (mask_row[j * mask_index_.stride_j]) w.keys.push_back(j);
      }
    } else {
      for (int64_t j = 0; j < visible_end; ++j) w.keys.push_back(j);
    }

    // Scores of the kept keys. A -inf score (from a -inf bias) is dropped like a masked entry.
    const Acc* qi = q_.data() + q_offset(b, i, h);
    const Acc* bias_row = p_.bias_shape ? bias_.data() + bias_index_.row(b, h, i) : nullptr;
    const int64_t bias_row_offset = p_.bias_shape ? bias_index_.row(b, h, i) : 0;
    w.score.clear();
    w.tanh_value.clear();
    size_t kept = 0;
    for (const int64_t j : w.keys) {
      const Acc x = arith_.round(dot(qi, k_.data() + kv_offset(b, j, hk), D));
      const Acc xs = arith_.round(x * scale);
      Acc score = xs, t = 0;
      if (cap > 0) {  // s = c * tanh(scale * x / c) + bias: the bias stays outside the cap
        t = arith_.round(std::tanh(arith_.round(xs / cap)));
        score = arith_.round(t * cap);
      }
      if (bias_row) score = arith_.round_score(score + bias_row[j * bias_index_.stride_j]);
      if (score == -std::numeric_limits<Acc>::infinity()) continue;
      w.keys[kept++] = j;
      w.score.push_back(score);
      w.tanh_value.push_back(t);
    }
    w.keys.resize(kept);
    const int64_t row = (b * p_.heads + h) * Sq + i;
    if (kept == 0) return;  // empty row: O = 0, LSE = -inf, no gradient (outputs pre-filled)
    s.row_kept[row] = 1;

    // LSE_i = log sum exp(s_ij); P_ij = exp(s_ij - LSE_i), as a max-shifted softmax.
    Acc max_score = w.score[0];
    for (const Acc v : w.score) max_score = std::max(max_score, v);
    Acc sum = 0;
    for (const Acc v : w.score) sum += std::exp(v - max_score);
    o.lse[row] = static_cast<double>(max_score + std::log(sum));
    w.prob.resize(kept);
    w.prob_rounded.resize(kept);
    for (size_t n = 0; n < kept; ++n) {
      w.prob[n] = std::exp(w.score[n] - max_score) / sum;
      w.prob_rounded[n] = arith_.round(w.prob[n]);
    }

    // O_i = sum_j P_ij v_j.
    w.o.assign(D, Acc(0));
    for (size_t n = 0; n < kept; ++n) {
      const Acc* vj = v_.data() + kv_offset(b, w.keys[n], hk);
      const Acc pn = w.prob_rounded[n];
      for (int64_t d = 0; d < D; ++d) w.o[d] += pn * vj[d];
    }
    double* out_row = o.out.data() + q_offset(b, i, h);
    for (int64_t d = 0; d < D; ++d) out_row[d] = arith_.round(w.o[d]);
    for (const int64_t j : w.keys) s.key_kept[(b * Sk + j) * p_.kv_heads + hk] = 1;
    if (bias_row) {
      for (const int64_t j : w.keys) w.bias_kept[bias_row_offset + j * bias_index_.stride_j] = 1;
    }
    if (!backward_) return;

    // dP_ij = <dO_i, v_j>; D_i; dS_ij = P_ij (dP_ij - D_i).
    const Acc* doi = dout_.data() + q_offset(b, i, h);
    w.dp.resize(kept);
    for (size_t n = 0; n < kept; ++n) {
      w.dp[n] = arith_.round(dot(doi, v_.data() + kv_offset(b, w.keys[n], hk), D));
    }
    Acc delta = 0;
    if (Arith::kDeltaFromOutput) {
      delta = dot(doi, w.o.data(), D);
    } else {
      for (size_t n = 0; n < kept; ++n) delta += w.dp[n] * w.prob[n];
    }
    w.dq.assign(D, Acc(0));
    for (size_t n = 0; n < kept; ++n) {
      const int64_t j = w.keys[n];
      // Gradient of the biased score (that is dbias), then of the pre-bias score in the dtype.
      const Acc ds_biased = arith_.round_score(w.prob[n] * (w.dp[n] - delta));
      if (bias_row) {
        const int64_t e = bias_row_offset + j * bias_index_.stride_j;
        w.dbias[e] += ds_biased;
        w.dbias_magnitude[e] += std::abs(ds_biased);
      }
      const Acc ds = arith_.round(ds_biased);
      Acc dxs = ds;   // gradient of scale * x
      if (cap > 0) {  // dX = dS * (1 - t^2), through s = c * t, t = tanh(u), u = scale * x / c
        const Acc t = w.tanh_value[n];
        const Acc dt = arith_.round(ds * cap);
        const Acc du = arith_.round(dt * (Acc(1) - t * t));
        dxs = arith_.round(du / cap);
      }
      const Acc dx = arith_.round(dxs * scale);  // dQ and dK carry the scale
      const Acc* kj = k_.data() + kv_offset(b, j, hk);
      Acc* dk_j = w.dk_head.data() + j * D;
      Acc* dv_j = w.dv_head.data() + j * D;
      const Acc pn = w.prob_rounded[n];
      // Three loops, not one: the compiler cannot prove the five rows apart, and the fused loop
      // ran scalar (its pointers reloaded from the stack); apart, each vectorizes behind a
      // runtime overlap check. The same operations per element: the results are unchanged.
      Acc* dq = w.dq.data();
      for (int64_t d = 0; d < D; ++d) dq[d] += dx * kj[d];
      for (int64_t d = 0; d < D; ++d) dk_j[d] += dx * qi[d];
      for (int64_t d = 0; d < D; ++d) dv_j[d] += pn * doi[d];
    }
    double* dq_row = o.dq.data() + q_offset(b, i, h);
    for (int64_t d = 0; d < D; ++d) dq_row[d] = arith_.round(w.dq[d]);
  }

  const Problem& p_;
  const Arith arith_;
  const bool backward_;
  const std::vector<Acc> q_, k_, v_, dout_, bias_;
  const std::vector<uint8_t>& mask_;
  BroadcastIndex mask_index_, bias_index_;
};

}  // namespace

Outputs reference_attention(const Problem& problem, const Inputs& inputs, bool with_backward,
                            Structure* structure) {
  return AttentionLoops<ExactArith>(problem, inputs, ExactArith{}, with_backward).run(structure);
}

Outputs naive_attention(const Problem& problem, const Inputs& inputs, fsa::DType dtype,
                        fsa::DType bias_dtype, bool with_backward) {
  const bool fp32_scores = problem.bias_shape && bias_dtype == fsa::DType::kFloat32;
  const NaiveArith arith{dtype, fp32_scores ? fsa::DType::kFloat32 : dtype, bias_dtype};
  return AttentionLoops<NaiveArith>(problem, inputs, arith, with_backward).run(nullptr);
}

}  // namespace fsa_test
