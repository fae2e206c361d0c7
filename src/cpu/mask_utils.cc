// Mask utilities (include/fsa/mask.h, SPEC.md section 5): the validation every device shares, the
// dispatch by device (CUDA tensors go to src/cuda/mask_kernels.cu), and the CPU implementation.
//
// On the CPU, every output row is produced from its own O(Sk) scratch: the bias row is read through
// its broadcast strides, filled where the mask is False and turned into order-preserving integer
// keys; the window_size-th largest key is found among the few keys above a sampled lower bound.
// Three passes over the row in all; no (B, H, Sq, Sk) temporary.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "cpu/thread_pool.h"
#include "cuda/mask_backend.h"
#include "fsa/mask.h"

namespace fsa {
namespace {

using detail::bf16_to_float;
using detail::float_to_bf16;
using detail::float_to_half;
using detail::half_to_float;

// Rows times keys below which a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinElements = int64_t(1) << 15;

[[noreturn]] void fail(ErrorKind kind, const std::string& arg, const std::string& message) {
  throw Error(kind, arg, message);
}

std::string str(int64_t v) { return std::to_string(v); }

std::string shape_str(const std::array<int64_t, 4>& s) {
  return "(" + str(s[0]) + ", " + str(s[1]) + ", " + str(s[2]) + ", " + str(s[3]) + ")";
}

// Every tensor of a call must be on the device of the first one (`first`, named `first_name`).
void check_device(const TensorView& t, const char* name, const Device& first,
                  const char* first_name) {
  if (t.device != first) {
    fail(ErrorKind::kDevice, name,
         "expected a tensor on " + to_string(first) + " (" + first_name +
             "'s device), got one on " + to_string(t.device));
  }
}

bool on_cuda(const TensorView& t) { return t.device.type == DeviceType::kCUDA; }

void check_rank(const TensorView& t, const char* name, int rank, const char* dims) {
  if (t.rank != rank) {
    fail(ErrorKind::kShape, name,
         "expected " + str(rank) + " dims " + dims + ", got " + str(t.rank) + " dims with shape " +
             t.shape_string());
  }
}

void check_bool(const TensorView& t, const char* name) {
  if (t.dtype != DType::kBool) {
    fail(ErrorKind::kDType, name, "expected dtype bool, got " + to_string(t.dtype));
  }
}

void check_float(const TensorView& t, const char* name) {
  if (t.dtype == DType::kBool) {
    fail(ErrorKind::kDType, name,
         "expected a float dtype (float16, bfloat16, float32 or float64), got bool");
  }
}

void check_nonnegative_shape(const TensorView& t, const char* name) {
  for (int d = 0; d < t.rank; ++d) {
    if (t.shape[d] < 0) fail(ErrorKind::kShape, name, "negative size in shape " + t.shape_string());
  }
}

// An output is written through its strides: a stride-0 dim of size > 1 would make several
// logical elements share one byte.
void check_writable(const TensorView& t, const char* name) {
  for (int d = 0; d < t.rank; ++d) {
    if (t.shape[d] > 1 && t.stride[d] == 0) {
      fail(ErrorKind::kValue, name,
           "expected a writable view, got stride 0 on dim " + str(d) + " of size " +
               str(t.shape[d]));
    }
  }
}

void check_out_shape(const TensorView& out, const std::array<int64_t, 4>& expected,
                     const char* what) {
  check_rank(out, "out", 4, what);
  for (int d = 0; d < 4; ++d) {
    if (out.shape[d] != expected[d]) {
      fail(ErrorKind::kShape, "out",
           std::string("expected shape ") + shape_str(expected) + " " + what + ", got " +
               out.shape_string());
    }
  }
}

// Strides for reading `t` as if it had shape `full`: 0 on every dim where t has size 1.
std::array<int64_t, 4> read_strides(const TensorView& t, const std::array<int64_t, 4>& full) {
  std::array<int64_t, 4> s{};
  for (int d = 0; d < 4; ++d) s[d] = (t.shape[d] == 1 && full[d] != 1) ? 0 : t.stride[d];
  return s;
}

// ---- order-preserving integer keys
// --------------------------------------------------------------- A float's bits, remapped so that
// unsigned integer order is the float order; every NaN maps to the largest key, as torch.topk ranks
// NaN above +inf.

// Branch-free so that the row loops vectorize.
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t flip = uint32_t(int32_t(u) >> 31) | 0x80000000u;  // negative: all bits
  const uint32_t key = u ^ flip;
  return (u & 0x7fffffffu) > 0x7f800000u ? 0xffffffffu : key;  // NaN ranks highest
}

inline uint64_t order_key(double f) {
  uint64_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint64_t flip = uint64_t(int64_t(u) >> 63) | (uint64_t(1) << 63);
  const uint64_t key = u ^ flip;
  return (u & ~(uint64_t(1) << 63)) > 0x7ff0000000000000ull ? ~uint64_t(0) : key;
}

// ---- dtype plumbing
// --------------------------------------------------------------------------------

// Loads element `offset` of a float tensor as Value (double for float64, float otherwise).
template <typename Value>
inline Value load_value(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32:
      return Value(static_cast<const float*>(base)[offset]);
    case DType::kBFloat16:
      return Value(bf16_to_float(static_cast<const uint16_t*>(base)[offset]));
    case DType::kFloat16:
      return Value(half_to_float(static_cast<const uint16_t*>(base)[offset]));
    case DType::kFloat64:
      return Value(static_cast<const double*>(base)[offset]);
    case DType::kBool:
      break;
  }
  return Value(0);
}

