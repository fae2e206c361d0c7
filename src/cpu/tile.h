#pragma once
// Tile-level building blocks shared by the CPU forward and backward: operand loads into the
// accumulation type Acc (float for fp32 / bf16 / fp16 inputs, double for fp64 inputs), the small
// matrix products, and the score transform (scale, softcap, bias, mask / causality) in the log2
// domain.

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/causal.h"
#include "core/dtype.h"
#include "core/problem.h"

namespace fsa::detail::cpu {

constexpr double kLog2e = 1.4426950408889634;  // log2(e): exp(x) = exp2(x * kLog2e)
constexpr double kLn2 = 0.6931471805599453;    // ln(2): log(x) = log2(x) * kLn2
template <typename Acc>
constexpr Acc kNegInfOf = -std::numeric_limits<Acc>::infinity();

// exp2 for the softmax: a degree-6 polynomial on [-0.5, 0.5] times 2^round(x) (relative error
// ~2e-7, below fp32 rounding of the products it feeds), written branch-free so the compiler can
// vectorize the loops that call it, which std::exp2 prevents. Exactly 0 for x < -126 (and -inf:
// dropped entries and empty rows must contribute exact zeros); NaN propagates.
inline float fast_exp2(float x) {
  const float xc = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
  const float k = std::nearbyint(xc);
  const float f = xc - k;  // [-0.5, 0.5]
  // Taylor coefficients of 2^f = e^(f ln2): ln2^n / n!
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910072e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t e = int32_t(k) + 127;
  const float scale = bits_to_float(uint32_t(e) << 23);
  float r = p * scale;
  r = x < -126.0f ? 0.0f : r;
  return x != x ? x : r;
}
// fp64 inputs (gradient checks) use the library exp2.
inline double fast_exp2(double x) { return std::exp2(x); }

// Geometry of one tile: rows [r0, r0 + rows) of the queries, keys [c0, c0 + cols).
struct Tile {
  int64_t r0, rows, c0, cols;
};

// Loads rows of a (B, S, H, D) operand at (b, s0.., h) into dst (rows x D, row stride D).
template <typename Acc>
inline void load_rows(const SeqOperand& op, DType dtype, int64_t b, int64_t s0, int64_t rows,
                      int64_t h, int64_t head_dim, Acc* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    load_values(element_ptr(op.data, dtype, op.offset(b, s0 + r, h)), dtype, head_dim,
                dst + r * head_dim);
  }
}

// Loads rows transposed: dst (D x ld), dst[d * ld + r] = op[b, s0 + r, h, d].
template <typename Acc>
inline void load_rows_transposed(const SeqOperand& op, DType dtype, int64_t b, int64_t s0,
                                 int64_t rows, int64_t h, int64_t head_dim, Acc* row_buf, Acc* dst,
                                 int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    load_values(element_ptr(op.data, dtype, op.offset(b, s0 + r, h)), dtype, head_dim, row_buf);
    for (int64_t d = 0; d < head_dim; ++d) dst[d * ld + r] = row_buf[d];
  }
}

template <typename Acc>
inline void store_rows(const Acc* src, const SeqOperand& op, DType dtype, int64_t b, int64_t s0,
                       int64_t rows, int64_t h, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    store_values(src + r * head_dim, head_dim, dtype,
                 element_ptr(op.data, dtype, op.offset(b, s0 + r, h)));
  }
}

// c (m x n, row stride ldc) = a (m x k, row stride lda) * bt (k x n, row stride ldb).
template <typename Acc>
inline void matmul_nn(const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c, int64_t ldc,
                      int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    Acc* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = 0;
    const Acc* ai = a + i * lda;
    for (int64_t p = 0; p < k; ++p) {
      const Acc av = ai[p];
      const Acc* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
    }
  }
}

// c (n x k) += a^T b where a is (m x n, row stride lda) and b is (m x k, row stride ldb).
template <typename Acc>
inline void matmul_tn_acc(const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                          int64_t ldc, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    const Acc* ai = a + i * lda;
    const Acc* bi = b + i * ldb;
    for (int64_t j = 0; j < n; ++j) {
      const Acc av = ai[j];
      if (av == 0) continue;  // dropped entries: a common, cheap skip
      Acc* cj = c + j * ldc;
      for (int64_t p = 0; p < k; ++p) cj[p] += av * bi[p];
    }
  }
}

// c (m x k) += a (m x n, row stride lda) * b (n x k, row stride ldb).
template <typename Acc>
inline void matmul_nn_acc(const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                          int64_t ldc, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    const Acc* ai = a + i * lda;
    Acc* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const Acc av = ai[j];
      if (av == 0) continue;
      const Acc* bj = b + j * ldb;
      for (int64_t p = 0; p < k; ++p) ci[p] += av * bj[p];
    }
  }
}

