#pragma once
// Test-only references for SPEC sections 2 and 3, written as plain loops over the SPEC formulas:
//
//   reference_attention: fp64 everywhere (the "ref" of the pass rule);
//   naive_attention:     the same loops, rounding to the tested dtype after each operation the way
//                        a naive framework implementation does (the "naive" of the pass rule).
//
// Both read the same inputs, already rounded to the tested dtype and stored as fp64. Layouts:
// q, out, dout, dq (B, Sq, H, D); k, v, dk, dv (B, Sk, Hk, D); lse (B, H, Sq); mask and bias
// row-major in their own broadcast shape ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}); dbias in the bias's
// shape. Masked entries are skipped before any arithmetic, so the cost is O(kept entries * D)
// plus one scan of each mask row.

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "fsa/tensor.h"

namespace fsa_test {

using Shape4 = std::array<int64_t, 4>;

int64_t numel(const Shape4& shape);

struct Problem {
  int64_t batch = 1, seqlen_q = 1, seqlen_k = 1, heads = 1, kv_heads = 1, head_dim = 1;
  bool causal = false;   // bottom-right aligned: key j is visible to row i iff j <= i + Sk - Sq
  double scale = 1.0;    // the softmax scale actually used (callers resolve the 1/sqrt(D) default)
  double softcap = 0.0;  // 0 = off
  std::optional<Shape4> mask_shape;
  std::optional<Shape4> bias_shape;

  int64_t q_numel() const { return batch * seqlen_q * heads * head_dim; }
  int64_t kv_numel() const { return batch * seqlen_k * kv_heads * head_dim; }
  int64_t lse_numel() const { return batch * heads * seqlen_q; }
};

struct Inputs {
  std::vector<double> q, k, v, dout;
  std::vector<uint8_t> mask;  // 1 = keep; empty when there is no mask
  std::vector<double> bias;   // empty when there is no bias
};

struct Outputs {
  std::vector<double> out, lse, dq, dk, dv, dbias;  // backward fields empty if not asked for
  // Reference only: sum of |dS| reduced into the bias's shape like dbias. Rounding errors of a
  // sum scale with the sum of the magnitudes of its terms, not with its value (which cancels to
  // 0 for a key-dim-1 bias), so this is the scale of dbias in the pass rule's small_atol.
  std::vector<double> dbias_magnitude;
};

// Which output elements receive a contribution from at least one kept entry. Everything else must
// come out exactly 0 (SPEC: an empty row contributes exactly 0 to every gradient), and the LSE of
// an empty row exactly -inf.
struct Structure {
  std::vector<uint8_t> row_kept;   // (B, H, Sq): the row has a kept key
  std::vector<uint8_t> key_kept;   // (B, Sk, Hk): dk/dv row receives a contribution
  std::vector<uint8_t> bias_kept;  // bias shape: dbias element receives a contribution
};

// fp64 reference. `structure` is filled when not null.
Outputs reference_attention(const Problem& problem, const Inputs& inputs, bool with_backward,
                            Structure* structure = nullptr);

// Naive implementation in `dtype` (fp32, bf16 or fp16) with a bias stored in `bias_dtype`: matmuls
// accumulate in fp32 and round once; scale, softcap and bias-add round after each op; softmax in
// fp32 rounded to the dtype; backward as autograd would run it (softmax backward in fp32 from the
// fp32 probabilities, per-head dk/dv rounded before the GQA sum, dbias summed in fp32 and rounded
// to its dtype). lse is the fp32 log-sum-exp of the rounded scores.
Outputs naive_attention(const Problem& problem, const Inputs& inputs, fsa::DType dtype,
                        fsa::DType bias_dtype, bool with_backward);

}  // namespace fsa_test