// double -> float without undefined behaviour out of range: rounds to nearest, overflows to inf.
float narrow_to_float(double v) {
  if (std::isnan(v)) return std::numeric_limits<float>::quiet_NaN();
  // Half an ulp above FLT_MAX rounds to infinity.
  constexpr double kOverflow = double(FLT_MAX) + 0.5 * 2.028240960365167e31;  // 2^103 = ulp/2
  if (v >= kOverflow) return std::numeric_limits<float>::infinity();
  if (v <= -kOverflow) return -std::numeric_limits<float>::infinity();
  return float(v);
}

// The fill value as a masked_fill into `dtype` would store it, read back as Value.
template <typename Value>
Value rounded_fill(double min_value, DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return Value(min_value);
    case DType::kFloat32:
      return Value(narrow_to_float(min_value));
    case DType::kBFloat16:
      return Value(bf16_to_float(float_to_bf16(narrow_to_float(min_value))));
    case DType::kFloat16:
      return Value(half_to_float(float_to_half(narrow_to_float(min_value))));
    case DType::kBool:
      break;
  }
  return Value(0);
}

// The same fill as raw bits of `dtype`, zero-extended: what the CUDA kernels compare against.
uint64_t rounded_fill_bits(double min_value, DType dtype) {
  switch (dtype) {
    case DType::kFloat64: {
      uint64_t bits;
      std::memcpy(&bits, &min_value, sizeof(bits));
      return bits;
    }
    case DType::kFloat32:
      return detail::float_to_bits(narrow_to_float(min_value));
    case DType::kBFloat16:
      return float_to_bf16(narrow_to_float(min_value));
    case DType::kFloat16:
      return float_to_half(narrow_to_float(min_value));
    case DType::kBool:
      break;
  }
  return 0;
}

// ---- block smoothing of one row
// --------------------------------------------------------------------

void smooth_row(uint8_t* row, int64_t stride, int64_t n, int64_t block_size) {
  for (int64_t start = 0; start < n; start += block_size) {
    const int64_t len = std::min(block_size, n - start);
    int64_t count = 0;
    for (int64_t j = start; j < start + len; ++j) count += row[j * stride] != 0;
    const uint8_t keep = (2 * count > len) ? 1 : 0;  // strictly more than half
    for (int64_t j = start; j < start + len; ++j) row[j * stride] = keep;
  }
}

