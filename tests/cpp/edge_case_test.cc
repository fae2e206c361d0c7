// Edge cases beyond the SPEC section 7 grid, all against the fp64 reference under the pass rule
// unless said otherwise: no keys at all, causal rows that see nothing, -inf bias, NaN inputs,
// arbitrary strides (transposed and padded layouts, stride-0 expanded mask and bias), and element
// offsets past 2^32 (64-bit indexing).
//
// Odd sizes, each on purpose: Sq = 17 and Sk = 17 are smaller than one tile and prime (a single
// ragged tile); 97 is prime (a ragged last tile for any power-of-two tile); 130 = 2 * 64 + 2
// leaves a two-key tail tile; Sk = 0 makes every row empty.

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#include "harness.h"
#include "test_dtypes.h"

namespace fsa_test {
namespace {

using fsa::DType;

class EdgeCase : public ::testing::TestWithParam<DType> {};
INSTANTIATE_TEST_SUITE_P(CPU, EdgeCase,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         dtype_param_name);

// ---- empty rows ---------------------------------------------------------------------------------

TEST_P(EdgeCase, NoKeys_Sk0_EveryRowEmpty_ZeroOutLseMinusInfZeroDq) {
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "non-causal");
    CaseSpec spec = case_spec(GetParam(), 2, 17, 0, 4, 2, 32);
    spec.causal = causal;
    expect_case_matches_reference(spec);
  }
}

// The same with every view of the key side laid out by the plain product of sizes, which gives an
// empty tensor stride 0 on its outer dims: nothing can alias in a tensor without elements, so
// these strides are as valid as any.
TEST(EmptyTensors, NoKeys_Sk0_ZeroStridesOnEmptyViewsAccepted) {
  CaseSpec spec = case_spec(DType::kFloat32, 2, 17, 0, 4, 2, 32);
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  LibraryBuffers buffers(p, in, spec.dtype, spec.dtype);
  const fsa::AttentionOptions options = make_options(spec);
  const std::vector<int64_t> kv_shape{2, 0, 2, 32}, product_strides{0, 64, 32, 1};
  auto empty_view = [&](HostTensor& t) {
    return make_view(t.data(), t.dtype(), kv_shape, product_strides);
  };
  fsa::ForwardArgs f = buffers.forward_args(options);
  f.key = empty_view(buffers.k);
  f.value = empty_view(buffers.v);
  fsa::forward(f);
  fsa::BackwardArgs bw = buffers.backward_args(options);
  bw.key = f.key;
  bw.value = f.value;
  bw.dkey = empty_view(buffers.dk);
  bw.dvalue = empty_view(buffers.dv);
  fsa::backward(bw);
  expect_matches_reference(p, in, buffers.outputs(true), spec.dtype, spec.dtype, true);
}

// Stride 0 on every dim of a view without elements, the last dim's included: torch hands the
// backward of an output with no queries (Sq = 0) its expanded gradient so, e.g. from
// out.sum().backward(), and no queries leave dkey and dvalue exactly 0. The same for the key side
// with no keys (Sk = 0: out 0, lse -inf, dquery 0).
TEST(EmptyTensors, ZeroStridesOnEveryDimOfEmptyViewsAccepted) {
  for (const bool no_queries : {true, false}) {
    SCOPED_TRACE(no_queries ? "Sq = 0" : "Sk = 0");
    CaseSpec spec = case_spec(DType::kBFloat16, 2, no_queries ? 0 : 17, no_queries ? 17 : 0, 4,
                              2, 32);
    spec.bias_shape = Shape4{2, 2, 1, spec.seqlen_k};
    const Problem p = make_problem(spec);
    const Inputs in = make_inputs(spec, p);
    LibraryBuffers buffers(p, in, spec.dtype, spec.dtype);
    const fsa::AttentionOptions options = make_options(spec);
    const std::vector<int64_t> zero_strides{0, 0, 0, 0};
    auto empty_view = [&](HostTensor& t, int64_t heads) {
      return make_view(t.data(), t.dtype(), {2, 0, heads, 32}, zero_strides);
    };
    fsa::ForwardArgs f = buffers.forward_args(options);
    fsa::BackwardArgs bw = buffers.backward_args(options);
    if (no_queries) {
      f.query = bw.query = empty_view(buffers.q, 4);
      f.out = bw.out = empty_view(buffers.out, 4);
      bw.dout = empty_view(buffers.dout, 4);
      bw.dquery = empty_view(buffers.dq, 4);
    } else {
      f.key = bw.key = empty_view(buffers.k, 2);
      f.value = bw.value = empty_view(buffers.v, 2);
      bw.dkey = empty_view(buffers.dk, 2);
      bw.dvalue = empty_view(buffers.dv, 2);
    }
    fsa::forward(f);
    fsa::backward(bw);
    expect_matches_reference(p, in, buffers.outputs(true), spec.dtype, spec.dtype, true);
  }
}

