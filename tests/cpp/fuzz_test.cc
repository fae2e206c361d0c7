// Malformed-input fuzz (issue #13, SPEC section 6): seeded random calls of fsa::make_plan,
// fsa::forward and fsa::backward on the CPU, each a valid small call with zero to three random
// defects (a rank, a dim off by one, a dtype, a device, a stride, a scalar option, a plan for
// another problem, top-k options). Every call must either raise fsa::Error naming an argument,
// with every output byte untouched, or run: no crash, its inputs unchanged, no byte of its outputs'
// storage written outside their views, no NaN from finite inputs, and (for a share of the
// undamaged forward calls) the SPEC pass rule against the fp64 reference. The case counts are
// printed for the CI log.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"
#include "test_dtypes.h"

namespace fsa_test {
namespace {

using fsa::DType;

constexpr uint8_t kSentinel = 0xa5;

// One tensor of a call, before it becomes a view: mutations edit these.
struct Desc {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  fsa::Device device{};
  int64_t last_stride = 1;  // the innermost stride (1 = contiguous)
};

// Storage for a view of `d`: contiguous strides except the innermost, room for every element.
struct Tensor {
  std::vector<uint8_t> bytes;
  fsa::TensorView view;
};

Tensor materialize(const Desc& d, Rng& rng, bool output) {
  Tensor t;
  // Row-major strides with the innermost one set by the descriptor; `extent` elements cover them.
  std::vector<int64_t> strides(d.shape.size(), 1);
  int64_t extent = 1;
  for (int i = int(d.shape.size()) - 1; i >= 0; --i) {
    strides[size_t(i)] = i == int(d.shape.size()) - 1 ? d.last_stride : extent;
    extent = strides[size_t(i)] * std::max<int64_t>(d.shape[size_t(i)], 1);
  }
  const size_t elt = element_size(d.dtype);
  t.bytes.assign(size_t(std::max<int64_t>(extent, 1)) * elt + 64, kSentinel);
  if (!output) {
    const int64_t n = int64_t((t.bytes.size() - 64) / elt);
    for (int64_t e = 0; e < n; ++e) {
      if (d.dtype == DType::kBool) {
        t.bytes[size_t(e)] = rng.bernoulli(0.7) ? 1 : 0;
      } else {
        store_element(t.bytes.data(), d.dtype, e, rng.normal());
      }
    }
  }
  t.view = make_view(t.bytes.data(), d.dtype, d.shape, strides);
  t.view.device = d.device;
  return t;
}

// A valid call's tensors.
struct Call {
  int64_t b, sq, sk, h, hk, d;
  DType dtype;
  Desc q, k, v, out, lse, dout, dq, dk, dv;
  std::optional<Desc> mask, bias, dbias;
  fsa::AttentionOptions options;
  bool plan_for_other = false;  // pass a plan built for a different problem
  bool topk_plan = false;       // plan with per-row top-k thresholds of the bias
  bool intervals_plan = false;  // plan promising the mask's rows are one interval per key
  int64_t topk = 0;
};

Call random_call(Rng& rng) {
  Call c;
  const int64_t sqs[] = {0, 1, 3, 9}, sks[] = {0, 1, 4, 11}, ds[] = {1, 3, 8, 17};
  c.b = 1 + int64_t(rng.next() % 2);
  c.sq = sqs[rng.next() % 4];
  c.sk = sks[rng.next() % 4];
  c.hk = 1 + int64_t(rng.next() % 2);
  c.h = c.hk * (1 + int64_t(rng.next() % 2));
  c.d = ds[rng.next() % 4];
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  c.dtype = dtypes[rng.next() % 3];
  auto seq = [&](int64_t s, int64_t heads) { return Desc{c.dtype, {c.b, s, heads, c.d}}; };
  c.q = c.out = c.dout = c.dq = seq(c.sq, c.h);
  c.k = c.v = c.dk = c.dv = seq(c.sk, c.hk);
  c.lse = Desc{DType::kFloat32, {c.b, c.h, c.sq}};
  auto broadcast = [&](DType dtype) {
    const int64_t heads[] = {1, c.hk, c.h};
    return Desc{dtype,
                {rng.bernoulli(0.5) ? c.b : 1, heads[rng.next() % 3], rng.bernoulli(0.5) ? c.sq : 1,
                 rng.bernoulli(0.8) ? c.sk : 1}};
  };
  if (rng.bernoulli(0.5)) c.mask = broadcast(DType::kBool);
  if (rng.bernoulli(0.5)) {
    c.bias = broadcast(rng.bernoulli(0.3) ? DType::kFloat32 : c.dtype);
    if (rng.bernoulli(0.6)) c.dbias = c.bias;
  }
  c.options.is_causal = rng.bernoulli(0.5);
  c.options.deterministic = rng.bernoulli(0.3);
  if (rng.bernoulli(0.3)) c.options.softmax_scale = float(0.05 + rng.uniform());
  if (rng.bernoulli(0.2)) c.options.softcap = float(1.0 + 20.0 * rng.uniform());
  return c;
}

// Applies one random defect; returns a name for the failure message.
std::string damage(Call& c, Rng& rng) {
  std::vector<Desc*> tensors = {&c.q, &c.k, &c.v, &c.out, &c.lse, &c.dout, &c.dq, &c.dk, &c.dv};
  if (c.mask) tensors.push_back(&*c.mask);
  if (c.bias) tensors.push_back(&*c.bias);
  if (c.dbias) tensors.push_back(&*c.dbias);
  Desc& t = *tensors[rng.next() % tensors.size()];
  const float nan = std::numeric_limits<float>::quiet_NaN();
  switch (rng.next() % 11) {
    case 0:
      t.shape.pop_back();
      return "rank";
    case 1: {
      auto& dim = t.shape[rng.next() % t.shape.size()];
      dim = std::max<int64_t>(0, dim + (rng.bernoulli(0.5) ? 1 : -1));
      return "dim";
    }
    case 2: {
      const DType all[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kBool,
                           DType::kFloat64};
      t.dtype = all[rng.next() % 5];
      return "dtype";
    }
    case 3:
      t.device = fsa::Device{fsa::DeviceType::kCUDA, 0};
      return "device";
    case 4:
      t.last_stride = 2;
      return "stride";
    case 5: {
      const float bad[] = {nan, -1.0f, std::numeric_limits<float>::infinity()};
      c.options.softmax_scale = bad[rng.next() % 3];
      return "softmax_scale";
    }
    case 6:
      c.options.softcap = rng.bernoulli(0.5) ? -2.0f : nan;
      return "softcap";
    case 7:
      c.plan_for_other = true;
      return "plan";
    case 8:
      c.topk_plan = true;
      c.topk = int64_t(rng.next() % 3) - 1;  // -1, 0 or 1
      return "topk";
    case 9:
      // Random masks are rarely intervals: the CPU plan checks the promise (or finds no mask).
      c.intervals_plan = true;
      return "mask_key_intervals";
    default:
      // One more dim where a view can hold it (TensorView has at most kMaxRank dims; the Python
      // layer rejects more before building one), else one fewer.
      if (t.shape.size() < size_t(fsa::kMaxRank)) {
        t.shape.push_back(1);
      } else {
        t.shape.pop_back();
      }
      return "rank+-1";
  }
}

// Whether every byte of t's storage outside its view's elements still holds the sentinel: an
// accepted call writes its outputs inside their views (the 64 bytes past the end, and the gaps of
// a strided view, are not theirs; AddressSanitizer cannot see these, as they lie inside one
// allocation).
bool written_inside_view(const Tensor& t) {
  std::vector<bool> covered(t.bytes.size(), false);
  const size_t elt = element_size(t.view.dtype);
  for (int64_t e = 0; e < t.view.numel(); ++e) {
    int64_t rest = e, off = 0;
    for (int dd = t.view.rank - 1; dd >= 0; --dd) {
      off += rest % t.view.shape[dd] * t.view.stride[dd];
      rest /= t.view.shape[dd];
    }
    for (size_t byte = 0; byte < elt; ++byte) covered[size_t(off) * elt + byte] = true;
  }
  for (size_t i = 0; i < t.bytes.size(); ++i) {
    if (!covered[i] && t.bytes[i] != kSentinel) return false;
  }
  return true;
}

struct Counts {
  int64_t calls = 0, rejected = 0, accepted = 0, checked = 0;
};

bool untouched(const Tensor& t) {
  for (uint8_t byte : t.bytes) {
    if (byte != kSentinel) return false;
  }
  return true;
}

void run_case(Rng& rng, Counts& counts) {
  Call c = random_call(rng);
  std::string defects;
  const int n_defects = rng.bernoulli(0.15) ? 0 : 1 + int(rng.next() % 3);
  for (int i = 0; i < n_defects; ++i) defects += damage(c, rng) + " ";
  const bool backward = rng.bernoulli(0.5);
  SCOPED_TRACE("call " + std::to_string(counts.calls) + " defects: " + defects +
               (backward ? "(backward)" : "(forward)"));

  Tensor q = materialize(c.q, rng, false), k = materialize(c.k, rng, false),
         v = materialize(c.v, rng, false), dout = materialize(c.dout, rng, false);
  Tensor out = materialize(c.out, rng, !backward), lse = materialize(c.lse, rng, !backward);
  Tensor dq = materialize(c.dq, rng, true), dk = materialize(c.dk, rng, true),
         dv = materialize(c.dv, rng, true);
  std::optional<Tensor> mask, bias, dbias;
  if (c.mask) mask = materialize(*c.mask, rng, false);
  if (c.bias) bias = materialize(*c.bias, rng, false);
  if (c.dbias && backward) dbias = materialize(*c.dbias, rng, true);
  auto opt = [](std::optional<Tensor>& t) {
    return t ? std::optional<fsa::TensorView>(t->view) : std::nullopt;
  };

  // The inputs' bytes, which no call may change.
  std::vector<std::pair<const char*, const Tensor*>> inputs = {{"query", &q}, {"key", &k},
                                                               {"value", &v}};
  if (backward) inputs.insert(inputs.end(), {{"out", &out}, {"lse", &lse}, {"dout", &dout}});
  if (mask) inputs.push_back({"attn_mask", &*mask});
  if (bias) inputs.push_back({"attn_bias", &*bias});
  std::vector<std::vector<uint8_t>> before;
  for (const auto& input : inputs) before.push_back(input.second->bytes);

  ++counts.calls;
  try {
    fsa::Plan plan;
    const fsa::Plan* plan_ptr = nullptr;
    if (c.plan_for_other || c.topk_plan || c.intervals_plan) {
      fsa::PlanOptions options;
      options.mask_key_intervals = c.intervals_plan;
      if (c.topk_plan && bias) {
        options.topk_bias = bias->view;
        options.topk = c.topk;
      }
      fsa::TensorView other_q = q.view;
      if (c.plan_for_other) other_q.shape[1] += 1;
      plan = fsa::make_plan(other_q, k.view, opt(mask), c.options.is_causal, options);
      plan_ptr = &plan;
    }
    if (!backward) {
      fsa::ForwardArgs a;
      a.query = q.view, a.key = k.view, a.value = v.view;
      a.attn_mask = opt(mask), a.attn_bias = opt(bias);
      a.options = c.options;
      a.out = out.view, a.lse = lse.view;
      a.plan = plan_ptr;
      fsa::forward(a);
    } else {
      fsa::BackwardArgs a;
      a.query = q.view, a.key = k.view, a.value = v.view, a.out = out.view, a.lse = lse.view;
      a.dout = dout.view;
      a.attn_mask = opt(mask), a.attn_bias = opt(bias);
      a.options = c.options;
      a.dquery = dq.view, a.dkey = dk.view, a.dvalue = dv.view, a.dbias = opt(dbias);
      a.plan = plan_ptr;
      fsa::backward(a);
    }
  } catch (const fsa::Error& e) {
    ++counts.rejected;
    EXPECT_FALSE(e.argument().empty()) << "an error that names no argument: " << e.what();
    if (!backward) {
      EXPECT_TRUE(untouched(out) && untouched(lse)) << "a rejected forward wrote: " << e.what();
    } else {
      EXPECT_TRUE(untouched(dq) && untouched(dk) && untouched(dv) && (!dbias || untouched(*dbias)))
          << "a rejected backward wrote: " << e.what();
    }
    return;
  }
  ++counts.accepted;
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_TRUE(inputs[i].second->bytes == before[i])
        << "the call wrote its input " << inputs[i].first;
  }
  std::vector<std::pair<const char*, const Tensor*>> outputs;
  if (!backward) {
    outputs = {{"out", &out}, {"lse", &lse}};
  } else {
    outputs = {{"dquery", &dq}, {"dkey", &dk}, {"dvalue", &dv}};
    if (dbias) outputs.push_back({"dbias", &*dbias});
  }
  for (const auto& output : outputs) {
    EXPECT_TRUE(written_inside_view(*output.second))
        << "the call wrote past the view of its output " << output.first;
  }
  // Finite inputs never give NaN (the backward reads the random out / lse it was handed, which
  // need not be a forward's, so only its finiteness of shape is checked: no crash).
  if (!backward) {
    for (int64_t e = 0; e < out.view.numel(); ++e) {
      // A contiguous view unless a defect changed the stride: read through the view's strides.
      int64_t idx[4] = {0, 0, 0, 0}, rest = e, off = 0;
      for (int dd = out.view.rank - 1; dd >= 0; --dd) {
        idx[dd] = rest % out.view.shape[dd];
        rest /= out.view.shape[dd];
        off += idx[dd] * out.view.stride[dd];
      }
      ASSERT_FALSE(std::isnan(load_element(out.bytes.data(), out.view.dtype, off)))
          << "NaN output from finite inputs";
    }
  }
  // An undamaged forward: the SPEC pass rule, through the harness, for one call in eight.
  if (n_defects == 0 && !backward && rng.bernoulli(0.125)) {
    CaseSpec spec = case_spec(c.dtype, c.b, c.sq, c.sk, c.h, c.hk, c.d);
    spec.causal = c.options.is_causal;
    spec.softcap = c.options.softcap;
    spec.softmax_scale = c.options.softmax_scale;
    if (c.mask)
      spec.mask_shape =
          Shape4{c.mask->shape[0], c.mask->shape[1], c.mask->shape[2], c.mask->shape[3]};
    if (c.bias) {
      spec.bias_shape =
          Shape4{c.bias->shape[0], c.bias->shape[1], c.bias->shape[2], c.bias->shape[3]};
      spec.bias_dtype = c.bias->dtype;
    }
    spec.seed = rng.next();
    // Forward only: at these tiny shapes a gradient can cancel to exactly 0 in fp64 (one key, or a
    // scalar bias over one row), where the pass rule's tolerance, relative to the reference's
    // scale, is 0 while any implementation that forms D from the stored output keeps a rounding
    // residue. The backward has its own suites at shapes where the rule is meaningful.
    spec.backward = false;
    expect_case_matches_reference(spec);
    ++counts.checked;
  }
}

// FSA_FUZZ_CALLS and FSA_FUZZ_SEED make a longer or another campaign (e.g. under the sanitizers:
// scripts/sanitize_check.sh); the suite's run is the default 4000 calls of one seed.
int64_t env_int(const char* name, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 0);
  if (*end != '\0' || value < 1) {
    ADD_FAILURE() << name << " must be a positive integer, got '" << text << "'";
    return fallback;
  }
  return value;
}

TEST(MalformedInputFuzz, EveryCallRaisesNamingAnArgumentOrRunsCleanly) {
  const int64_t calls = env_int("FSA_FUZZ_CALLS", 4000);
  const uint64_t seed = uint64_t(env_int("FSA_FUZZ_SEED", 0x13f022));
  Rng rng(seed);
  Counts counts;
  for (int64_t i = 0; i < calls && !HasFatalFailure(); ++i) {
    run_case(rng, counts);
    if ((i + 1) % 100000 == 0) {
      std::printf("malformed-input fuzz: %lld of %lld calls\n", (long long)(i + 1),
                  (long long)calls);
      std::fflush(stdout);
    }
  }
  std::printf(
      "malformed-input fuzz: %lld calls, %lld rejected with an error naming the argument, "
      "%lld accepted (%lld checked against the fp64 reference), seed %#llx\n",
      (long long)counts.calls, (long long)counts.rejected, (long long)counts.accepted,
      (long long)counts.checked, (unsigned long long)seed);
  EXPECT_EQ(counts.calls, calls);
  EXPECT_GT(counts.rejected, calls / 2);
  EXPECT_GT(counts.accepted, calls / 20);
}

}  // namespace
}  // namespace fsa_test
