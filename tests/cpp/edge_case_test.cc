// Edge cases beyond the SPEC section 7 grid, all against the fp64 reference under the pass rule
// unless said otherwise: no keys at all, causal rows that see nothing, -inf bias, NaN inputs,
// arbitrary strides (transposed and padded layouts, stride-0 expanded mask and bias), and element
// offsets past 2^32 (64-bit indexing).
//
// Odd sizes, each on purpose: Sq = 17 and Sk = 17 are smaller than one tile and prime (a single
// ragged tile); 97 is prime (ragged last tile for every tile size); 130 = 2 * 64 + 2 leaves a
// two-key tail tile; Sk = 0 makes every row empty.

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>

#include "harness.h"
#include "test_dtypes.h"

namespace fsa_test {
namespace {

using fsa::DType;

CaseSpec small_spec(DType dtype, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads,
                    int64_t kv_heads, int64_t head_dim) {
  CaseSpec spec;
  spec.dtype = dtype;
  spec.batch = batch;
  spec.seqlen_q = seqlen_q;
  spec.seqlen_k = seqlen_k;
  spec.heads = heads;
  spec.kv_heads = kv_heads;
  spec.head_dim = head_dim;
  return spec;
}

class EdgeCase : public ::testing::TestWithParam<DType> {};
INSTANTIATE_TEST_SUITE_P(CPU, EdgeCase,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         dtype_param_name);

// ---- empty rows ---------------------------------------------------------------------------------

TEST_P(EdgeCase, NoKeys_Sk0_EveryRowEmpty_ZeroOutLseMinusInfZeroDq) {
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "non-causal");
    CaseSpec spec = small_spec(GetParam(), 2, 17, 0, 4, 2, 32);
    spec.causal = causal;
    expect_case_matches_reference(spec);
  }
}

// The same with every view of the key side laid out by the plain product of sizes, which gives an
// empty tensor stride 0 on its outer dims: nothing can alias in a tensor without elements, so
// these strides are as valid as any.
TEST(EmptyTensors, NoKeys_Sk0_ZeroStridesOnEmptyViewsAccepted) {
  CaseSpec spec = small_spec(DType::kFloat32, 2, 17, 0, 4, 2, 32);
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  LibraryBuffers buffers(p, in, spec.dtype, spec.dtype);
  const fsa::AttentionOptions options = make_options(spec);
  const std::vector<int64_t> kv_shape{2, 0, 2, 32}, product_strides{0, 64, 32, 1};
  auto empty_view = [&](HostTensor& t) { return make_view(t.data(), t.dtype(), kv_shape, product_strides); };
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

// Bottom-right causal with Sq > Sk: rows 0..79 see nothing; a full bias checks that dbias is
// exactly 0 on them.
TEST_P(EdgeCase, CausalSqAboveSk_LeadingRowsEmpty) {
  CaseSpec spec = small_spec(GetParam(), 2, 97, 17, 4, 2, 32);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 4, 97, 17};
  expect_case_matches_reference(spec);
}