// Bottom-right causal with Sq > Sk: rows 0..79 see nothing; a full bias checks that dbias is
// exactly 0 on them.
TEST_P(EdgeCase, CausalSqAboveSk_LeadingRowsEmpty) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 17, 4, 2, 32);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 4, 97, 17};
  expect_case_matches_reference(spec);
}

// SPEC section 2: a bias of -inf acts as a mask. 30% of the bias is -inf and, in head 1, every
// row i with i % 7 == 3 is entirely -inf (an empty row made by the bias alone).
TEST_P(EdgeCase, MinusInfinityBiasActsAsMask_IncludingWholeRows) {
  CaseSpec spec = case_spec(GetParam(), 2, 64, 80, 4, 2, 16);
  spec.bias_shape = Shape4{2, 4, 64, 80};
  const Problem p = make_problem(spec);
  Inputs in = make_inputs(spec, p);
  Rng rng(3);
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t h = 0; h < 4; ++h) {
      for (int64_t i = 0; i < 64; ++i) {
        for (int64_t j = 0; j < 80; ++j) {
          double& bias = in.bias[((b * 4 + h) * 64 + i) * 80 + j];
          if (rng.bernoulli(0.3) || (h == 1 && i % 7 == 3)) bias = -inf;
        }
      }
    }
  }
  const Outputs ours = run_library(p, in, spec.dtype, spec.dtype, make_options(spec), true);
  expect_matches_reference(p, in, ours, spec.dtype, spec.dtype, true);
}

// ---- NaN / Inf isolation (SPEC section 6) -------------------------------------------------------

// (B, Sq, Sk, H, Hk, D) = (2, 97, 130, 4, 2, 32) with a per-kv-head mask and a full bias, run
// twice: on clean inputs and with one element poisoned. In exact math the poison reaches only
// what depends on that element; everything else must be computed exactly as without it (bitwise:
// the CPU backend is deterministic).
struct PoisonRuns {
  static constexpr int64_t kSq = 97, kSk = 130, kH = 4, kHk = 2, kD = 32;
  CaseSpec spec;
  Problem problem;
  Inputs clean, poisoned;
  Outputs clean_out, poisoned_out;

  // `prepare` edits both runs' inputs (e.g. the mask); `poison` only the poisoned run's.
  PoisonRuns(DType dtype, const std::function<void(Inputs&)>& poison,
             const std::function<void(Inputs&)>& prepare = nullptr) {
    spec = case_spec(dtype, 2, kSq, kSk, kH, kHk, kD);
    spec.mask_shape = Shape4{2, kHk, kSq, kSk};
    spec.bias_shape = Shape4{2, kH, kSq, kSk};
    problem = make_problem(spec);
    clean = make_inputs(spec, problem);
    if (prepare) prepare(clean);
    poisoned = clean;
    poison(poisoned);
    const fsa::AttentionOptions options = make_options(spec);
    clean_out = run_library(problem, clean, dtype, dtype, options, true);
    poisoned_out = run_library(problem, poisoned, dtype, dtype, options, true);
  }
  bool attends(int64_t b, int64_t hk, int64_t i, int64_t j) const {
    return clean.mask[((b * kHk + hk) * kSq + i) * kSk + j] != 0;
  }
};

// Entries where `poisoned_at` holds must satisfy `expected`; all others must equal the clean run
// bit for bit.
void expect_poison_confined(const char* name, const std::vector<double>& clean,
                            const std::vector<double>& poisoned,
                            const std::function<bool(int64_t)>& poisoned_at,
                            const std::function<bool(double)>& expected,
                            const char* expected_name) {
  ASSERT_EQ(clean.size(), poisoned.size());
  int64_t wrong = 0, first = -1;
  for (int64_t e = 0; e < static_cast<int64_t>(poisoned.size()); ++e) {
    const bool ok = poisoned_at(e) ? expected(poisoned[e])
                                   : std::memcmp(&poisoned[e], &clean[e], sizeof(double)) == 0;
    if (!ok && wrong++ == 0) first = e;
  }
  EXPECT_EQ(wrong, 0)
      << name << ": " << wrong << " entries wrong (expected " << expected_name
      << " where the poison reaches, the clean value elsewhere); first at flat index " << first
      << ": " << (first >= 0 ? poisoned[first] : 0.0) << ", clean "
      << (first >= 0 ? clean[first] : 0.0);
}