// Iterates the rows (all dims but the last) of a rank-1..4 view.
template <typename Fn>
void for_each_row(const TensorView& t, Fn&& fn) {
  int64_t lead[3] = {1, 1, 1}, lead_stride[3] = {0, 0, 0};
  for (int d = 0; d + 1 < t.rank; ++d) {
    lead[3 - (t.rank - 1) + d] = t.shape[d];
    lead_stride[3 - (t.rank - 1) + d] = t.stride[d];
  }
  for (int64_t a = 0; a < lead[0]; ++a)
    for (int64_t b = 0; b < lead[1]; ++b)
      for (int64_t c = 0; c < lead[2]; ++c)
        fn(a * lead_stride[0] + b * lead_stride[1] + c * lead_stride[2]);
}

// ---- dynamic mask
// ----------------------------------------------------------------------------------

// Element readers per storage dtype, so the row loops carry no per-element dtype switch.
struct LoadF32 {
  using Value = float;
  static float at(const void* p, int64_t o) { return static_cast<const float*>(p)[o]; }
};
struct LoadF16 {
  using Value = float;
  static float at(const void* p, int64_t o) {
    return half_to_float(static_cast<const uint16_t*>(p)[o]);
  }
};
struct LoadBF16 {
  using Value = float;
  static float at(const void* p, int64_t o) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[o]);
  }
};
struct LoadF64 {
  using Value = double;
  static double at(const void* p, int64_t o) { return static_cast<const double*>(p)[o]; }
};

// Top-k selection per row, exact, in three passes over the row:
//   1. the order keys of the filled row;
//   2. a lower bound for the k-th largest key from an evenly spaced sample of the row (a few
//      standard deviations of the sample rank below the estimate), and every key at or above it
//      gathered into a short candidate list (about k plus a margin); if the bound was too high,
//      the whole row is the candidate list;
//   3. nth_element over the candidates gives the exact threshold; the row is written.
// A histogram of key digits was tried first: its same-bin increments serialize on the store
// forwarding of one counter when the bias spans a narrow range (2.6 ns/key against ~0.8 here).
template <typename Key>
Key kth_largest_lower_bound(const Key* keys, int64_t n, int64_t k, std::vector<Key>& sample) {
  constexpr int64_t kSample = 1024;
  if (n <= 4 * kSample) return 0;  // short rows: every key is a candidate
  const int64_t step = n / kSample;
  sample.resize(size_t(kSample));
  for (int64_t i = 0; i < kSample; ++i) sample[size_t(i)] = keys[i * step];
  const double rank = double(k) * double(kSample) / double(n);  // k's rank within the sample
  const int64_t pos = int64_t(rank + 4.0 * std::sqrt(rank) + 16.0);
  if (pos >= kSample) return 0;
  std::nth_element(sample.begin(), sample.begin() + pos, sample.end(), std::greater<Key>());
  return sample[size_t(pos)];
}

