#include "harness.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

#include "test_dtypes.h"

void fsa::PrintTo(fsa::DType dtype, std::ostream* os) { *os << fsa_test::dtype_name(dtype); }

namespace fsa_test {

uint64_t Rng::next() {
  state_ += 0x9e3779b97f4a7c15ull;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (spare_) {
    const double value = *spare_;
    spare_.reset();
    return value;
  }
  const double kTwoPi = 6.283185307179586;
  const double u1 = 1.0 - uniform();  // (0, 1]: log stays finite
  const double u2 = uniform();
  const double radius = std::sqrt(-2.0 * std::log(u1));
  spare_ = radius * std::sin(kTwoPi * u2);
  return radius * std::cos(kTwoPi * u2);
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * std::max<int64_t>(shape[d + 1], 1);
  }
  return strides;
}

fsa::TensorView make_view(void* data, fsa::DType dtype, const std::vector<int64_t>& shape,
                          const std::vector<int64_t>& strides) {
  fsa::TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.rank = static_cast<int>(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    view.shape[d] = shape[d];
    view.stride[d] = strides[d];
  }
  return view;
}

double load_element(const void* data, fsa::DType dtype, int64_t index) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  switch (dtype) {
    case fsa::DType::kFloat32: {
      float value;
      std::memcpy(&value, bytes + index * 4, 4);
      return value;
    }
    case fsa::DType::kBFloat16:
    case fsa::DType::kFloat16: {
      uint16_t bits;
      std::memcpy(&bits, bytes + index * 2, 2);
      return dtype == fsa::DType::kBFloat16 ? bf16_bits_to_float(bits) : fp16_bits_to_float(bits);
    }
    case fsa::DType::kBool:
      return bytes[index] ? 1.0 : 0.0;
    case fsa::DType::kFloat64: {
      double value;
      std::memcpy(&value, bytes + index * 8, 8);
      return value;
    }
  }
  return 0.0;
}

void store_element(void* data, fsa::DType dtype, int64_t index, double value) {
  auto* bytes = static_cast<uint8_t*>(data);
  switch (dtype) {
    case fsa::DType::kFloat32: {
      const float narrow = static_cast<float>(value);
      std::memcpy(bytes + index * 4, &narrow, 4);
      return;
    }
    case fsa::DType::kBFloat16:
    case fsa::DType::kFloat16: {
      const float narrow = static_cast<float>(value);
      const uint16_t bits =
          dtype == fsa::DType::kBFloat16 ? float_to_bf16_bits(narrow) : float_to_fp16_bits(narrow);
      std::memcpy(bytes + index * 2, &bits, 2);
      return;
    }
    case fsa::DType::kBool:
      bytes[index] = value != 0.0 ? 1 : 0;
      return;
    case fsa::DType::kFloat64:
      std::memcpy(bytes + index * 8, &value, 8);
      return;
  }
}

HostTensor::HostTensor(fsa::DType dtype, std::vector<int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)) {
  bytes_.assign(static_cast<size_t>(numel()) * element_size(dtype_), 0);
}

HostTensor HostTensor::from_values(fsa::DType dtype, std::vector<int64_t> shape,
                                   const std::vector<double>& values) {
  HostTensor tensor(dtype, std::move(shape));
  for (int64_t e = 0; e < tensor.numel(); ++e) store_element(tensor.data(), dtype, e, values[e]);
  return tensor;
}

HostTensor HostTensor::from_mask(std::vector<int64_t> shape, const std::vector<uint8_t>& keep) {
  HostTensor tensor(fsa::DType::kBool, std::move(shape));
  for (int64_t e = 0; e < tensor.numel(); ++e) tensor.bytes_[e] = keep[e] ? 1 : 0;
  return tensor;
}

std::vector<double> HostTensor::to_doubles() const {
  std::vector<double> values(numel());
  for (int64_t e = 0; e < numel(); ++e) values[e] = load_element(bytes_.data(), dtype_, e);
  return values;
}

void HostTensor::fill_bytes(uint8_t byte) { std::fill(bytes_.begin(), bytes_.end(), byte); }

bool HostTensor::all_bytes_equal(uint8_t byte) const {
  return std::all_of(bytes_.begin(), bytes_.end(), [byte](uint8_t b) { return b == byte; });
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (const int64_t s : shape_) n *= s;
  return n;
}

