// SPEC section 7, cases 1-14, on the CPU backend: fsa::forward / fsa::backward against the fp64
// reference under the SPEC pass rule (see harness.h). Case 15 (mask utilities) is the Python
// package's. Shapes are the SPEC's exactly unless a comment says otherwise.
//
// Dtypes: fp32 and bf16 everywhere; fp16 too where the case is cheap (the big dense and top-k
// cases would double the suite's time for a third pass through the same kernels).

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "harness.h"

namespace fsa_test {
namespace {

using fsa::DType;

// Cases run in fp32 and bf16.
class SpecCase : public ::testing::TestWithParam<DType> {};
// Cheap cases, also run in fp16.
class SpecCaseAllDTypes : public ::testing::TestWithParam<DType> {};

INSTANTIATE_TEST_SUITE_P(CPU, SpecCase, ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         dtype_param_name);
INSTANTIATE_TEST_SUITE_P(CPU, SpecCaseAllDTypes,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         dtype_param_name);

// ---- 1. (2,512,512,8,8,64) no mask/bias, causal on and off --------------------------------------

TEST_P(SpecCaseAllDTypes, Case01_NoMaskNoBias_NonCausal) {
  expect_case_matches_reference(case_spec(GetParam(), 2, 512, 512, 8, 8, 64));
}

TEST_P(SpecCaseAllDTypes, Case01_NoMaskNoBias_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 512, 512, 8, 8, 64);
  spec.causal = true;
  expect_case_matches_reference(spec);
}

// ---- 2. (2,1024,1024,16,16,128) causal; (1,1024,1024,4,4,256) -----------------------------------

TEST_P(SpecCase, Case02_D128_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 1024, 1024, 16, 16, 128);
  spec.causal = true;
  expect_case_matches_reference(spec);
}

// The SPEC gives no causality for the D = 256 shape; non-causal here, so D = 256 is also covered
// on fully dense tiles (the causal path at D = 256 runs in case 9's sweep).
TEST_P(SpecCase, Case02_D256_NonCausal) {
  expect_case_matches_reference(case_spec(GetParam(), 1, 1024, 1024, 4, 4, 256));
}

// ---- 3. Trainable-mask path: top-k mask, bias (B,Hk,1,Sk), causal -------------------------------

// The top-256 keys by bias per row among the causally visible keys (what create_mask(type="topk",
// window_size=256) gives with a 4-D causal mask), built here, not through the Python utilities.
// Ties (bf16 bias values repeat) go to the lower key index.
void topk_causal_mask(const Problem& p, const Inputs& in, Rng&, std::vector<uint8_t>& mask) {
  constexpr int64_t kWindow = 256;
  const int64_t Sq = p.seqlen_q, Sk = p.seqlen_k;
  std::vector<int64_t> order(Sk);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
      const double* bias = in.bias.data() + (b * p.kv_heads + hk) * Sk;  // bias (B, Hk, 1, Sk)
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [bias](int64_t x, int64_t y) { return bias[x] > bias[y]; });
      for (int64_t i = 0; i < Sq; ++i) {
        uint8_t* row = mask.data() + ((b * p.kv_heads + hk) * Sq + i) * Sk;
        const int64_t visible_end = std::clamp<int64_t>(i + Sk - Sq + 1, 0, Sk);
        int64_t picked = 0;
        for (int64_t n = 0; n < Sk && picked < kWindow; ++n) {
          if (order[n] < visible_end) {
            row[order[n]] = 1;
            ++picked;
          }
        }
      }
    }
  }
}

TEST_P(SpecCase, Case03_TopkMaskPerKvHead_BiasKvHeadQueryDim1_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 2048, 2048, 8, 2, 128);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 2, 1, 2048};
  spec.mask_shape = Shape4{2, 2, 2048, 2048};
  spec.make_mask = topk_causal_mask;
  expect_case_matches_reference(spec);
}