bool is_nan(double x) { return std::isnan(x); }

// One NaN in q at (b 1, row 40, head 2, d 5): that row's scores are all NaN, so its LSE and
// output are NaN; every other row and LSE is untouched.
constexpr int64_t kNaNBatch = 1, kNaNRow = 40, kNaNHead = 2, kNaNKvHead = 1;

void poison_query(Inputs& in) {
  in.q[((kNaNBatch * PoisonRuns::kSq + kNaNRow) * PoisonRuns::kH + kNaNHead) * PoisonRuns::kD + 5] =
      std::numeric_limits<double>::quiet_NaN();
}

TEST_P(EdgeCase, NaNInOneQueryRow_Forward_OnlyThatRowsOutAndLseAreNaN) {
  const PoisonRuns r(GetParam(), poison_query);
  const int64_t q_row = (kNaNBatch * r.kSq + kNaNRow) * r.kH + kNaNHead;  // (B, Sq, H) row
  expect_poison_confined(
      "out", r.clean_out.out, r.poisoned_out.out, [&](int64_t e) { return e / r.kD == q_row; },
      is_nan, "NaN");
  expect_poison_confined(
      "lse", r.clean_out.lse, r.poisoned_out.lse,
      [&](int64_t e) { return e == (kNaNBatch * r.kH + kNaNHead) * r.kSq + kNaNRow; }, is_nan,
      "NaN");
}

// Backward of the same: dq of that row, dk/dv of the keys that row attends and that row's dbias
// entries at attended keys are NaN. Keys it does not attend (masked) get nothing from it in exact
// math, so their dk/dv, and its dbias at masked entries (exactly 0), must stay clean.
TEST_P(EdgeCase, NaNInOneQueryRow_Backward_OnlyGradientsOfAttendedEntriesAreNaN) {
  const PoisonRuns r(GetParam(), poison_query);
  const int64_t q_row = (kNaNBatch * r.kSq + kNaNRow) * r.kH + kNaNHead;
  expect_poison_confined(
      "dq", r.clean_out.dq, r.poisoned_out.dq, [&](int64_t e) { return e / r.kD == q_row; }, is_nan,
      "NaN");
  auto kv_poisoned = [&](int64_t e) {  // dk / dv are (B, Sk, Hk, D)
    const int64_t row = e / r.kD, hk = row % r.kHk, j = (row / r.kHk) % r.kSk,
                  b = row / (r.kHk * r.kSk);
    return b == kNaNBatch && hk == kNaNKvHead && r.attends(b, hk, kNaNRow, j);
  };
  expect_poison_confined("dk", r.clean_out.dk, r.poisoned_out.dk, kv_poisoned, is_nan, "NaN");
  expect_poison_confined("dv", r.clean_out.dv, r.poisoned_out.dv, kv_poisoned, is_nan, "NaN");
  expect_poison_confined(
      "dbias", r.clean_out.dbias, r.poisoned_out.dbias,
      [&](int64_t e) {  // dbias is (B, H, Sq, Sk)
        return e / r.kSk == (kNaNBatch * r.kH + kNaNHead) * r.kSq + kNaNRow &&
               r.attends(kNaNBatch, kNaNKvHead, kNaNRow, e % r.kSk);
      },
      is_nan, "NaN");
}

// +Inf in v at (b 0, key 17, kv head 0, d 3): in exact math only column d 3 of the outputs of rows
// attending key 17 (query heads 0 and 1) becomes +Inf; every other output entry and every LSE
// (which does not read v) is untouched.
TEST_P(EdgeCase, InfInOneValueElement_Forward_OnlyThatColumnOfAttendingRowsIsInf) {
  constexpr int64_t kKey = 17, kDim = 3;
  const PoisonRuns r(GetParam(), [](Inputs& in) {
    in.v[((0 * PoisonRuns::kSk + kKey) * PoisonRuns::kHk + 0) * PoisonRuns::kD + kDim] =
        std::numeric_limits<double>::infinity();
  });
  expect_poison_confined(
      "out", r.clean_out.out, r.poisoned_out.out,
      [&](int64_t e) {  // out is (B, Sq, H, D)
        const int64_t d = e % r.kD, h = (e / r.kD) % r.kH, i = (e / (r.kD * r.kH)) % r.kSq,
                      b = e / (r.kD * r.kH * r.kSq);
        return b == 0 && h / (r.kH / r.kHk) == 0 && d == kDim && r.attends(0, 0, i, kKey);
      },
      [](double x) { return x == std::numeric_limits<double>::infinity(); }, "+Inf");
  expect_poison_confined(
      "lse", r.clean_out.lse, r.poisoned_out.lse, [](int64_t) { return false; }, is_nan,
      "(nothing)");
}

