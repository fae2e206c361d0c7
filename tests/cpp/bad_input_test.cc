// SPEC section 6: every bad input raises fsa::Error naming the argument, with the error kind the
// Python layer maps to TypeError / ValueError, and nothing is written: every output (and a
// scratch buffer that enlarged or redirected views point into) keeps its sentinel bytes.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "harness.h"

namespace fsa_test {
namespace {

using fsa::DType;
using fsa::ErrorKind;

constexpr uint8_t kSentinel = 0x5a;

// A valid call: (B, Sq, Sk, H, Hk, D) = (1, 5, 7, 4, 2, 8), fp32, mask (1, Hk, Sq, Sk), bias
// (1, H, 1, Sk). Each case breaks one thing.
CaseSpec valid_spec() {
  CaseSpec spec = case_spec(DType::kFloat32, 1, 5, 7, 4, 2, 8);
  spec.causal = true;
  spec.mask_shape = Shape4{1, 2, 5, 7};
  spec.bias_shape = Shape4{1, 4, 1, 7};
  return spec;
}

// Sentinel-filled memory for views whose shape a case enlarges or whose data it redirects, so a
// library that wrongly accepted the call could not write outside memory the test watches.
struct Scratch {
  std::vector<uint8_t> bytes = std::vector<uint8_t>(4 << 20, kSentinel);
  void* data() { return bytes.data(); }
};

void set_shape(fsa::TensorView& view, std::vector<int64_t> shape, Scratch& scratch) {
  const std::vector<int64_t> strides = contiguous_strides(shape);
  view = make_view(scratch.data(), view.dtype, shape, strides);
}

fsa::Device cuda0() { return fsa::Device{fsa::DeviceType::kCUDA, 0}; }

struct BadCase {
  std::string name;      // test name suffix: what is wrong
  std::string argument;  // what fsa::Error::argument() must say
  ErrorKind kind;
  std::function<void(fsa::ForwardArgs&, Scratch&)> forward;    // breaks a forward call, or null
  std::function<void(fsa::BackwardArgs&, Scratch&)> backward;  // breaks a backward call, or null
};

std::string case_name(const ::testing::TestParamInfo<BadCase>& info) { return info.param.name; }
void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name << " -> " << c.argument; }

// A case that applies to both calls through the fields they share.
template <class F>
BadCase both(std::string name, std::string argument, ErrorKind kind, F mutate) {
  return {std::move(name), std::move(argument), kind,
          [mutate](fsa::ForwardArgs& a, Scratch& s) { mutate(a, s); },
          [mutate](fsa::BackwardArgs& a, Scratch& s) { mutate(a, s); }};
}

std::vector<BadCase> bad_cases() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<BadCase> cases = {
      // Wrong rank.
      both("QueryRank3", "query", ErrorKind::kShape, [](auto& a, Scratch&) { a.query.rank = 3; }),
      both("KeyRank3", "key", ErrorKind::kShape, [](auto& a, Scratch&) { a.key.rank = 3; }),
      both("ValueRank3", "value", ErrorKind::kShape, [](auto& a, Scratch&) { a.value.rank = 3; }),
      both("MaskRank3", "attn_mask", ErrorKind::kShape,
           [](auto& a, Scratch&) { a.attn_mask->rank = 3; }),
      both("BiasRank3", "attn_bias", ErrorKind::kShape,
           [](auto& a, Scratch&) { a.attn_bias->rank = 3; }),
      // Mismatched or unsupported dtypes.
      both("KeyDTypeNotQueryDType", "key", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.key.dtype = DType::kBFloat16; }),
      both("ValueDTypeNotQueryDType", "value", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.value.dtype = DType::kBFloat16; }),
      // (float64 is valid on the CPU, for gradient checks; bool never is)
      both("QueryDTypeBool", "query", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.query.dtype = a.key.dtype = a.value.dtype = DType::kBool; }),
      both("MaskNotBool", "attn_mask", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.attn_mask->dtype = DType::kFloat32; }),
      both("BiasFp16WithFp32Query", "attn_bias", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.attn_bias->dtype = DType::kFloat16; }),
      both("BiasBool", "attn_bias", ErrorKind::kDType,
           [](auto& a, Scratch&) { a.attn_bias->dtype = DType::kBool; }),
      // Mismatched devices.
      both("KeyOnOtherDevice", "key", ErrorKind::kDevice,
           [](auto& a, Scratch&) { a.key.device = cuda0(); }),
      both("ValueOnOtherDevice", "value", ErrorKind::kDevice,
           [](auto& a, Scratch&) { a.value.device = cuda0(); }),
      both("MaskOnOtherDevice", "attn_mask", ErrorKind::kDevice,
           [](auto& a, Scratch&) { a.attn_mask->device = cuda0(); }),
      both("BiasOnOtherDevice", "attn_bias", ErrorKind::kDevice,
           [](auto& a, Scratch&) { a.attn_bias->device = cuda0(); }),
      // Head counts: H % Hk != 0 (H = 4, Hk = 3).
      both("KvHeadsNotDividingHeads", "key", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.key, {1, 7, 3, 8}, s);
             set_shape(a.value, {1, 7, 3, 8}, s);
           }),
      // Sizes that do not match.
      both("KeyBatchNotQueryBatch", "key", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.key, {2, 7, 2, 8}, s);
             set_shape(a.value, {2, 7, 2, 8}, s);
           }),
      both("KeyHeadDimNotQueryHeadDim", "key", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.key, {1, 7, 2, 16}, s);
           }),
      both("ValueSeqlenNotKeySeqlen", "value", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.value, {1, 6, 2, 8}, s);
           }),
      // Mask / bias dims that are neither 1 nor the full size (H = 4, Hk = 2, Sq = 5, Sk = 7).
      both("MaskHeads3", "attn_mask", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_mask, {1, 3, 5, 7}, s);
           }),
      both("MaskBatch2WithBatch1", "attn_mask", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_mask, {2, 2, 5, 7}, s);
           }),
      both("MaskQueryDim4", "attn_mask", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_mask, {1, 2, 4, 7}, s);
           }),
      both("MaskKeyDim8", "attn_mask", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_mask, {1, 2, 5, 8}, s);
           }),
      both("BiasHeads3", "attn_bias", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_bias, {1, 3, 1, 7}, s);
           }),
      both("BiasKeyDim6", "attn_bias", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(*a.attn_bias, {1, 4, 1, 6}, s);
           }),
      // Head dim out of range.
      both("HeadDim0", "query", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.query, {1, 5, 4, 0}, s);
             set_shape(a.key, {1, 7, 2, 0}, s);
             set_shape(a.value, {1, 7, 2, 0}, s);
           }),
      both("HeadDim264", "query", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.query, {1, 5, 4, 264}, s);
             set_shape(a.key, {1, 7, 2, 264}, s);
             set_shape(a.value, {1, 7, 2, 264}, s);
           }),
      // Non-contiguous last dim.
      both("QueryLastDimStride2", "query", ErrorKind::kValue,
           [](auto& a, Scratch& s) {
             a.query = make_view(s.data(), a.query.dtype, {1, 5, 4, 8}, {320, 64, 16, 2});
           }),
      both("KeyLastDimStride2", "key", ErrorKind::kValue,
           [](auto& a, Scratch& s) {
             a.key = make_view(s.data(), a.key.dtype, {1, 7, 2, 8}, {224, 32, 16, 2});
           }),
      both("ValueLastDimStride2", "value", ErrorKind::kValue,
           [](auto& a, Scratch& s) {
             a.value = make_view(s.data(), a.value.dtype, {1, 7, 2, 8}, {224, 32, 16, 2});
           }),
      // Scalar options.
      both("SoftmaxScaleNegative", "softmax_scale", ErrorKind::kValue,
           [](auto& a, Scratch&) { a.options.softmax_scale = -0.5f; }),
      both("SoftmaxScaleNaN", "softmax_scale", ErrorKind::kValue,
           [nan](auto& a, Scratch&) { a.options.softmax_scale = nan; }),
      both("SoftmaxScaleInf", "softmax_scale", ErrorKind::kValue,
           [inf](auto& a, Scratch&) { a.options.softmax_scale = inf; }),
      both("SoftcapNegative", "softcap", ErrorKind::kValue,
           [](auto& a, Scratch&) { a.options.softcap = -1.0f; }),
      both("SoftcapNaN", "softcap", ErrorKind::kValue,
           [nan](auto& a, Scratch&) { a.options.softcap = nan; }),
      // out (an output of forward, an input of backward).
      both("OutWrongSeqlen", "out", ErrorKind::kShape,
           [](auto& a, Scratch& s) {
             set_shape(a.out, {1, 6, 4, 8}, s);
           }),
      both("OutDTypeNotQueryDType", "out", ErrorKind::kDType,
           [](auto& a, Scratch& s) {
             a.out = make_view(s.data(), DType::kBFloat16, {1, 5, 4, 8}, {160, 32, 8, 1});
           }),
      both("OutLastDimStride2", "out", ErrorKind::kValue,
           [](auto& a, Scratch& s) {
             a.out = make_view(s.data(), a.out.dtype, {1, 5, 4, 8}, {320, 64, 16, 2});
           }),
      both("OutOnOtherDevice", "out", ErrorKind::kDevice,
           [](auto& a, Scratch&) { a.out.device = cuda0(); }),
  };

  // Forward only.
  auto forward_case = [&](std::string name, std::string argument, ErrorKind kind,
                          std::function<void(fsa::ForwardArgs&, Scratch&)> mutate) {
    cases.push_back({std::move(name), std::move(argument), kind, std::move(mutate), nullptr});
  };
  forward_case("ForwardLseWrongShape", "lse", ErrorKind::kShape,
               [](fsa::ForwardArgs& a, Scratch& s) {
                 a.lse = make_view(s.data(), DType::kFloat32, {1, 4, 6}, {24, 6, 1});
               });
  forward_case("ForwardLseNotFp32", "lse", ErrorKind::kDType, [](fsa::ForwardArgs& a, Scratch& s) {
    a.lse = make_view(s.data(), DType::kBFloat16, {1, 4, 5}, {20, 5, 1});
  });
  // A paged cache on CUDA whose rows are not 16-byte chunks (pages 4 bytes off alignment): the
  // kernels would need a padded copy of the cache, which is never made. Refused before anything
  // touches a device (this runs in CPU-only builds too).
  forward_case("PagedCudaRowsNot16Bytes", "key", ErrorKind::kUnsupported,
               [](fsa::ForwardArgs& a, Scratch& s) {
                 static const int32_t table[2] = {0, 1};
                 a.key = make_view(static_cast<uint8_t*>(s.data()) + 4, a.key.dtype, {2, 4, 2, 8},
                                   {64, 16, 8, 1});
                 a.value = a.key;
                 a.paged_kv = fsa::PagedKV{table, 2};
                 a.query.device = cuda0();
               });

  // A cache's lengths: each in [0, Sk] (Sk = 7 here), checked on the CPU before anything runs.
  forward_case("CacheSeqlensPastTheKeys", "cache_seqlens", ErrorKind::kValue,
               [](fsa::ForwardArgs& a, Scratch&) {
                 static const int32_t lengths[1] = {8};
                 a.cache_seqlens = lengths;
               });
  forward_case("CacheSeqlensNegative", "cache_seqlens", ErrorKind::kValue,
               [](fsa::ForwardArgs& a, Scratch&) {
                 static const int32_t lengths[1] = {-1};
                 a.cache_seqlens = lengths;
               });

  // Backward only.
  auto backward_case = [&](std::string name, std::string argument, ErrorKind kind,
                           std::function<void(fsa::BackwardArgs&, Scratch&)> mutate) {
    cases.push_back({std::move(name), std::move(argument), kind, nullptr, std::move(mutate)});
  };
  backward_case("BackwardLseWrongShape", "lse", ErrorKind::kShape,
                [](fsa::BackwardArgs& a, Scratch& s) {
                  a.lse = make_view(s.data(), DType::kFloat32, {1, 4, 6}, {24, 6, 1});
                });
  backward_case("BackwardLseNotFp32", "lse", ErrorKind::kDType,
                [](fsa::BackwardArgs& a, Scratch&) { a.lse.dtype = DType::kBFloat16; });
  backward_case("DoutWrongShape", "dout", ErrorKind::kShape, [](fsa::BackwardArgs& a, Scratch& s) {
    set_shape(a.dout, {1, 5, 4, 9}, s);
  });
  backward_case("DoutDTypeNotQueryDType", "dout", ErrorKind::kDType,
                [](fsa::BackwardArgs& a, Scratch&) { a.dout.dtype = DType::kBFloat16; });
  backward_case("DqueryWrongShape", "dquery", ErrorKind::kShape,
                [](fsa::BackwardArgs& a, Scratch& s) {
                  set_shape(a.dquery, {1, 5, 2, 8}, s);
                });
  backward_case("DqueryDTypeNotQueryDType", "dquery", ErrorKind::kDType,
                [](fsa::BackwardArgs& a, Scratch&) { a.dquery.dtype = DType::kBFloat16; });
  backward_case("DkeyWrongShape", "dkey", ErrorKind::kShape, [](fsa::BackwardArgs& a, Scratch& s) {
    set_shape(a.dkey, {1, 7, 4, 8}, s);
  });
  backward_case("DvalueDTypeNotValueDType", "dvalue", ErrorKind::kDType,
                [](fsa::BackwardArgs& a, Scratch&) { a.dvalue.dtype = DType::kBFloat16; });
  backward_case("DvalueLastDimStride2", "dvalue", ErrorKind::kValue,
                [](fsa::BackwardArgs& a, Scratch& s) {
                  a.dvalue = make_view(s.data(), a.dvalue.dtype, {1, 7, 2, 8}, {224, 32, 16, 2});
                });
  backward_case("DbiasShapeNotBiasShape", "dbias", ErrorKind::kShape,
                [](fsa::BackwardArgs& a, Scratch& s) {
                  set_shape(*a.dbias, {1, 4, 5, 7}, s);
                });
  backward_case("DbiasDTypeNotBiasDType", "dbias", ErrorKind::kDType,
                [](fsa::BackwardArgs& a, Scratch&) { a.dbias->dtype = DType::kBFloat16; });
  backward_case("DbiasWithoutBias", "dbias", ErrorKind::kValue,
                [](fsa::BackwardArgs& a, Scratch&) { a.attn_bias.reset(); });
  return cases;
}