CaseSpec case_spec(fsa::DType dtype, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                   int64_t heads, int64_t kv_heads, int64_t head_dim) {
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

Problem make_problem(const CaseSpec& spec) {
  Problem p;
  p.batch = spec.batch;
  p.seqlen_q = spec.seqlen_q;
  p.seqlen_k = spec.seqlen_k;
  p.heads = spec.heads;
  p.kv_heads = spec.kv_heads;
  p.head_dim = spec.head_dim;
  p.causal = spec.causal;
  p.softcap = spec.softcap;
  p.scale = spec.softmax_scale ? static_cast<double>(*spec.softmax_scale)
                               : 1.0 / std::sqrt(static_cast<double>(spec.head_dim));
  p.mask_shape = spec.mask_shape;
  p.bias_shape = spec.bias_shape;
  return p;
}

Inputs make_inputs(const CaseSpec& spec, const Problem& p) {
  Rng rng(spec.seed);
  Inputs in;
  auto normals = [&](int64_t count, double std_dev, fsa::DType dtype) {
    std::vector<double> values(count);
    for (double& v : values) v = round_input(dtype, std_dev * rng.normal());
    return values;
  };
  in.q = normals(p.q_numel(), spec.q_std, spec.dtype);
  in.k = normals(p.kv_numel(), 1.0, spec.dtype);
  in.v = normals(p.kv_numel(), 1.0, spec.dtype);
  in.dout = normals(p.q_numel(), 1.0, spec.dtype);
  if (p.bias_shape)
    in.bias = normals(numel(*p.bias_shape), spec.bias_std, spec.resolved_bias_dtype());
  if (p.mask_shape) {
    in.mask.assign(numel(*p.mask_shape), 0);
    if (spec.make_mask) {
      spec.make_mask(p, in, rng, in.mask);
    } else {
      for (uint8_t& m : in.mask) m = rng.bernoulli(0.5) ? 1 : 0;
    }
  }
  return in;
}

fsa::AttentionOptions make_options(const CaseSpec& spec) {
  fsa::AttentionOptions options;
  options.softmax_scale = spec.softmax_scale;
  options.is_causal = spec.causal;
  options.softcap = static_cast<float>(spec.softcap);
  return options;
}

namespace {

std::vector<int64_t> to_vector(const Shape4& shape) {
  return {shape[0], shape[1], shape[2], shape[3]};
}

}  // namespace

LibraryBuffers::LibraryBuffers(const Problem& p, const Inputs& in, fsa::DType dtype,
                               fsa::DType bias_dtype)
    : q(HostTensor::from_values(dtype, {p.batch, p.seqlen_q, p.heads, p.head_dim}, in.q)),
      k(HostTensor::from_values(dtype, {p.batch, p.seqlen_k, p.kv_heads, p.head_dim}, in.k)),
      v(HostTensor::from_values(dtype, {p.batch, p.seqlen_k, p.kv_heads, p.head_dim}, in.v)),
      dout(HostTensor::from_values(dtype, {p.batch, p.seqlen_q, p.heads, p.head_dim}, in.dout)),
      out(dtype, {p.batch, p.seqlen_q, p.heads, p.head_dim}),
      lse(fsa::DType::kFloat32, {p.batch, p.heads, p.seqlen_q}),
      dq(dtype, {p.batch, p.seqlen_q, p.heads, p.head_dim}),
      dk(dtype, {p.batch, p.seqlen_k, p.kv_heads, p.head_dim}),
      dv(dtype, {p.batch, p.seqlen_k, p.kv_heads, p.head_dim}) {
  if (p.mask_shape) mask = HostTensor::from_mask(to_vector(*p.mask_shape), in.mask);
  if (p.bias_shape) {
    bias = HostTensor::from_values(bias_dtype, to_vector(*p.bias_shape), in.bias);
    dbias = HostTensor(bias_dtype, to_vector(*p.bias_shape));
  }
}

fsa::ForwardArgs LibraryBuffers::forward_args(const fsa::AttentionOptions& options, bool with_lse) {
  fsa::ForwardArgs args;
  args.query = q.view();
  args.key = k.view();
  args.value = v.view();
  if (mask) args.attn_mask = mask->view();
  if (bias) args.attn_bias = bias->view();
  args.options = options;
  args.out = out.view();
  if (with_lse) args.lse = lse.view();
  return args;
}

fsa::BackwardArgs LibraryBuffers::backward_args(const fsa::AttentionOptions& options) {
  fsa::BackwardArgs args;
  args.query = q.view();
  args.key = k.view();
  args.value = v.view();
  args.out = out.view();
  args.lse = lse.view();
  args.dout = dout.view();
  if (mask) args.attn_mask = mask->view();
  if (bias) args.attn_bias = bias->view();
  args.options = options;
  args.dquery = dq.view();
  args.dkey = dk.view();
  args.dvalue = dv.view();
  if (dbias) args.dbias = dbias->view();
  return args;
}

Outputs LibraryBuffers::outputs(bool with_backward) const {
  Outputs o;
  o.out = out.to_doubles();
  o.lse = lse.to_doubles();
  if (with_backward) {
    o.dq = dq.to_doubles();
    o.dk = dk.to_doubles();
    o.dv = dv.to_doubles();
    if (dbias) o.dbias = dbias->to_doubles();
  }
  return o;
}

Outputs run_library(const Problem& problem, const Inputs& inputs, fsa::DType dtype,
                    fsa::DType bias_dtype, const fsa::AttentionOptions& options,
                    bool with_backward) {
  LibraryBuffers buffers(problem, inputs, dtype, bias_dtype);
  fsa::forward(buffers.forward_args(options));
  if (with_backward) fsa::backward(buffers.backward_args(options));
  return buffers.outputs(with_backward);
}

double small_atol_relative(fsa::DType stored_dtype) {
  switch (stored_dtype) {
    case fsa::DType::kBFloat16:
      return 0x1.0p-9;
    case fsa::DType::kFloat16:
      return 0x1.0p-12;
    default:
      return 1e-5;
  }
}

namespace {

std::string describe(const Problem& p, fsa::DType dtype, fsa::DType bias_dtype) {
  std::ostringstream s;
  s << "(B,Sq,Sk,H,Hk,D)=(" << p.batch << "," << p.seqlen_q << "," << p.seqlen_k << "," << p.heads
    << "," << p.kv_heads << "," << p.head_dim << ") " << dtype_name(dtype)
    << (p.causal ? " causal" : "") << (p.softcap > 0 ? " softcap=" : "");
  if (p.softcap > 0) s << p.softcap;
  auto shape = [&](const char* name, const std::optional<Shape4>& sh) {
    if (sh)
      s << " " << name << "(" << (*sh)[0] << "," << (*sh)[1] << "," << (*sh)[2] << "," << (*sh)[3]
        << ")";
  };
  shape("mask", p.mask_shape);
  shape("bias", p.bias_shape);
  if (p.bias_shape) s << " bias " << dtype_name(bias_dtype);
  return s.str();
}

double max_abs_finite(const std::vector<double>& values) {
  double m = 0.0;
  for (const double v : values) {
    if (std::isfinite(v)) m = std::max(m, std::abs(v));
  }
  return m;
}

// max|ours - ref| <= 2 * max|naive - ref| + small_atol, over the entries where the reference is
// finite (-inf LSE of empty rows is checked exactly elsewhere); no NaN anywhere in ours.
void expect_pass_rule(const std::string& label, const char* tensor, const std::vector<double>& ours,
                      const std::vector<double>& ref, const std::vector<double>& naive,
                      fsa::DType stored_dtype, double scale) {
  ASSERT_EQ(ours.size(), ref.size()) << label << " " << tensor;
  ASSERT_EQ(naive.size(), ref.size()) << label << " " << tensor;
  double err = 0.0, naive_err = 0.0;
  int64_t worst = -1, nan_count = 0, first_nan = -1;
  for (size_t e = 0; e < ref.size(); ++e) {
    if (std::isnan(ours[e])) {
      if (nan_count++ == 0) first_nan = static_cast<int64_t>(e);
      continue;
    }
    if (!std::isfinite(ref[e])) continue;
    const double d = std::abs(ours[e] - ref[e]);
    if (!(d <= err)) {
      err = d;
      worst = static_cast<int64_t>(e);
    }
    if (std::isfinite(naive[e])) naive_err = std::max(naive_err, std::abs(naive[e] - ref[e]));
  }
  const double atol = small_atol_relative(stored_dtype) * scale;
  const double bound = 2.0 * naive_err + atol;
  EXPECT_EQ(nan_count, 0) << label << ": " << tensor << " has " << nan_count
                          << " NaN (first at flat index " << first_nan << ")";
  EXPECT_LE(err, bound) << label << ": " << tensor << " max|ours-ref| = " << err
                        << " at flat index " << worst << " (ours " << ours[worst] << ", ref "
                        << ref[worst] << "), bound 2*" << naive_err << " + " << atol << " = "
                        << bound;
  if (std::getenv("FSA_TEST_REPORT")) {
    std::printf("    %-5s err %-10.3g naive %-10.3g atol %-10.3g err/bound %.3f\n", tensor, err,
                naive_err, atol, bound > 0 ? err / bound : 0.0);
  }
}

// Entries of `ours` that no kept entry reaches must be exactly `expected` (0, or -inf for LSE).
void expect_exact_where_untouched(const std::string& label, const char* tensor,
                                  const std::vector<double>& ours,
                                  const std::vector<uint8_t>& touched, int64_t inner,
                                  double expected) {
  ASSERT_EQ(ours.size(), touched.size() * inner) << label << " " << tensor;
  int64_t bad = 0, first_bad = -1;
  for (size_t r = 0; r < touched.size(); ++r) {
    if (touched[r]) continue;
    for (int64_t d = 0; d < inner; ++d) {
      const double value = ours[r * inner + d];
      if (!(value == expected)) {
        if (bad++ == 0) first_bad = static_cast<int64_t>(r * inner + d);
      }
    }
  }
  EXPECT_EQ(bad, 0) << label << ": " << tensor << " has " << bad
                    << " entries without any kept contribution that are not exactly " << expected
                    << " (first at flat index " << first_bad << ": "
                    << (first_bad >= 0 ? ours[first_bad] : 0.0) << ")";
}

}  // namespace

void expect_matches_reference(const Problem& p, const Inputs& inputs, const Outputs& ours,
                              fsa::DType dtype, fsa::DType bias_dtype, bool with_backward) {
  Structure structure;
  const Outputs ref = reference_attention(p, inputs, with_backward, &structure);
  const Outputs naive = naive_attention(p, inputs, dtype, bias_dtype, with_backward);
  const std::string label = describe(p, dtype, bias_dtype);
  if (std::getenv("FSA_TEST_REPORT")) std::printf("  %s\n", label.c_str());

  const double inf = std::numeric_limits<double>::infinity();
  expect_pass_rule(label, "out", ours.out, ref.out, naive.out, dtype, max_abs_finite(ref.out));
  expect_pass_rule(label, "lse", ours.lse, ref.lse, naive.lse, fsa::DType::kFloat32,
                   max_abs_finite(ref.lse));
  // row_kept is in the LSE's (B, H, Sq) order; out and dq rows are (B, Sq, H).
  std::vector<uint8_t> row_kept_bsh(structure.row_kept.size());
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        row_kept_bsh[(b * p.seqlen_q + i) * p.heads + h] =
            structure.row_kept[(b * p.heads + h) * p.seqlen_q + i];
      }
    }
  }
  expect_exact_where_untouched(label, "out", ours.out, row_kept_bsh, p.head_dim, 0.0);
  expect_exact_where_untouched(label, "lse", ours.lse, structure.row_kept, 1, -inf);
  if (!with_backward) return;

  expect_pass_rule(label, "dq", ours.dq, ref.dq, naive.dq, dtype, max_abs_finite(ref.dq));
  expect_pass_rule(label, "dk", ours.dk, ref.dk, naive.dk, dtype, max_abs_finite(ref.dk));
  expect_pass_rule(label, "dv", ours.dv, ref.dv, naive.dv, dtype, max_abs_finite(ref.dv));
  expect_exact_where_untouched(label, "dq", ours.dq, row_kept_bsh, p.head_dim, 0.0);
  expect_exact_where_untouched(label, "dk", ours.dk, structure.key_kept, p.head_dim, 0.0);
  expect_exact_where_untouched(label, "dv", ours.dv, structure.key_kept, p.head_dim, 0.0);
  if (p.bias_shape) {
    expect_pass_rule(label, "dbias", ours.dbias, ref.dbias, naive.dbias, bias_dtype,
                     max_abs_finite(ref.dbias_magnitude));
    expect_exact_where_untouched(label, "dbias", ours.dbias, structure.bias_kept, 1, 0.0);
  }
}

std::string dtype_param_name(const ::testing::TestParamInfo<fsa::DType>& info) {
  return dtype_name(info.param);
}

void expect_case_matches_reference(const CaseSpec& spec) {
  const Problem problem = make_problem(spec);
  const Inputs inputs = make_inputs(spec, problem);
  const fsa::DType bias_dtype = spec.resolved_bias_dtype();
  const Outputs ours =
      run_library(problem, inputs, spec.dtype, bias_dtype, make_options(spec), spec.backward);
  expect_matches_reference(problem, inputs, ours, spec.dtype, bias_dtype, spec.backward);
}

}  // namespace fsa_test