// NaN in every element of k and v at a key that the mask hides from every row of its kv head
// (b 0, kv head 1, key 50) - garbage in a masked padding slot of a KV cache. In exact math a
// masked key contributes nothing, so every output and gradient must equal the clean run's bit for
// bit, and dk/dv of that key are exactly 0.
TEST_P(EdgeCase, NaNInAMaskedOutKeyAndValue_ChangesNothing) {
  constexpr int64_t kKey = 50, kKvHead = 1;
  auto hide_key = [](Inputs& in) {
    for (int64_t i = 0; i < PoisonRuns::kSq; ++i) {
      in.mask[((0 * PoisonRuns::kHk + kKvHead) * PoisonRuns::kSq + i) * PoisonRuns::kSk + kKey] = 0;
    }
  };
  const PoisonRuns r(
      GetParam(),
      [&](Inputs& in) {
        for (int64_t d = 0; d < PoisonRuns::kD; ++d) {
          const int64_t e =
              ((0 * PoisonRuns::kSk + kKey) * PoisonRuns::kHk + kKvHead) * PoisonRuns::kD + d;
          in.k[e] = in.v[e] = std::numeric_limits<double>::quiet_NaN();
        }
      },
      hide_key);
  const auto nothing = [](int64_t) { return false; };
  expect_poison_confined("out", r.clean_out.out, r.poisoned_out.out, nothing, is_nan, "(nothing)");
  expect_poison_confined("lse", r.clean_out.lse, r.poisoned_out.lse, nothing, is_nan, "(nothing)");
  expect_poison_confined("dq", r.clean_out.dq, r.poisoned_out.dq, nothing, is_nan, "(nothing)");
  expect_poison_confined("dk", r.clean_out.dk, r.poisoned_out.dk, nothing, is_nan, "(nothing)");
  expect_poison_confined("dv", r.clean_out.dv, r.poisoned_out.dv, nothing, is_nan, "(nothing)");
  expect_poison_confined("dbias", r.clean_out.dbias, r.poisoned_out.dbias, nothing, is_nan,
                         "(nothing)");
}

// ---- strides ------------------------------------------------------------------------------------

// A tensor with arbitrary (non-negative) strides over its own storage: heap memory, or, for
// strides whose offsets pass 2^32 elements, a sparse anonymous mapping (MAP_NORESERVE) of which
// only the pages actually touched ever get memory.
class StridedTensor {
 public:
  StridedTensor(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides, bool sparse)
      : dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)) {
    int64_t span = 1;
    for (size_t d = 0; d < shape_.size(); ++d) span += (shape_[d] - 1) * strides_[d];
    bytes_ = static_cast<size_t>(span) * element_size(dtype_);
    if (sparse) {
      void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p != MAP_FAILED) mapped_ = static_cast<uint8_t*>(p);
    } else {
      heap_.assign(bytes_, 0);
    }
  }
  ~StridedTensor() {
    if (mapped_) munmap(mapped_, bytes_);
  }
  StridedTensor(const StridedTensor&) = delete;
  StridedTensor& operator=(const StridedTensor&) = delete;

  bool ok() const { return mapped_ != nullptr || !heap_.empty(); }
  size_t bytes() const { return bytes_; }
  fsa::TensorView view() { return make_view(data(), dtype_, shape_, strides_); }

  // Element `flat` of the row-major compact layout -> element offset in this layout.
  int64_t offset(int64_t flat) const {
    int64_t off = 0;
    for (int d = static_cast<int>(shape_.size()) - 1; d >= 0; --d) {
      off += (flat % shape_[d]) * strides_[d];
      flat /= shape_[d];
    }
    return off;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (const int64_t s : shape_) n *= s;
    return n;
  }
  void store(const std::vector<double>& compact) {
    for (int64_t e = 0; e < numel(); ++e) store_element(data(), dtype_, offset(e), compact[e]);
  }
  std::vector<double> load() const {
    std::vector<double> compact(numel());
    for (int64_t e = 0; e < numel(); ++e) compact[e] = load_element(data(), dtype_, offset(e));
    return compact;
  }

 private:
  void* data() const { return mapped_ ? mapped_ : const_cast<uint8_t*>(heap_.data()); }

  DType dtype_;
  std::vector<int64_t> shape_, strides_;
  size_t bytes_ = 0;
  uint8_t* mapped_ = nullptr;
  std::vector<uint8_t> heap_;
};