std::vector<BadCase> cases_with(std::function<bool(const BadCase&)> applies) {
  std::vector<BadCase> selected;
  for (const BadCase& c : bad_cases()) {
    if (applies(c)) selected.push_back(c);
  }
  return selected;
}

// The library buffers of the valid call, with forward's outputs computed once (backward reads
// them) and every output of the call under test filled with the sentinel.
struct ValidCall {
  CaseSpec spec = valid_spec();
  Problem problem = make_problem(spec);
  Inputs inputs = make_inputs(spec, problem);
  LibraryBuffers buffers{problem, inputs, spec.dtype, spec.dtype};
  fsa::AttentionOptions options = make_options(spec);
  Scratch scratch;
};

void expect_rejected(const std::function<void()>& call, const BadCase& c) {
  try {
    call();
    ADD_FAILURE() << c.name << " was accepted; expected an fsa::Error naming " << c.argument;
  } catch (const fsa::Error& e) {
    EXPECT_EQ(e.argument(), c.argument) << e.what();
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(c.kind))
        << "kind (0 shape, 1 dtype, 2 device, 3 value, 4 unsupported); " << e.what();
    EXPECT_NE(std::string(e.what()).find(c.argument), std::string::npos)
        << "the message should name the argument: " << e.what();
  }
}