// Uninitialized scratch that only grows: rows of 64K keys would otherwise cost an allocation, a
// zero fill and fresh page faults per row (measured: they were most of the time per call).
template <typename T>
class Buffer {
 public:
  T* get(int64_t n) {
    if (n > capacity_) {
      data_.reset(new T[size_t(n)]);
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t capacity_ = 0;
};

// Per-thread scratch of the top-k selection, kept across calls (the pool's threads persist).
template <typename Key>
struct RowScratch {
  Buffer<Key> keys;        // (Sk,) the filled row's order keys
  Buffer<Key> candidates;  // keys at or above the lower bound of the k-th largest
  std::vector<Key> sample;
};

template <typename Key>
RowScratch<Key>& row_scratch() {
  thread_local RowScratch<Key> scratch;
  return scratch;
}

template <typename Load>
void dynamic_mask_rows(const DynamicMaskArgs& a, const detail::DynamicMaskLayout& g) {
  using Value = typename Load::Value;
  using Key = std::conditional_t<std::is_same_v<Value, double>, uint64_t, uint32_t>;
  const int64_t sk = g.shape[3];
  const int64_t rows = g.shape[0] * g.shape[1] * g.shape[2];
  const Value fill = rounded_fill<Value>(a.min_value, a.attn_bias.dtype);
  // Entries equal to the fill are never kept; +0.0 and -0.0 are equal but have two keys.
  const Key fill_key = order_key(fill);
  const Key fill_key_alt = fill == Value(0) ? order_key(Value(-fill)) : fill_key;
  const bool topk = a.kind == MaskKind::kTopK;
  const int64_t k = g.window;
  const void* bias = a.attn_bias.data;
  const auto* mask = a.attn_mask ? static_cast<const uint8_t*>(a.attn_mask->data) : nullptr;
  auto* out = static_cast<uint8_t*>(a.out.data);
  const int64_t out_sk = a.out.stride[3], bias_sk = g.bias_stride[3], mask_sk = g.mask_stride[3];

  const int workers = rows * sk >= kParallelMinElements ? detail::cpu_threads() : 1;

  auto run_row = [&](int64_t row, int worker) {
    // Locals, not captures: bool stores may alias anything reached through the closure, which
    // would reload the bounds every element and keep the row loops from vectorizing.
    const int64_t n = sk, os = out_sk;
    const int64_t i = row % g.shape[2];
    const int64_t h = (row / g.shape[2]) % g.shape[1];
    const int64_t b = row / (g.shape[2] * g.shape[1]);
    const int64_t bias_base = b * g.bias_stride[0] + h * g.bias_stride[1] + i * g.bias_stride[2];
    const int64_t mask_base = b * g.mask_stride[0] + h * g.mask_stride[1] + i * g.mask_stride[2];
    uint8_t* out_row = out + b * a.out.stride[0] + h * a.out.stride[1] + i * a.out.stride[2];
    auto masked = [&](int64_t j) { return mask && !mask[mask_base + j * mask_sk]; };

    if (!topk) {
      for (int64_t j = 0; j < n; ++j) {
        const Value v = masked(j) ? fill : Load::at(bias, bias_base + j * bias_sk);
        out_row[j * os] = v > Value(0);
      }
    } else if (k <= 0) {
      for (int64_t j = 0; j < n; ++j) out_row[j * os] = 0;
    } else {
      RowScratch<Key>& s = row_scratch<Key>();
      Key* keys = s.keys.get(n);
      if (mask) {
        for (int64_t j = 0; j < n; ++j) {
          keys[j] = mask[mask_base + j * mask_sk]
                        ? order_key(Load::at(bias, bias_base + j * bias_sk))
                        : fill_key;
        }
      } else if (bias_sk == 1) {
        const int64_t base = bias_base;
        for (int64_t j = 0; j < n; ++j) keys[j] = order_key(Load::at(bias, base + j));
      } else {
        for (int64_t j = 0; j < n; ++j)
          keys[j] = order_key(Load::at(bias, bias_base + j * bias_sk));
      }
      auto is_fill = [fill_key, fill_key_alt](Key key) {
        return key == fill_key || key == fill_key_alt;
      };
      if (k >= n) {
        for (int64_t j = 0; j < n; ++j) out_row[j * os] = !is_fill(keys[j]);
      } else {
        const Key bound = kth_largest_lower_bound(keys, n, k, s.sample);
        Key* c = s.candidates.get(n);
        int64_t count = 0;
        for (int64_t j = 0; j < n; ++j) {  // branch-free compaction
          c[count] = keys[j];
          count += keys[j] >= bound;
        }
        if (count < k) {  // the bound was too high: every key is a candidate
          std::copy(keys, keys + n, c);
          count = n;
        }
        std::nth_element(c, c + (k - 1), c + count, std::greater<Key>());
        const Key threshold = c[k - 1], fill0 = fill_key, fill1 = fill_key_alt;
        int64_t above = 0, equal = 0;  // every key at or above the threshold is a candidate
        for (int64_t t = 0; t < count; ++t) {
          above += c[t] > threshold;
          equal += c[t] == threshold;
        }
        // The top k: every key above the threshold, and the first `ties` keys equal to it (torch
        // leaves the choice among equal values unspecified; the lowest indices are taken here).
        // An entry equal to the fill is dropped, so masked keys are never kept.
        int64_t ties = k - above;
        const bool all_ties = ties == equal;  // the usual case: no duplicate at the threshold
        uint8_t* o = out_row;
        if (all_ties) {
          for (int64_t j = 0; j < n; ++j) {
            const Key key = keys[j];
            o[j * os] = (key >= threshold) & (key != fill0) & (key != fill1);
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            const Key key = keys[j];
            o[j * os] = (key > threshold) & (key != fill0) & (key != fill1);
          }
          if (threshold != fill0 && threshold != fill1) {
            for (int64_t j = 0; j < n && ties > 0; ++j) {
              if (keys[j] == threshold) {
                o[j * os] = 1;
                --ties;
              }
            }
          }
        }
      }
    }
    if (a.block_size > 1) smooth_row(out_row, out_sk, sk, a.block_size);
  };

  if (workers > 1) {
    detail::parallel_for(rows, run_row);
  } else {
    for (int64_t r = 0; r < rows; ++r) run_row(r, 0);
  }
}

// ---- block selection
// -------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool selectable(double score) { return score > -std::numeric_limits<double>::infinity(); }

template <typename Value>
void select_blocks_impl(const BlockSelectArgs& a) {
  const TensorView& bias = a.attn_bias;
  const int64_t sq = a.seqlen_q, sk = bias.shape[3];
  const int64_t bm = a.block_m, bn = a.block_n;
  const int64_t m_blocks = ceil_div(sq, bm), n_blocks = ceil_div(sk, bn);
  const int64_t bias_rows = bias.shape[2];  // 1 or sq
  const int64_t out_b = a.out.shape[0], out_h = a.out.shape[1];
  const int64_t tasks = out_b * out_h;
  const int64_t offset = sk - sq;  // diagonal key of row i: i + offset
  auto* out = static_cast<uint8_t*>(a.out.data);

  const int workers =
      tasks > 1 && tasks * bias_rows * sk >= kParallelMinElements ? detail::cpu_threads() : 1;
  struct Scratch {
    std::vector<double> score;   // (n_blocks,)
    std::vector<double> sum;     // (n_blocks,) running reductions for one query block
    std::vector<int64_t> count;  // (n_blocks,)
    std::vector<int32_t> order;  // candidate block indices
  };
  std::vector<Scratch> scratch(static_cast<size_t>(workers));

  auto run = [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t ob = task / out_h, oh = task % out_h;
    const int64_t b = bias.shape[0] == 1 ? 0 : ob, h = bias.shape[1] == 1 ? 0 : oh;
    const int64_t base = b * bias.stride[0] + h * bias.stride[1];
    s.score.assign(size_t(n_blocks), 0.0);

    // Block scores over rows [r0, r1) of the bias (one row when it is broadcast over queries).
    auto reduce_rows = [&](int64_t r0, int64_t r1) {
      s.sum.assign(size_t(n_blocks),
                   a.reduce == BlockReduce::kMax ? -std::numeric_limits<double>::infinity() : 0.0);
      s.count.assign(size_t(n_blocks), 0);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < sk; ++j) {
          double x = double(load_value<Value>(bias.data, bias.dtype,
                                              base + r * bias.stride[2] + j * bias.stride[3]));
          if (std::isnan(x)) x = -std::numeric_limits<double>::infinity();  // never selected
          const size_t n = size_t(j / bn);
          if (a.reduce == BlockReduce::kMax) {
            s.sum[n] = std::max(s.sum[n], x);
          } else {
            s.sum[n] += x;
            ++s.count[n];
          }
        }
      }
      for (int64_t n = 0; n < n_blocks; ++n) {
        s.score[size_t(n)] =
            a.reduce == BlockReduce::kMax
                ? s.sum[size_t(n)]
                : (s.count[size_t(n)] ? s.sum[size_t(n)] / double(s.count[size_t(n)])
                                      : -std::numeric_limits<double>::infinity());
        if (std::isnan(s.score[size_t(n)])) {
          s.score[size_t(n)] = -std::numeric_limits<double>::infinity();  // +inf + -inf
        }
      }
    };
    if (bias_rows == 1) reduce_rows(0, 1);

    for (int64_t m = 0; m < m_blocks; ++m) {
      const int64_t r0 = m * bm, r1 = std::min(sq, r0 + bm);  // rows [r0, r1)
      if (bias_rows != 1) reduce_rows(r0, r1);
      uint8_t* out_row = out + ob * a.out.stride[0] + oh * a.out.stride[1] + m * a.out.stride[2];
      for (int64_t n = 0; n < n_blocks; ++n) out_row[n * a.out.stride[3]] = 0;

      // Candidates compete by score in [0, first_required); [first_required, last_required] are
      // the blocks holding the rows' diagonal keys, kept unconditionally.
      int64_t candidates = n_blocks, first_required = n_blocks, last_required = -1;
      if (a.is_causal) {
        const int64_t diag_last = (r1 - 1) + offset;
        if (diag_last < 0) continue;  // every row of this block sees no key
        const int64_t diag_first = std::max<int64_t>(r0 + offset, 0);
        first_required = diag_first / bn;
        last_required = diag_last / bn;
        candidates = first_required;
        for (int64_t n = first_required; n <= last_required; ++n) out_row[n * a.out.stride[3]] = 1;
      }
      s.order.clear();
      for (int64_t n = 0; n < candidates; ++n) {
        if (selectable(s.score[size_t(n)])) s.order.push_back(int32_t(n));
      }
      const auto better = [&](int32_t x, int32_t y) {
        const double sx = s.score[size_t(x)], sy = s.score[size_t(y)];
        return sx > sy || (sx == sy && x < y);
      };
      if (int64_t(s.order.size()) > a.top_k) {
        std::nth_element(s.order.begin(), s.order.begin() + a.top_k, s.order.end(), better);
        s.order.resize(size_t(a.top_k));
      }
      for (int32_t n : s.order) out_row[n * a.out.stride[3]] = 1;
    }
  };