std::vector<int64_t> shape_of(const Shape4& s) { return {s[0], s[1], s[2], s[3]}; }

// Where run_strided puts each tensor: strides(name, shape) gives the strides of the tensor the
// library calls `name`; sparse maps the storage with MAP_NORESERVE instead of allocating it.
struct Layouts {
  std::function<std::vector<int64_t>(const std::string&, const std::vector<int64_t>&)> strides;
  bool sparse = false;
};

// Forward + backward with every tensor laid out as `layouts` says; the outputs come back in
// compact order, or nullopt with the reason when the storage could not be mapped.
std::optional<Outputs> run_strided(const Problem& p, const Inputs& in, DType dtype,
                                   const fsa::AttentionOptions& options, const Layouts& layouts,
                                   std::string* why_not) {
  const std::vector<int64_t> q_shape{p.batch, p.seqlen_q, p.heads, p.head_dim};
  const std::vector<int64_t> kv_shape{p.batch, p.seqlen_k, p.kv_heads, p.head_dim};
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.seqlen_q};
  std::vector<std::unique_ptr<StridedTensor>> owned;
  auto make = [&](const std::string& name, DType t, const std::vector<int64_t>& shape) {
    owned.push_back(
        std::make_unique<StridedTensor>(t, shape, layouts.strides(name, shape), layouts.sparse));
    if (!owned.back()->ok() && why_not->empty()) {
      *why_not = "could not map " + std::to_string(owned.back()->bytes()) + " bytes for " + name +
                 " (MAP_NORESERVE needs vm.overcommit_memory 0 or 1)";
    }
    return owned.back().get();
  };
  StridedTensor* q = make("query", dtype, q_shape);
  StridedTensor* k = make("key", dtype, kv_shape);
  StridedTensor* v = make("value", dtype, kv_shape);
  StridedTensor* dout = make("dout", dtype, q_shape);
  StridedTensor* out = make("out", dtype, q_shape);
  StridedTensor* lse = make("lse", DType::kFloat32, lse_shape);
  StridedTensor* dq = make("dquery", dtype, q_shape);
  StridedTensor* dk = make("dkey", dtype, kv_shape);
  StridedTensor* dv = make("dvalue", dtype, kv_shape);
  StridedTensor* mask =
      p.mask_shape ? make("attn_mask", DType::kBool, shape_of(*p.mask_shape)) : nullptr;
  StridedTensor* bias = p.bias_shape ? make("attn_bias", dtype, shape_of(*p.bias_shape)) : nullptr;
  StridedTensor* dbias = p.bias_shape ? make("dbias", dtype, shape_of(*p.bias_shape)) : nullptr;
  if (!why_not->empty()) return std::nullopt;
  q->store(in.q);
  k->store(in.k);
  v->store(in.v);
  dout->store(in.dout);
  if (mask) mask->store(std::vector<double>(in.mask.begin(), in.mask.end()));
  if (bias) bias->store(in.bias);

  fsa::ForwardArgs f;
  f.query = q->view();
  f.key = k->view();
  f.value = v->view();
  if (mask) f.attn_mask = mask->view();
  if (bias) f.attn_bias = bias->view();
  f.options = options;
  f.out = out->view();
  f.lse = lse->view();
  fsa::forward(f);
  fsa::BackwardArgs bw;
  bw.query = q->view();
  bw.key = k->view();
  bw.value = v->view();
  bw.out = out->view();
  bw.lse = lse->view();
  bw.dout = dout->view();
  if (mask) bw.attn_mask = mask->view();
  if (bias) bw.attn_bias = bias->view();
  bw.options = options;
  bw.dquery = dq->view();
  bw.dkey = dk->view();
  bw.dvalue = dv->view();
  if (dbias) bw.dbias = dbias->view();
  fsa::backward(bw);

  Outputs o;
  o.out = out->load();
  o.lse = lse->load();
  o.dq = dq->load();
  o.dk = dk->load();
  o.dv = dv->load();
  if (dbias) o.dbias = dbias->load();
  return o;
}