class BadForwardInput : public ::testing::TestWithParam<BadCase> {};
class BadBackwardInput : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadForwardInput, RaisesNamingTheArgumentAndWritesNothing) {
  const BadCase& c = GetParam();
  ValidCall call;
  fsa::ForwardArgs args = call.buffers.forward_args(call.options);
  fsa::forward(args);  // the unbroken call is accepted
  call.buffers.out.fill_bytes(kSentinel);
  call.buffers.lse.fill_bytes(kSentinel);
  c.forward(args, call.scratch);
  expect_rejected([&] { fsa::forward(args); }, c);
  EXPECT_TRUE(call.buffers.out.all_bytes_equal(kSentinel)) << "out was written";
  EXPECT_TRUE(call.buffers.lse.all_bytes_equal(kSentinel)) << "lse was written";
  EXPECT_TRUE(std::all_of(call.scratch.bytes.begin(), call.scratch.bytes.end(), [](uint8_t b) {
    return b == kSentinel;
  })) << "memory behind a broken view was written";
}

TEST_P(BadBackwardInput, RaisesNamingTheArgumentAndWritesNothing) {
  const BadCase& c = GetParam();
  ValidCall call;
  fsa::forward(call.buffers.forward_args(call.options));
  fsa::BackwardArgs args = call.buffers.backward_args(call.options);
  fsa::backward(args);  // the unbroken call is accepted
  for (HostTensor* t :
       {&call.buffers.dq, &call.buffers.dk, &call.buffers.dv, &*call.buffers.dbias}) {
    t->fill_bytes(kSentinel);
  }
  c.backward(args, call.scratch);
  expect_rejected([&] { fsa::backward(args); }, c);
  EXPECT_TRUE(call.buffers.dq.all_bytes_equal(kSentinel)) << "dquery was written";
  EXPECT_TRUE(call.buffers.dk.all_bytes_equal(kSentinel)) << "dkey was written";
  EXPECT_TRUE(call.buffers.dv.all_bytes_equal(kSentinel)) << "dvalue was written";
  EXPECT_TRUE(call.buffers.dbias->all_bytes_equal(kSentinel)) << "dbias was written";
  EXPECT_TRUE(std::all_of(call.scratch.bytes.begin(), call.scratch.bytes.end(), [](uint8_t b) {
    return b == kSentinel;
  })) << "memory behind a broken view was written";
}

