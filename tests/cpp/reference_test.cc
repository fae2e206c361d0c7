// Checks of the test-only references themselves: the library is judged against them, so they get
// checked against hand-computed values and against finite differences of their own forward.

#include "reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "harness.h"
#include "test_dtypes.h"

namespace fsa_test {
namespace {

// A tiny problem touching every feature: GQA 2, causal with Sq < Sk, softcap, a per-kv-head mask
// with one all-False row, and a bias broadcast over heads and query rows (so dbias reduces).
CaseSpec tiny_spec(double softcap, Shape4 bias_shape) {
  CaseSpec spec = case_spec(fsa::DType::kFloat64, 2, 5, 7, 4, 2, 3);
  spec.causal = true;
  spec.softcap = softcap;
  spec.softmax_scale = 0.7f;
  spec.q_std = 2.0;
  spec.mask_shape = Shape4{1, 2, 5, 7};
  spec.bias_shape = bias_shape;
  spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (uint8_t& m : mask) m = rng.bernoulli(0.7) ? 1 : 0;
    for (int j = 0; j < 7; ++j) mask[(1 * 5 + 2) * 7 + j] = 0;  // kv head 1, row 2: empty
  };
  return spec;
}

// L = sum(dout * out). Its gradient is what backward computes for the upstream gradient dout.
double loss(const Problem& p, const Inputs& in) {
  const Outputs o = reference_attention(p, in, false);
  double l = 0.0;
  for (size_t e = 0; e < o.out.size(); ++e) l += in.dout[e] * o.out[e];
  return l;
}

void expect_gradient_matches_finite_differences(const Problem& p, Inputs in,
                                                std::vector<double> Inputs::*field,
                                                const std::vector<double>& analytic,
                                                const char* name) {
  const double kStep = 1e-5;  // central differences: O(step^2) truncation, ~1e-11 roundoff here
  ASSERT_EQ((in.*field).size(), analytic.size()) << name;
  for (size_t e = 0; e < analytic.size(); ++e) {
    const double saved = (in.*field)[e];
    (in.*field)[e] = saved + kStep;
    const double up = loss(p, in);
    (in.*field)[e] = saved - kStep;
    const double down = loss(p, in);
    (in.*field)[e] = saved;
    const double numeric = (up - down) / (2 * kStep);
    EXPECT_NEAR(analytic[e], numeric, 1e-7 * (1.0 + std::abs(numeric))) << name << "[" << e << "]";
  }
}

class ReferenceGradient : public ::testing::TestWithParam<double> {};

TEST_P(ReferenceGradient, BackwardEqualsFiniteDifferencesOfForward) {
  for (const Shape4 bias_shape : {Shape4{2, 1, 1, 7}, Shape4{1, 2, 5, 1}, Shape4{2, 4, 5, 7}}) {
    const CaseSpec spec = tiny_spec(GetParam(), bias_shape);
    const Problem p = make_problem(spec);
    const Inputs in = make_inputs(spec, p);
    const Outputs o = reference_attention(p, in, true);
    expect_gradient_matches_finite_differences(p, in, &Inputs::q, o.dq, "dq");
    expect_gradient_matches_finite_differences(p, in, &Inputs::k, o.dk, "dk");
    expect_gradient_matches_finite_differences(p, in, &Inputs::v, o.dv, "dv");
    expect_gradient_matches_finite_differences(p, in, &Inputs::bias, o.dbias, "dbias");
  }
}

INSTANTIATE_TEST_SUITE_P(SoftcapOffAndOn, ReferenceGradient, ::testing::Values(0.0, 1.5));

TEST(Reference, HandComputedRows) {
  // One query, two keys, D = 1, scale 1: scores 0 and log 3 -> P = (1/4, 3/4).
  Problem p;
  p.seqlen_q = 1;
  p.seqlen_k = 2;
  p.scale = 1.0;
  Inputs in;
  in.q = {1.0};
  in.k = {0.0, std::log(3.0)};
  in.v = {2.0, 6.0};
  in.dout = {1.0};
  Outputs o = reference_attention(p, in, true);
  EXPECT_NEAR(o.out[0], 0.25 * 2 + 0.75 * 6, 1e-15);
  EXPECT_NEAR(o.lse[0], std::log(4.0), 1e-15);
  EXPECT_NEAR(o.dv[0], 0.25, 1e-15);
  EXPECT_NEAR(o.dv[1], 0.75, 1e-15);

  // Causal with Sq > Sk: row 0 sees nothing (bottom-right), row 1 sees key 0 only.
  p.seqlen_q = 2;
  p.seqlen_k = 1;
  p.causal = true;
  in.q = {1.0, 1.0};
  in.k = {0.5};
  in.v = {3.0};
  in.dout = {1.0, 1.0};
  Structure s;
  o = reference_attention(p, in, true, &s);
  EXPECT_EQ(o.out[0], 0.0);
  EXPECT_EQ(o.lse[0], -std::numeric_limits<double>::infinity());
  EXPECT_EQ(o.dq[0], 0.0);
  EXPECT_EQ(s.row_kept[0], 0);
  EXPECT_EQ(o.out[1], 3.0);
  EXPECT_EQ(o.lse[1], 0.5);
  EXPECT_EQ(s.row_kept[1], 1);

  // A -inf bias acts as a mask; softcap keeps the bias outside the tanh.
  p = Problem();
  p.seqlen_k = 2;
  p.scale = 2.0;
  p.softcap = 3.0;
  p.bias_shape = Shape4{1, 1, 1, 2};
  in.q = {1.0};
  in.k = {1.0, 5.0};
  in.v = {1.0, 7.0};
  in.dout = {1.0};
  in.bias = {0.25, -std::numeric_limits<double>::infinity()};
  o = reference_attention(p, in, false);
  EXPECT_EQ(o.out[0], 1.0);
  EXPECT_NEAR(o.lse[0], 3.0 * std::tanh(2.0 / 3.0) + 0.25, 1e-15);
}

// The naive implementation sets the pass rule's bound, so its error must be of the order of its
// dtype: not accidentally exact (a bound too tight) and not garbage (a bound too loose).
TEST(Reference, NaiveErrorIsOfTheDTypesOrder) {
  for (const fsa::DType dtype :
       {fsa::DType::kFloat32, fsa::DType::kBFloat16, fsa::DType::kFloat16}) {
    CaseSpec spec = case_spec(dtype, 2, 64, 96, 4, 2, 32);
    spec.causal = true;
    spec.bias_shape = Shape4{2, 1, 64, 96};
    const Problem p = make_problem(spec);
    const Inputs in = make_inputs(spec, p);
    const Outputs ref = reference_attention(p, in, true);
    const Outputs naive = naive_attention(p, in, dtype, dtype, true);
    const double unit = dtype == fsa::DType::kFloat32   ? 0x1.0p-24
                        : dtype == fsa::DType::kFloat16 ? 0x1.0p-11
                                                        : 0x1.0p-8;
    const std::vector<
        std::pair<const char*, std::pair<const std::vector<double>*, const std::vector<double>*>>>
        tensors = {{"out", {&ref.out, &naive.out}},
                   {"dq", {&ref.dq, &naive.dq}},
                   {"dk", {&ref.dk, &naive.dk}},
                   {"dv", {&ref.dv, &naive.dv}},
                   {"dbias", {&ref.dbias, &naive.dbias}}};
    for (const auto& [name, pair] : tensors) {
      double err = 0.0, scale = 0.0;
      for (size_t e = 0; e < pair.first->size(); ++e) {
        err = std::max(err, std::abs((*pair.first)[e] - (*pair.second)[e]));
        scale = std::max(scale, std::abs((*pair.first)[e]));
      }
      const double relative = err / scale / unit;  // in unit roundoffs of the dtype
      EXPECT_GE(relative, 0.25) << dtype_name(dtype) << " " << name;
      EXPECT_LE(relative, 64.0) << dtype_name(dtype) << " " << name;
    }
  }
}

}  // namespace
}  // namespace fsa_test