  if (workers > 1) {
    detail::parallel_for(tasks, run);
  } else {
    for (int64_t t = 0; t < tasks; ++t) run(t, 0);
  }
}

}  // namespace

// ---- public entry points
// ---------------------------------------------------------------------------

std::array<int64_t, 4> dynamic_mask_shape(const TensorView& attn_bias,
                                          const std::optional<TensorView>& attn_mask) {
  check_rank(attn_bias, "attention_bias", 4, "({B|1}, {H|1}, {Sq|1}, Sk)");
  check_nonnegative_shape(attn_bias, "attention_bias");
  std::array<int64_t, 4> shape{attn_bias.shape[0], attn_bias.shape[1], attn_bias.shape[2],
                               attn_bias.shape[3]};
  if (!attn_mask) return shape;
  check_rank(*attn_mask, "attention_mask", 4, "({B|1}, {H|1}, {Sq|1}, {Sk|1})");
  check_nonnegative_shape(*attn_mask, "attention_mask");
  for (int d = 0; d < 4; ++d) {
    const int64_t x = shape[d], y = attn_mask->shape[d];
    if (x != y && x != 1 && y != 1) {
      fail(ErrorKind::kShape, "attention_mask",
           "shape " + attn_mask->shape_string() + " does not broadcast with attention_bias's " +
               attn_bias.shape_string() + " (dim " + str(d) + ": " + str(y) + " vs " + str(x) +
               "; each dim must match or be 1)");
    }
    shape[d] = x == 1 ? y : x;
  }
  return shape;
}