// Turns raw products x = q.k of a tile into log2-domain logits s2 = s * log2(e), with
//   s = scale * x + bias                     (no softcap)
//   s = c * tanh(scale * x / c) + bias       (softcap c > 0; the bias stays outside the cap)
// and, on partial tiles, s2 = -inf where the mask or causality drops the entry. When `tanh_out`
// is given (backward with softcap), it receives t = tanh(scale * x / c) for the derivative.
template <typename Acc>
class ScoreTransform {
 public:
  explicit ScoreTransform(const Problem& p)
      : p_(p) {
    scale_log2_ = Acc(p.scale) * Acc(kLog2e);
    if (p.softcap > 0.0f) {
      cap_in_ = Acc(p.scale) / Acc(p.softcap);
      cap_out_log2_ = Acc(p.softcap) * Acc(kLog2e);
    }
  }

  // s: (tile.rows x ld) products in, logits out. bias_row: scratch of >= tile.cols values.
  void apply(Acc* s, int64_t ld, const Tile& tile, int64_t b, int64_t h, bool partial,
             Acc* bias_row, Acc* tanh_out = nullptr) const {
    for (int64_t r = 0; r < tile.rows; ++r) {
      Acc* sr = s + r * ld;
      if (p_.softcap > 0.0f) {
        Acc* tr = tanh_out ? tanh_out + r * ld : nullptr;
        for (int64_t c = 0; c < tile.cols; ++c) {
          const Acc t = std::tanh(sr[c] * cap_in_);
          if (tr) tr[c] = t;
          sr[c] = t * cap_out_log2_;
        }
      } else {
        for (int64_t c = 0; c < tile.cols; ++c) sr[c] *= scale_log2_;
      }
      if (p_.bias) add_bias_row(sr, tile, r, b, h, bias_row);
      if (partial) drop_entries(sr, tile, r, b, h);
    }
  }

 private:
  void add_bias_row(Acc* sr, const Tile& tile, int64_t r, int64_t b, int64_t h,
                    Acc* bias_row) const {
    const BroadcastOperand& bias = *p_.bias;
    const int64_t off = bias.offset(b, h, tile.r0 + r, tile.c0);
    const int64_t sc = bias.read_stride[3];
    const Acc log2e = Acc(kLog2e);
    if (sc == 0) {
      for (int64_t c = 0; c < tile.cols; ++c) bias_row[c] = load_value<Acc>(bias.data, bias.dtype, off);
    } else if (sc == 1) {
      load_values(element_ptr(bias.data, bias.dtype, off), bias.dtype, tile.cols, bias_row);
    } else {
      for (int64_t c = 0; c < tile.cols; ++c) {
        bias_row[c] = load_value<Acc>(bias.data, bias.dtype, off + c * sc);
      }
    }
    for (int64_t c = 0; c < tile.cols; ++c) sr[c] += bias_row[c] * log2e;
    if (p_.row_topk.key) {  // per-row top-k: the row's threshold on the bias it just added
      const int64_t at = p_.row_topk.at(b, h, tile.r0 + r);
      for (int64_t c = 0; c < tile.cols; ++c) {
        if (!p_.row_topk.keeps(float(bias_row[c]), tile.c0 + c, at)) sr[c] = kNegInfOf<Acc>;
      }
    }
  }

  void drop_entries(Acc* sr, const Tile& tile, int64_t r, int64_t b, int64_t h) const {
    // Keys [c0, c0 + visible) of the tile: causality, or over compacted keys the row's own bound
    // (which holds the mask too: a compacted problem has none).
    const int64_t i = tile.r0 + r;
    const int64_t visible =
        (p_.row_end.data ? p_.row_end.at(b, h, i) : p_.band(b).visible_end(i)) - tile.c0;
    int64_t c = visible < 0 ? 0 : visible;
    for (; c < tile.cols; ++c) sr[c] = kNegInfOf<Acc>;
    if (p_.row_end.key_last) {  // per-row top-k over compacted keys: each slot's last row
      const int32_t* last = p_.row_end.key_last_row(b, h) + tile.c0;
      for (c = 0; c < tile.cols; ++c) {
        if (i > last[c]) sr[c] = kNegInfOf<Acc>;
      }
    }
    if (!p_.mask) return;
    const BroadcastOperand& mask = *p_.mask;
    const auto* row = static_cast<const uint8_t*>(mask.data) + mask.offset(b, h, i, tile.c0);
    const int64_t sc = mask.read_stride[3];
    const int64_t end = visible < tile.cols ? (visible < 0 ? 0 : visible) : tile.cols;
    for (c = 0; c < end; ++c) {
      if (!row[c * sc]) sr[c] = kNegInfOf<Acc>;
    }
  }

  const Problem& p_;
  Acc scale_log2_ = 0;
  Acc cap_in_ = 0;        // scale / c
  Acc cap_out_log2_ = 0;  // c * log2(e)
};

}  // namespace fsa::detail::cpu
