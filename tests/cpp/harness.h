#pragma once
// Test harness: deterministic inputs, host buffers in the tested dtype, views for the library,
// and the SPEC pass rule against the fp64 reference and the naive same-dtype implementation.

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "fsa/fsa.h"
#include "reference.h"

namespace fsa {
// gtest prints dtype-parameterized tests' parameter with this (ADL finds it in fsa).
void PrintTo(DType dtype, std::ostream* os);
}  // namespace fsa

namespace fsa_test {

// splitmix64 with Box-Muller: the same stream on every platform and standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // mean 0, standard deviation 1
  bool bernoulli(double p) { return uniform() < p; }

 private:
  uint64_t state_;
  std::optional<double> spare_;
};

// Row-major strides as torch and numpy compute them (a size-0 dim counts as 1, so an empty
// tensor still has non-zero strides).
std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape);
fsa::TensorView make_view(void* data, fsa::DType dtype, const std::vector<int64_t>& shape,
                          const std::vector<int64_t>& strides);

// An owned, densely packed host tensor.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(fsa::DType dtype, std::vector<int64_t> shape);
  // `values` must already be representable in `dtype` (they are stored exactly).
  static HostTensor from_values(fsa::DType dtype, std::vector<int64_t> shape,
                                const std::vector<double>& values);
  static HostTensor from_mask(std::vector<int64_t> shape, const std::vector<uint8_t>& keep);

  fsa::TensorView view() {
    return make_view(bytes_.data(), dtype_, shape_, contiguous_strides(shape_));
  }
  std::vector<double> to_doubles() const;
  void fill_bytes(uint8_t byte);
  bool all_bytes_equal(uint8_t byte) const;
  int64_t numel() const;
  fsa::DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  void* data() { return bytes_.data(); }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  fsa::DType dtype_ = fsa::DType::kFloat32;
  std::vector<int64_t> shape_;
  std::vector<uint8_t> bytes_;
};

// Element `index` of a packed `dtype` buffer, as a double; and the reverse (rounding to the dtype).
double load_element(const void* data, fsa::DType dtype, int64_t index);
void store_element(void* data, fsa::DType dtype, int64_t index, double value);

// One equivalence case: a problem, the tested dtypes and how its inputs are made.
struct CaseSpec {
  int64_t batch = 1, seqlen_q = 1, seqlen_k = 1, heads = 1, kv_heads = 1, head_dim = 1;
  bool causal = false;
  double softcap = 0.0;
  std::optional<float> softmax_scale;  // passed to the library when set; else 1/sqrt(D)
  std::optional<Shape4> mask_shape;
  std::optional<Shape4> bias_shape;
  fsa::DType dtype = fsa::DType::kFloat32;
  std::optional<fsa::DType> bias_dtype;  // default: the query dtype
  double q_std = 1.0;                    // larger values drive softcap into its nonlinear range
  double bias_std = 1.0;
  uint64_t seed = 20240601;
  bool backward = true;
  // Fills `mask` (row-major in mask_shape; bias already made). Default: each entry kept with
  // probability 1/2.
  std::function<void(const Problem&, const Inputs&, Rng&, std::vector<uint8_t>& mask)> make_mask;

  fsa::DType resolved_bias_dtype() const { return bias_dtype.value_or(dtype); }
};

// A spec with only the geometry and dtype set; tests fill in the rest.
CaseSpec case_spec(fsa::DType dtype, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                   int64_t heads, int64_t kv_heads, int64_t head_dim);
Problem make_problem(const CaseSpec& spec);
// Inputs drawn in fp64 (q, k, v, dout, bias normal; mask per make_mask), rounded to the dtypes.
Inputs make_inputs(const CaseSpec& spec, const Problem& problem);
fsa::AttentionOptions make_options(const CaseSpec& spec);

// The library's buffers for one problem: inputs copied in, outputs allocated.
struct LibraryBuffers {
  LibraryBuffers(const Problem& problem, const Inputs& inputs, fsa::DType dtype,
                 fsa::DType bias_dtype);
  fsa::ForwardArgs forward_args(const fsa::AttentionOptions& options, bool with_lse = true);
  fsa::BackwardArgs backward_args(const fsa::AttentionOptions& options);
  Outputs outputs(bool with_backward) const;

  HostTensor q, k, v, dout, out, lse, dq, dk, dv;
  std::optional<HostTensor> mask, bias, dbias;
};

// Runs fsa::forward (and fsa::backward on the forward's out and lse) on the CPU.
Outputs run_library(const Problem& problem, const Inputs& inputs, fsa::DType dtype,
                    fsa::DType bias_dtype, const fsa::AttentionOptions& options,
                    bool with_backward);

// small_atol of the pass rule, relative to a tensor's scale, by the dtype the tensor is stored in.
// fp32: 1e-5 (~170 fp32 unit roundoffs: covers reordered fp32 sums and exp/log ulps when the naive
// error happens to be tiny, far below any real defect). bf16 / fp16: half a unit roundoff
// (2^-9, 2^-12): the library stores its result rounded to the dtype, which alone can cost half an
// ulp more than the naive error measured at its worst element.
double small_atol_relative(fsa::DType stored_dtype);

// The SPEC pass rule for every output against the fp64 reference, plus no NaN, exact 0 outputs
// and gradients wherever no kept entry contributes, and LSE exactly -inf on empty rows.
void expect_matches_reference(const Problem& problem, const Inputs& inputs, const Outputs& ours,
                              fsa::DType dtype, fsa::DType bias_dtype, bool with_backward);

// make_problem + make_inputs + run_library + expect_matches_reference.
void expect_case_matches_reference(const CaseSpec& spec);

// Names dtype-parameterized tests by dtype ("fp32", "bf16", "fp16").
std::string dtype_param_name(const ::testing::TestParamInfo<fsa::DType>& info);

}  // namespace fsa_test