// ---- 4. Bias only, query dim 1, GQA 4: (2,1000,1000,8,2,64), causal -----------------------------
// 1000 = 15 * 64 + 40: the last query and key tiles are ragged.

TEST_P(SpecCase, Case04_BiasOnlyQueryDim1_Gqa4_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 1000, 1000, 8, 2, 64);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 8, 1, 1000};
  expect_case_matches_reference(spec);
}

// ---- 5. Decode with GQA: (3,1,1025,32,4,128), mask and bias (B,Hk,1,Sk), causal -----------------
// Sq = 1 with is_causal means "see every key"; 1025 = 16 * 64 + 1 leaves a one-key tail tile.

TEST_P(SpecCaseAllDTypes, Case05_DecodeGqa8_MaskAndBiasPerKvHead_Causal) {
  CaseSpec spec = case_spec(GetParam(), 3, 1, 1025, 32, 4, 128);
  spec.causal = true;
  spec.mask_shape = Shape4{3, 4, 1, 1025};
  spec.bias_shape = Shape4{3, 4, 1, 1025};
  expect_case_matches_reference(spec);
}

// ---- 6. Decode, per-head mask with 10% True, bias (1,1,1,Sk): (2,1,4096,16,2,64) ----------------

TEST_P(SpecCaseAllDTypes, Case06_DecodePerHeadMask10Percent_BiasKeyOnly) {
  CaseSpec spec = case_spec(GetParam(), 2, 1, 4096, 16, 2, 64);
  spec.mask_shape = Shape4{2, 16, 1, 4096};
  spec.bias_shape = Shape4{1, 1, 1, 4096};
  spec.make_mask = [](const Problem&, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (uint8_t& m : mask) m = rng.bernoulli(0.1) ? 1 : 0;
  };
  expect_case_matches_reference(spec);
}

// ---- 7. Fully masked rows and a fully masked batch: (2,256,256,4,4,64) --------------------------
// Batch 1 is all False; in batch 0, head h has every row i with i % 5 == h all False. The bias is
// full-shape so dbias must come out exactly 0 on every masked entry. The pass rule's structural
// checks assert O = 0, LSE = -inf and zero gradients there, and no NaN anywhere.

TEST_P(SpecCaseAllDTypes, Case07_FullyMaskedRowsAndBatch) {
  CaseSpec spec = case_spec(GetParam(), 2, 256, 256, 4, 4, 64);
  spec.mask_shape = Shape4{2, 4, 256, 256};
  spec.bias_shape = Shape4{2, 4, 256, 256};
  spec.make_mask = [](const Problem& p, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        uint8_t* row = mask.data() + (h * p.seqlen_q + i) * p.seqlen_k;  // batch 0
        for (int64_t j = 0; j < p.seqlen_k; ++j) row[j] = i % 5 != h && rng.bernoulli(0.5);
      }
    }
    // Batch 1 stays all False.
  };
  expect_case_matches_reference(spec);
}

// ---- 8. Block-structured mask: (1,1024,1024,4,4,128) --------------------------------------------
// Per head: each aligned 128x128 tile is all False with probability 1/4; otherwise each of its
// 64x64 tiles is all False with probability 0.3, else 30% random.

TEST_P(SpecCase, Case08_BlockStructuredMask) {
  CaseSpec spec = case_spec(GetParam(), 1, 1024, 1024, 4, 4, 128);
  spec.mask_shape = Shape4{1, 4, 1024, 1024};
  spec.make_mask = [](const Problem& p, const Inputs&, Rng& rng, std::vector<uint8_t>& mask) {
    const int64_t S = p.seqlen_k;
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t m128 = 0; m128 < S / 128; ++m128) {
        for (int64_t n128 = 0; n128 < S / 128; ++n128) {
          if (rng.bernoulli(0.25)) continue;  // whole 128x128 tile False
          for (int64_t sub = 0; sub < 4; ++sub) {
            if (rng.bernoulli(0.3)) continue;  // whole 64x64 tile False
            const int64_t r0 = m128 * 128 + (sub / 2) * 64, c0 = n128 * 128 + (sub % 2) * 64;
            for (int64_t i = r0; i < r0 + 64; ++i) {
              for (int64_t j = c0; j < c0 + 64; ++j) {
                mask[(h * S + i) * S + j] = rng.bernoulli(0.3) ? 1 : 0;
              }
            }
          }
        }
      }
    }
  };
  expect_case_matches_reference(spec);
}

