#pragma once
// Element-type helpers for the tests: our own fp32 <-> bf16 / fp16 conversions (round to nearest,
// ties to even; written from the IEEE 754 bit layouts, no third-party code) and "round this value
// to the tested dtype", used both to make the inputs and by the naive same-dtype implementation.

#include <cstdint>
#include <string>

#include "fsa/tensor.h"

namespace fsa_test {

uint16_t float_to_bf16_bits(float value);
float bf16_bits_to_float(uint16_t bits);
uint16_t float_to_fp16_bits(float value);
float fp16_bits_to_float(uint16_t bits);

// `value` rounded to `dtype` (fp32, bf16 or fp16) and widened back to float.
float round_to(fsa::DType dtype, float value);
// For making inputs: fp64 -> fp32 -> dtype. The two-step rounding can differ from a direct
// fp64 -> bf16 rounding in rare ties; that does not matter here because every consumer (the fp64
// reference, the naive implementation and the library) reads the same rounded values.
double round_input(fsa::DType dtype, double value);

// Bytes per element of the dtypes the tests use (kept here so the reference stays independent
// of the library).
size_t element_size(fsa::DType dtype);
std::string dtype_name(fsa::DType dtype);

}  // namespace fsa_test