INSTANTIATE_TEST_SUITE_P(
    SpecSection6, BadForwardInput,
    ::testing::ValuesIn(cases_with([](const BadCase& c) { return bool(c.forward); })), case_name);
INSTANTIATE_TEST_SUITE_P(
    SpecSection6, BadBackwardInput,
    ::testing::ValuesIn(cases_with([](const BadCase& c) { return bool(c.backward); })), case_name);

// A plan must describe the call it is passed to.
TEST(BadPlan, PlanForAnotherProblemRaisesNamingPlan) {
  ValidCall call;
  const fsa::TensorView mask = call.buffers.mask->view();
  struct PlanCase {
    const char* what;
    fsa::Plan plan;
  };
  CaseSpec longer = valid_spec();
  longer.seqlen_q = 6;
  longer.mask_shape = Shape4{1, 2, 6, 7};
  const Problem longer_problem = make_problem(longer);
  LibraryBuffers longer_buffers(longer_problem, make_inputs(longer, longer_problem),
                                DType::kFloat32, DType::kFloat32);
  const std::vector<PlanCase> plans = {
      {"other seqlen_q", fsa::make_plan(longer_buffers.q.view(), longer_buffers.k.view(),
                                        longer_buffers.mask->view(), true)},
      {"not causal", fsa::make_plan(call.buffers.q.view(), call.buffers.k.view(), mask, false)},
      {"without mask",
       fsa::make_plan(call.buffers.q.view(), call.buffers.k.view(), std::nullopt, true)},
      {"default-constructed", fsa::Plan()},
  };
  for (const PlanCase& pc : plans) {
    SCOPED_TRACE(pc.what);
    fsa::ForwardArgs forward_args = call.buffers.forward_args(call.options);
    forward_args.plan = &pc.plan;
    call.buffers.out.fill_bytes(kSentinel);
    try {
      fsa::forward(forward_args);
      ADD_FAILURE() << "forward accepted a plan " << pc.what;
    } catch (const fsa::Error& e) {
      EXPECT_EQ(e.argument(), "plan") << e.what();
    }
    EXPECT_TRUE(call.buffers.out.all_bytes_equal(kSentinel));
    fsa::BackwardArgs backward_args = call.buffers.backward_args(call.options);
    backward_args.plan = &pc.plan;
    call.buffers.dq.fill_bytes(kSentinel);
    try {
      fsa::backward(backward_args);
      ADD_FAILURE() << "backward accepted a plan " << pc.what;
    } catch (const fsa::Error& e) {
      EXPECT_EQ(e.argument(), "plan") << e.what();
    }
    EXPECT_TRUE(call.buffers.dq.all_bytes_equal(kSentinel));
  }
}

}  // namespace
}  // namespace fsa_test