// q, k, v, out, dout and the gradients stored head-major, (B, H, S, D) in memory as a transposed
// torch tensor would be, with the query's rows padded from 40 to 48 elements; lse transposed to
// (B, Sq, H) in memory; mask and bias with padded rows. Only the last dims are contiguous.
TEST_P(EdgeCase, TransposedAndPaddedLayouts_MatchReference) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 40);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 2, 97, 130};
  spec.bias_shape = Shape4{1, 4, 97, 130};
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  Layouts layouts;
  layouts.strides = [](const std::string& name,
                       const std::vector<int64_t>& s) -> std::vector<int64_t> {
    if (s.size() == 3) return {s[1] * s[2], 1, s[1]};  // lse (B, H, Sq) stored as (B, Sq, H)
    if (name == "attn_mask" || name == "attn_bias" || name == "dbias") {
      const int64_t row = s[3] + 6;  // padded rows
      return {s[1] * s[2] * row, s[2] * row, row, 1};
    }
    const int64_t d = name == "query" ? 48 : s[3];  // (B, H, S, D) in memory
    return {s[2] * s[1] * d, d, s[1] * d, 1};
  };
  std::string why_not;
  const std::optional<Outputs> ours =
      run_strided(p, in, spec.dtype, make_options(spec), layouts, &why_not);
  ASSERT_TRUE(ours) << why_not;
  expect_matches_reference(p, in, *ours, spec.dtype, spec.dtype, true);
}

// Element offsets past 2^32 without allocating them: every tensor lives in a sparse mapping
// (MAP_NORESERVE; only the few pages touched get memory) with strides whose offsets exceed 2^32
// elements: the batch stride of q, out, dout, dq, lse, mask, bias and dbias is 2^32 + 64, and
// k, v, dk, dv have a sequence stride of 2^30 + 32 so keys 4 and up sit past 2^32 (with a batch
// stride of 5 times that). 32-bit or unsigned-32-bit offset arithmetic would read and write the
// wrong elements, or fault.
TEST(LargeOffsets, ElementOffsetsBeyond2Pow32_MatchReference) {
  const int64_t kBig = (int64_t{1} << 32) + 64, kSeq = (int64_t{1} << 30) + 32;
  CaseSpec spec = case_spec(DType::kBFloat16, 2, 3, 5, 2, 1, 16);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 1, 3, 5};
  spec.bias_shape = Shape4{2, 1, 1, 5};
  spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (uint8_t& m : mask) m = rng.bernoulli(0.8);
  };
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  Layouts layouts;
  layouts.sparse = true;
  layouts.strides = [&](const std::string& name,
                        const std::vector<int64_t>& s) -> std::vector<int64_t> {
    std::vector<int64_t> strides = contiguous_strides(s);
    if (name == "key" || name == "value" || name == "dkey" || name == "dvalue") {
      return {s[1] * kSeq, kSeq, s[3], 1};
    }
    strides[0] = kBig;
    return strides;
  };
  std::string why_not;
  const std::optional<Outputs> ours =
      run_strided(p, in, spec.dtype, make_options(spec), layouts, &why_not);
  if (!ours) GTEST_SKIP() << why_not;
  expect_matches_reference(p, in, *ours, spec.dtype, spec.dtype, true);
}

// A mask expanded from one key row, (B, H, Sq, Sk) with strides (0, 0, 0, 1), and a bias expanded
// from (1, H, 1, Sk) with strides (0, Sk, 0, 1): read in place, never materialized. The caller's
// shape is the full (B, H, Sq, Sk), so dbias comes back full-size (as autograd returns the
// gradient of an expanded tensor), each entry its own dS.
TEST_P(EdgeCase, ExpandedStride0MaskAndBias_MatchReference) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.causal = true;
  spec.mask_shape = Shape4{1, 1, 1, 130};
  spec.bias_shape = Shape4{1, 4, 1, 130};
  const Problem small = make_problem(spec);
  const Inputs small_in = make_inputs(spec, small);

  HostTensor mask_row = HostTensor::from_mask({130}, small_in.mask);
  HostTensor bias_rows = HostTensor::from_values(spec.dtype, {4, 130}, small_in.bias);
  const std::vector<int64_t> full{2, 4, 97, 130};
  // The same problem with the broadcasts written out, for the reference and the library's dbias.
  Problem p = small;
  p.mask_shape = Shape4{2, 4, 97, 130};
  p.bias_shape = Shape4{2, 4, 97, 130};
  Inputs in = small_in;
  in.mask.assign(2 * 4 * 97 * 130, 0);
  in.bias.assign(2 * 4 * 97 * 130, 0.0);
  for (int64_t e = 0; e < 2 * 4 * 97 * 130; ++e) {
    in.mask[e] = small_in.mask[e % 130];
    in.bias[e] = small_in.bias[((e / (97 * 130)) % 4) * 130 + e % 130];
  }

  LibraryBuffers buffers(p, in, spec.dtype, spec.dtype);
  const fsa::AttentionOptions options = make_options(spec);
  fsa::ForwardArgs f = buffers.forward_args(options);
  f.attn_mask = make_view(mask_row.data(), DType::kBool, full, {0, 0, 0, 1});
  f.attn_bias = make_view(bias_rows.data(), spec.dtype, full, {0, 130, 0, 1});
  fsa::forward(f);
  fsa::BackwardArgs bw = buffers.backward_args(options);
  bw.attn_mask = f.attn_mask;
  bw.attn_bias = f.attn_bias;
  fsa::backward(bw);
  expect_matches_reference(p, in, buffers.outputs(true), spec.dtype, spec.dtype, true);
}

}  // namespace
}  // namespace fsa_test