// ---- 9. Head-dim sweep at (1,333,517,4,2,D); D = 264 raises -------------------------------------
// 333 and 517 are not multiples of any tile size: ragged tiles on both axes. Causal, so Sq < Sk
// bottom-right alignment is exercised at every D.

TEST_P(SpecCase, Case09_HeadDimSweep_Causal) {
  for (const int64_t d : {8, 20, 40, 50, 72, 100, 130, 200, 224, 256}) {
    SCOPED_TRACE("head_dim " + std::to_string(d));
    CaseSpec spec = case_spec(GetParam(), 1, 333, 517, 4, 2, d);
    spec.causal = true;
    expect_case_matches_reference(spec);
  }
}

TEST(SpecCaseErrors, Case09_HeadDim264RaisesNamingQuery) {
  HostTensor q(DType::kBFloat16, {1, 333, 4, 264}), k(DType::kBFloat16, {1, 517, 2, 264}),
      v(DType::kBFloat16, {1, 517, 2, 264}), out(DType::kBFloat16, {1, 333, 4, 264});
  out.fill_bytes(0x5a);
  fsa::ForwardArgs args;
  args.query = q.view();
  args.key = k.view();
  args.value = v.view();
  args.out = out.view();
  try {
    fsa::forward(args);
    ADD_FAILURE() << "D = 264 was accepted";
  } catch (const fsa::Error& e) {
    EXPECT_EQ(e.argument(), "query") << e.what();
    EXPECT_EQ(e.kind(), fsa::ErrorKind::kShape) << e.what();
  }
  EXPECT_TRUE(out.all_bytes_equal(0x5a)) << "out was written before the rejection";
}

// ---- 10. Broadcast reductions of dbias ----------------------------------------------------------
// 97 is prime (a ragged last query tile for any power-of-two tile); 130 = 2 * 64 + 2 leaves a
// two-key tail tile.

TEST_P(SpecCaseAllDTypes, Case10_Batch1MaskAndBias_DbiasSummedOverBatch) {
  CaseSpec spec = case_spec(GetParam(), 4, 97, 130, 4, 2, 32);
  spec.mask_shape = Shape4{1, 4, 97, 130};
  spec.bias_shape = Shape4{1, 4, 97, 130};
  expect_case_matches_reference(spec);
}

// A key-dim-1 bias shifts whole rows, so its exact gradient is 0 (each row of dS sums to 0); the
// pass rule's small_atol for dbias is relative to sum |dS|, the scale its rounding noise has.
TEST_P(SpecCaseAllDTypes, Case10_KeyDim1Bias_DbiasKeepsKeyDim1_Causal) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.causal = true;
  spec.bias_shape = Shape4{2, 4, 97, 1};
  expect_case_matches_reference(spec);
}

// SPEC section 1: the bias may be fp32 whatever the query dtype; dbias comes back in fp32.
TEST_P(SpecCaseAllDTypes, Case10_Fp32BiasPerKvHead_DbiasInFp32) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.bias_shape = Shape4{2, 2, 97, 130};
  spec.bias_dtype = DType::kFloat32;
  spec.mask_shape = Shape4{2, 1, 1, 130};
  expect_case_matches_reference(spec);
}

// ---- 11. Full (B,H,Sq,Sk) bias, no mask, Sq != Sk: (2,256,384,8,8,64), non-causal ---------------