void dynamic_mask(const DynamicMaskArgs& args) {
  const TensorView& bias = args.attn_bias;
  check_float(bias, "attention_bias");
  const std::array<int64_t, 4> shape = dynamic_mask_shape(bias, args.attn_mask);
  if (args.attn_mask) {
    check_device(*args.attn_mask, "attention_mask", bias.device, "attention_bias");
    check_bool(*args.attn_mask, "attention_mask");
  }
  if (args.kind == MaskKind::kTopK && args.window_size < 0) {
    fail(ErrorKind::kValue, "window_size", "expected >= 0, got " + str(args.window_size));
  }
  if (args.block_size <= 0) {
    fail(ErrorKind::kValue, "block_size",
         "expected a positive integer, got " + str(args.block_size));
  }
  if (std::isnan(args.min_value))
    fail(ErrorKind::kValue, "min_dtype", "expected a number, got NaN");
  check_device(args.out, "out", bias.device, "attention_bias");
  check_bool(args.out, "out");
  check_out_shape(args.out, shape, "(the broadcast of attention_bias and attention_mask)");
  check_writable(args.out, "out");

  if (shape[0] * shape[1] * shape[2] * shape[3] == 0) return;
  detail::DynamicMaskLayout g;
  g.shape = shape;
  g.bias_stride = read_strides(bias, shape);
  if (args.attn_mask) g.mask_stride = read_strides(*args.attn_mask, shape);
  g.window = args.kind == MaskKind::kTopK ? std::min(args.window_size, shape[3]) : 0;
  g.fill_bits = rounded_fill_bits(args.min_value, bias.dtype);
  if (on_cuda(bias)) {
    detail::cuda::dynamic_mask(args, g);
    return;
  }
  switch (bias.dtype) {
    case DType::kFloat32:
      dynamic_mask_rows<LoadF32>(args, g);
      break;
    case DType::kFloat16:
      dynamic_mask_rows<LoadF16>(args, g);
      break;
    case DType::kBFloat16:
      dynamic_mask_rows<LoadBF16>(args, g);
      break;
    case DType::kFloat64:
      dynamic_mask_rows<LoadF64>(args, g);
      break;
    case DType::kBool:
      break;  // rejected above
  }
}