// SPEC section 2: a bias of -inf acts as a mask. 30% of the bias is -inf and, in head 1, every
// row i with i % 7 == 3 is entirely -inf (an empty row made by the bias alone).
TEST_P(EdgeCase, MinusInfinityBiasActsAsMask_IncludingWholeRows) {
  CaseSpec spec = small_spec(GetParam(), 2, 64, 80, 4, 2, 16);
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

// ---- NaN isolation (SPEC section 6) ---------------------------------------------------------------

// One NaN in q at (b 1, row 40, head 2). In exact math that row's scores, LSE, output and dq are
// NaN, and so are dk/dv of the keys it attends and its dbias entries; everything else is
// computed exactly as without the NaN (bitwise: the CPU backend is deterministic).
TEST_P(EdgeCase, NaNInOneQueryRow_OnlyWhatThatRowTouchesIsNaN) {
  const DType dtype = GetParam();
  CaseSpec spec = small_spec(dtype, 2, 97, 130, 4, 2, 32);
  spec.mask_shape = Shape4{2, 2, 97, 130};
  spec.bias_shape = Shape4{2, 4, 97, 130};
  const int64_t kB = 1, kRow = 40, kHead = 2, kKvHead = 1;
  const Problem p = make_problem(spec);
  Inputs clean = make_inputs(spec, p);
  Inputs poisoned = clean;
  poisoned.q[((kB * 97 + kRow) * 4 + kHead) * 32 + 5] = std::numeric_limits<double>::quiet_NaN();
  const fsa::AttentionOptions options = make_options(spec);
  const Outputs a = run_library(p, clean, dtype, dtype, options, true);
  const Outputs b = run_library(p, poisoned, dtype, dtype, options, true);
  const uint8_t* row_mask = clean.mask.data() + ((kB * 2 + kKvHead) * 97 + kRow) * 130;
  ASSERT_GT(std::count(row_mask, row_mask + 130, 1), 0) << "the poisoned row must attend something";

  auto same_or_nan = [](const char* name, const std::vector<double>& clean_values,
                        const std::vector<double>& values, const std::function<bool(int64_t)>& poisoned_at) {
    int64_t wrong = 0, first = -1;
    for (int64_t e = 0; e < static_cast<int64_t>(values.size()); ++e) {
      const bool ok = poisoned_at(e) ? std::isnan(values[e])
                                     : std::memcmp(&values[e], &clean_values[e], sizeof(double)) == 0;
      if (!ok && wrong++ == 0) first = e;
    }
    EXPECT_EQ(wrong, 0) << name << ": " << wrong << " entries differ from expectation, first at flat index "
                        << first << " (" << (first >= 0 ? values[first] : 0.0) << " vs clean "
                        << (first >= 0 ? clean_values[first] : 0.0) << ")";
  };
  const int64_t q_row = (kB * 97 + kRow) * 4 + kHead;  // (B, Sq, H) row of out and dq
  same_or_nan("out", a.out, b.out, [&](int64_t e) { return e / 32 == q_row; });
  same_or_nan("lse", a.lse, b.lse, [&](int64_t e) { return e == (kB * 4 + kHead) * 97 + kRow; });
  same_or_nan("dq", a.dq, b.dq, [&](int64_t e) { return e / 32 == q_row; });
  auto kv_poisoned = [&](int64_t e) {
    const int64_t row = e / 32, hk = row % 2, j = (row / 2) % 130, batch = row / (2 * 130);
    return batch == kB && hk == kKvHead && row_mask[j];
  };
  same_or_nan("dk", a.dk, b.dk, kv_poisoned);
  same_or_nan("dv", a.dv, b.dv, kv_poisoned);
  same_or_nan("dbias", a.dbias, b.dbias, [&](int64_t e) {
    return e / 130 == (kB * 4 + kHead) * 97 + kRow && row_mask[e % 130];
  });
}

// ---- strides --------------------------------------------------------------------------------------

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
  void store_mask(const std::vector<uint8_t>& compact) {
    for (int64_t e = 0; e < numel(); ++e) store_element(data(), dtype_, offset(e), compact[e] ? 1.0 : 0.0);
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

// Runs forward + backward with every tensor in the layout `layout(name, shape)` gives, returns
// the outputs in compact order. `layout` returns the strides for a tensor of `shape`.
struct Layouts {
  std::function<std::vector<int64_t>(const std::string&, const std::vector<int64_t>&)> strides;
  bool sparse = false;
};

std::optional<Outputs> run_strided(const Problem& p, const Inputs& in, DType dtype,
                                   const fsa::AttentionOptions& options, const Layouts& layouts,
                                   std::string* why_not) {
  const std::vector<int64_t> q_shape{p.batch, p.seqlen_q, p.heads, p.head_dim};
  const std::vector<int64_t> kv_shape{p.batch, p.seqlen_k, p.kv_heads, p.head_dim};
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.seqlen_q};
  std::vector<std::unique_ptr<StridedTensor>> owned;
  auto make = [&](const std::string& name, DType t, const std::vector<int64_t>& shape) {
    owned.push_back(std::make_unique<StridedTensor>(t, shape, layouts.strides(name, shape), layouts.sparse));
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
  StridedTensor* mask = p.mask_shape ? make("attn_mask", DType::kBool, shape_of(*p.mask_shape)) : nullptr;
  StridedTensor* bias = p.bias_shape ? make("attn_bias", dtype, shape_of(*p.bias_shape)) : nullptr;
  StridedTensor* dbias = p.bias_shape ? make("dbias", dtype, shape_of(*p.bias_shape)) : nullptr;
  if (!why_not->empty()) return std::nullopt;
  q->store(in.q);
  k->store(in.k);
  v->store(in.v);
  dout->store(in.dout);
  if (mask) mask->store_mask(in.mask);
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
  CaseSpec spec = small_spec(GetParam(), 2, 97, 130, 4, 2, 40);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 2, 97, 130};
  spec.bias_shape = Shape4{1, 4, 97, 130};
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  Layouts layouts;
  layouts.strides = [](const std::string& name, const std::vector<int64_t>& s) -> std::vector<int64_t> {
    if (s.size() == 3) return {s[1] * s[2], 1, s[1]};  // lse (B, H, Sq) stored as (B, Sq, H)
    if (name == "attn_mask" || name == "attn_bias" || name == "dbias") {
      const int64_t row = s[3] + 6;  // padded rows
      return {s[1] * s[2] * row, s[2] * row, row, 1};
    }
    const int64_t d = name == "query" ? 48 : s[3];  // (B, H, S, D) in memory
    return {s[2] * s[1] * d, d, s[1] * d, 1};
  };
  std::string why_not;
  const std::optional<Outputs> ours = run_strided(p, in, spec.dtype, make_options(spec), layouts, &why_not);
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
  CaseSpec spec = small_spec(DType::kBFloat16, 2, 3, 5, 2, 1, 16);
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
  layouts.strides = [&](const std::string& name, const std::vector<int64_t>& s) -> std::vector<int64_t> {
    std::vector<int64_t> strides = contiguous_strides(s);
    if (name == "key" || name == "value" || name == "dkey" || name == "dvalue") {
      return {s[1] * kSeq, kSeq, s[3], 1};
    }
    strides[0] = kBig;
    return strides;
  };
  std::string why_not;
  const std::optional<Outputs> ours = run_strided(p, in, spec.dtype, make_options(spec), layouts, &why_not);
  if (!ours) GTEST_SKIP() << why_not;
  expect_matches_reference(p, in, *ours, spec.dtype, spec.dtype, true);
}

// A mask expanded from one key row, (B, H, Sq, Sk) with strides (0, 0, 0, 1), and a bias expanded
// from (1, H, 1, Sk) with strides (0, Sk, 0, 1): read in place, never materialized. The caller's
// shape is the full (B, H, Sq, Sk), so dbias comes back full-size (as autograd returns the
// gradient of an expanded tensor), each entry its own dS.
TEST_P(EdgeCase, ExpandedStride0MaskAndBias_MatchReference) {
  CaseSpec spec = small_spec(GetParam(), 2, 97, 130, 4, 2, 32);
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