TEST_P(SpecCaseAllDTypes, Case11_FullBias_SqNotSk_NonCausal) {
  CaseSpec spec = case_spec(GetParam(), 2, 256, 384, 8, 8, 64);
  spec.bias_shape = Shape4{2, 8, 256, 384};
  expect_case_matches_reference(spec);
}

// ---- 12. softcap in {5, 30} with bias at (1,512,512,4,4,64) -------------------------------------
// q is drawn with std 8 so scaled scores reach several times the cap of 5 and ~the cap of 30: the
// tanh is well into its nonlinear range. Causal for one of the two caps.

TEST_P(SpecCaseAllDTypes, Case12_Softcap5_WithBias) {
  CaseSpec spec = case_spec(GetParam(), 1, 512, 512, 4, 4, 64);
  spec.softcap = 5.0;
  spec.q_std = 8.0;
  spec.bias_shape = Shape4{1, 4, 512, 512};
  expect_case_matches_reference(spec);
}

TEST_P(SpecCaseAllDTypes, Case12_Softcap30_WithBias_Causal) {
  CaseSpec spec = case_spec(GetParam(), 1, 512, 512, 4, 4, 64);
  spec.softcap = 30.0;
  spec.q_std = 8.0;
  spec.causal = true;
  spec.bias_shape = Shape4{1, 4, 1, 512};
  expect_case_matches_reference(spec);
}

// ---- 13. deterministic: two backward runs bitwise equal at (1,4096,4096,2,1,64) -----------------
// With a bias (1,1,1,Sk) so dbias reduces over heads and every query row: the reduction most
// exposed to ordering. No reference needed.

TEST_P(SpecCase, Case13_DeterministicBackwardIsBitwiseReproducible) {
  CaseSpec spec = case_spec(GetParam(), 1, 4096, 4096, 2, 1, 64);
  spec.bias_shape = Shape4{1, 1, 1, 4096};
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  fsa::AttentionOptions options = make_options(spec);
  options.deterministic = true;
  LibraryBuffers first(p, in, spec.dtype, spec.dtype);
  fsa::forward(first.forward_args(options));
  fsa::backward(first.backward_args(options));
  LibraryBuffers second(p, in, spec.dtype, spec.dtype);
  second.out = first.out;
  second.lse = first.lse;
  fsa::backward(second.backward_args(options));
  EXPECT_TRUE(first.dq.bytes() == second.dq.bytes()) << "dq differs between runs";
  EXPECT_TRUE(first.dk.bytes() == second.dk.bytes()) << "dk differs between runs";
  EXPECT_TRUE(first.dv.bytes() == second.dv.bytes()) << "dv differs between runs";
  EXPECT_TRUE(first.dbias->bytes() == second.dbias->bytes()) << "dbias differs between runs";
}

// ---- 14. LSE equals the reference; out identical with and without LSE requested -----------------
// (Every case above also checks the LSE against the reference.)

TEST_P(SpecCaseAllDTypes, Case14_OutIdenticalWithAndWithoutLse_LseMatchesReference) {
  CaseSpec spec = case_spec(GetParam(), 2, 97, 130, 4, 2, 32);
  spec.causal = true;
  spec.mask_shape = Shape4{2, 2, 97, 130};
  spec.bias_shape = Shape4{1, 4, 97, 130};
  spec.backward = false;
  const Problem p = make_problem(spec);
  const Inputs in = make_inputs(spec, p);
  const fsa::AttentionOptions options = make_options(spec);
  LibraryBuffers with_lse(p, in, spec.dtype, spec.dtype);
  fsa::forward(with_lse.forward_args(options, /*with_lse=*/true));
  LibraryBuffers without_lse(p, in, spec.dtype, spec.dtype);
  fsa::forward(without_lse.forward_args(options, /*with_lse=*/false));
  EXPECT_TRUE(with_lse.out.bytes() == without_lse.out.bytes());
  expect_matches_reference(p, in, with_lse.outputs(false), spec.dtype, spec.dtype, false);
}

}  // namespace
}  // namespace fsa_test