void block_smooth(const TensorView& mask, int64_t block_size, void* stream) {
  check_bool(mask, "attention_mask");
  if (mask.rank < 1 || mask.rank > 4) {
    fail(ErrorKind::kShape, "attention_mask",
         "expected 1 to 4 dims (key dim last), got " + str(mask.rank));
  }
  check_nonnegative_shape(mask, "attention_mask");
  if (block_size <= 0) {
    fail(ErrorKind::kValue, "block_size", "expected a positive integer, got " + str(block_size));
  }
  check_writable(mask, "attention_mask");
  if (block_size == 1 || mask.numel() == 0) return;
  if (on_cuda(mask)) {
    detail::cuda::block_smooth(mask, block_size, stream);
    return;
  }
  auto* data = static_cast<uint8_t*>(mask.data);
  const int64_t n = mask.shape[mask.rank - 1], stride = mask.stride[mask.rank - 1];
  for_each_row(mask, [&](int64_t offset) { smooth_row(data + offset, stride, n, block_size); });
}

void expand_mask_2d(const TensorView& mask_2d, int64_t query_len, int64_t key_len,
                    const TensorView& out, void* stream) {
  check_bool(mask_2d, "attention_mask");
  check_rank(mask_2d, "attention_mask", 2, "(batch_size, seq_len)");
  check_nonnegative_shape(mask_2d, "attention_mask");
  if (query_len < 0) fail(ErrorKind::kValue, "query_len", "expected >= 0, got " + str(query_len));
  if (key_len < 0) fail(ErrorKind::kValue, "key_len", "expected >= 0, got " + str(key_len));
  const int64_t batch = mask_2d.shape[0], width = mask_2d.shape[1];
  int64_t pad = 0;
  if (width == key_len) {
    pad = 0;
  } else if (width == query_len && key_len > query_len) {
    pad = key_len - query_len;
  } else {
    fail(ErrorKind::kShape, "attention_mask",
         "a 2-D mask must have width key_len (" + str(key_len) + ") or query_len (" +
             str(query_len) + ", left-padded with True when key_len > query_len), got shape " +
             mask_2d.shape_string());
  }
  check_device(out, "out", mask_2d.device, "attention_mask");
  check_bool(out, "out");
  check_out_shape(out, {batch, 1, 1, key_len}, "(batch_size, 1, 1, key_len)");
  check_writable(out, "out");
  if (batch * key_len == 0) return;
  if (on_cuda(mask_2d)) {
    detail::cuda::expand_mask_2d(mask_2d, pad, out, stream);
    return;
  }
  const auto* src = static_cast<const uint8_t*>(mask_2d.data);
  auto* dst = static_cast<uint8_t*>(out.data);
  for (int64_t b = 0; b < batch; ++b) {
    uint8_t* row = dst + b * out.stride[0];
    for (int64_t j = 0; j < pad; ++j) row[j * out.stride[3]] = 1;
    for (int64_t j = 0; j < width; ++j) {
      row[(pad + j) * out.stride[3]] = src[b * mask_2d.stride[0] + j * mask_2d.stride[1]] != 0;
    }
  }
}