namespace fsa_test {
namespace {

// An fp32 tensor of standard normal values.
HostTensor normal_f32(Rng& rng, std::vector<int64_t> shape) {
  HostTensor t(DType::kFloat32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) store_element(t.data(), DType::kFloat32, i, rng.normal());
  return t;
}

// A paged K / V cache (ForwardArgs::paged_kv): the keys of a contiguous cache scattered over
// shuffled pages give bitwise the contiguous call's output and LSE, with a key mask, a per-key
// bias and causality; a page index out of range is refused before anything is written.
TEST(PagedKV, EqualsContiguousBitwise) {
  const int64_t B = 2, Sq = 19, Sk = 96, H = 4, Hk = 2, D = 16, page = 16;
  const int64_t max_pages = Sk / page, pages = B * max_pages + 2;
  Rng rng(7);
  auto random = [&](std::vector<int64_t> shape) { return normal_f32(rng, std::move(shape)); };
  HostTensor q = random({B, Sq, H, D}), k = random({B, Sk, Hk, D}), v = random({B, Sk, Hk, D});
  HostTensor bias = random({B, Hk, 1, Sk});
  std::vector<uint8_t> keep(size_t(B * Hk * Sk));
  for (uint8_t& x : keep) x = rng.bernoulli(0.8) ? 1 : 0;
  HostTensor mask = HostTensor::from_mask({B, Hk, 1, Sk}, keep);
  // Pages in reverse order, two spare ones first.
  HostTensor k_pages = random({pages, page, Hk, D}), v_pages = random({pages, page, Hk, D});
  std::vector<int32_t> table(size_t(B * max_pages));
  const size_t row_bytes = size_t(Hk * D) * 4, page_bytes = size_t(page) * row_bytes;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < max_pages; ++p) {
      const int32_t at = int32_t(pages - 1 - (b * max_pages + p));
      table[size_t(b * max_pages + p)] = at;
      const size_t from = size_t(b * Sk + p * page) * row_bytes;
      std::memcpy(static_cast<uint8_t*>(k_pages.data()) + size_t(at) * page_bytes,
                  static_cast<uint8_t*>(k.data()) + from, page_bytes);
      std::memcpy(static_cast<uint8_t*>(v_pages.data()) + size_t(at) * page_bytes,
                  static_cast<uint8_t*>(v.data()) + from, page_bytes);
    }
  }
  auto run = [&](bool paged, HostTensor& out, HostTensor& lse) {
    fsa::ForwardArgs a;
    a.query = q.view();
    a.key = paged ? k_pages.view() : k.view();
    a.value = paged ? v_pages.view() : v.view();
    a.attn_mask = mask.view();
    a.attn_bias = bias.view();
    a.options.is_causal = true;
    a.out = out.view();
    a.lse = lse.view();
    if (paged) a.paged_kv = fsa::PagedKV{table.data(), max_pages};
    fsa::forward(a);
  };
  HostTensor out_c(DType::kFloat32, {B, Sq, H, D}), lse_c(DType::kFloat32, {B, H, Sq});
  HostTensor out_p(DType::kFloat32, {B, Sq, H, D}), lse_p(DType::kFloat32, {B, H, Sq});
  run(false, out_c, lse_c);
  run(true, out_p, lse_p);
  EXPECT_EQ(out_c.bytes(), out_p.bytes());
  EXPECT_EQ(lse_c.bytes(), lse_p.bytes());