void select_blocks(const BlockSelectArgs& args) {
  const TensorView& bias = args.attn_bias;
  check_float(bias, "attention_bias");
  check_rank(bias, "attention_bias", 4, "({B|1}, {H|Hk|1}, {Sq|1}, Sk)");
  check_nonnegative_shape(bias, "attention_bias");
  if (args.seqlen_q < 0) {
    fail(ErrorKind::kValue, "query_len", "expected >= 0, got " + str(args.seqlen_q));
  }
  if (bias.shape[2] != 1 && bias.shape[2] != args.seqlen_q) {
    fail(ErrorKind::kShape, "attention_bias",
         "expected query dim 1 or query_len (" + str(args.seqlen_q) + "), got shape " +
             bias.shape_string());
  }
  if (args.block_m < 1)
    fail(ErrorKind::kValue, "block_m", "expected >= 1, got " + str(args.block_m));
  if (args.block_n < 1)
    fail(ErrorKind::kValue, "block_n", "expected >= 1, got " + str(args.block_n));
  if (args.top_k < 0) fail(ErrorKind::kValue, "top_k", "expected >= 0, got " + str(args.top_k));
  check_device(args.out, "out", bias.device, "attention_bias");
  check_bool(args.out, "out");
  check_rank(args.out, "out", 4, "(batch, heads, query blocks, key blocks)");
  const std::array<int64_t, 4> expected{bias.shape[0] == 1 ? args.out.shape[0] : bias.shape[0],
                                        bias.shape[1] == 1 ? args.out.shape[1] : bias.shape[1],
                                        ceil_div(args.seqlen_q, args.block_m),
                                        ceil_div(bias.shape[3], args.block_n)};
  check_out_shape(args.out, expected,
                  "(attention_bias's batch and heads, ceil(query_len / block_m), "
                  "ceil(key_len / block_n))");
  check_writable(args.out, "out");
  if (args.out.numel() == 0) return;
  if (on_cuda(bias)) {
    detail::cuda::select_blocks(args);
    return;
  }
  if (bias.dtype == DType::kFloat64) {
    select_blocks_impl<double>(args);
  } else {
    select_blocks_impl<float>(args);
  }
}

}  // namespace fsa