  table[3] = int32_t(pages);  // past the last page
  out_p.fill_bytes(0xAB);
  try {
    run(true, out_p, lse_p);
    ADD_FAILURE() << "expected a page_table error";
  } catch (const fsa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("page_table"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(out_p.all_bytes_equal(0xAB));  // nothing written
}

// A cache's lengths (ForwardArgs::cache_seqlens): batch b keeps keys [0, L_b), with causality
// within them (row i sees j <= i + L_b - Sq), whatever K / V hold past L_b (NaN and Inf here); the
// same as the call over clean K / V with those rules written into the mask. Length 0: empty rows.
TEST(CacheSeqlens, EqualsTheLengthsAsAMask) {
  const int64_t B = 4, Sq = 70, Sk = 200, H = 4, Hk = 2, D = 16;  // 70 rows: two 64-row tiles
  const std::vector<int32_t> lengths = {200, 0, 71, 130};
  Rng rng(13);
  auto random = [&](std::vector<int64_t> shape) { return normal_f32(rng, std::move(shape)); };
  HostTensor q = random({B, Sq, H, D}), k = random({B, Sk, Hk, D}), v = random({B, Sk, Hk, D});
  HostTensor bias = random({B, Hk, 1, Sk});
  HostTensor k_dirty = k, v_dirty = v;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = (b * Sk + lengths[size_t(b)]) * Hk * D; i < (b + 1) * Sk * Hk * D; ++i) {
      store_element(k_dirty.data(), DType::kFloat32, i, std::nan(""));
      store_element(v_dirty.data(), DType::kFloat32, i, INFINITY);
    }
  }
  std::vector<uint8_t> keep(size_t(B * Hk * Sk));
  for (uint8_t& x : keep) x = rng.bernoulli(0.7) ? 1 : 0;
  for (bool causal : {false, true}) {
    std::vector<uint8_t> rules(size_t(B * Hk * Sq * Sk));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t i = 0; i < Sq; ++i)
          for (int64_t j = 0; j < Sk; ++j) {
            const int64_t L = lengths[size_t(b)];
            rules[size_t(((b * Hk + h) * Sq + i) * Sk + j)] =
                keep[size_t((b * Hk + h) * Sk + j)] && j < L && (!causal || j <= i + L - Sq);
          }
    HostTensor key_mask = HostTensor::from_mask({B, Hk, 1, Sk}, keep);
    HostTensor rule_mask = HostTensor::from_mask({B, Hk, Sq, Sk}, rules);
    HostTensor out(DType::kFloat32, {B, Sq, H, D}), lse(DType::kFloat32, {B, H, Sq});
    HostTensor ref(DType::kFloat32, {B, Sq, H, D}), ref_lse(DType::kFloat32, {B, H, Sq});
    fsa::ForwardArgs a;
    a.query = q.view();
    a.key = k_dirty.view();
    a.value = v_dirty.view();
    a.attn_mask = key_mask.view();
    a.attn_bias = bias.view();
    a.options.is_causal = causal;
    a.out = out.view();
    a.lse = lse.view();
    a.cache_seqlens = lengths.data();
    fsa::forward(a);
    a.key = k.view();
    a.value = v.view();
    a.attn_mask = rule_mask.view();
    a.options.is_causal = false;
    a.out = ref.view();
    a.lse = ref_lse.view();
    a.cache_seqlens = nullptr;
    fsa::forward(a);
    for (int64_t e = 0; e < out.numel(); ++e) {
      const double x = load_element(out.data(), DType::kFloat32, e);
      const double y = load_element(ref.data(), DType::kFloat32, e);
      ASSERT_FALSE(std::isnan(x)) << "causal " << causal << " element " << e;
      ASSERT_NEAR(x, y, 1e-5) << "causal " << causal << " element " << e;
      if (e / (Sq * H * D) == 1) {
        ASSERT_EQ(x, 0.0);  // batch 1: length 0
      }
    }
    for (int64_t e = 0; e < lse.numel(); ++e) {
      const double x = load_element(lse.data(), DType::kFloat32, e);
      const double y = load_element(ref_lse.data(), DType::kFloat32, e);
      if (std::isinf(y)) {
        ASSERT_EQ(x, y) << "causal " << causal << " row " << e;
      } else {
        ASSERT_NEAR(x, y, 1e-5) << "causal " << causal << " row " << e;
      }
    }
  }
}

}  // namespace
}  // namespace fsa_test
