#include "test_dtypes.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace fsa_test {
namespace {

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Drops the low `shift` bits of `mantissa`, rounding to nearest with ties to even.
uint32_t shift_right_rne(uint32_t mantissa, int shift) {
  const uint32_t kept = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

}  // namespace

uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN stays NaN (quiet), sign kept
  }
  // bf16 is the top half of an fp32; the carry of the rounding may ripple into the exponent,
  // which is exactly right (including rounding the largest values up to infinity).
  return static_cast<uint16_t>(shift_right_rne(bits, 16));
}

float bf16_bits_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_fp16_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  // 65520 = 65504 (largest fp16) + half an ulp; it and everything above round to infinity.
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  const int exponent = static_cast<int>(magnitude >> 23);  // biased fp32 exponent
  if (exponent < 113) {
    // Below 2^-14: an fp16 subnormal, a multiple of 2^-24. The fp32 value is
    // (mantissa | 2^23) * 2^(exponent - 150), so the multiple is that shifted right by 126 - e.
    const int shift = 126 - exponent;
    if (shift > 24) return static_cast<uint16_t>(sign);  // below 2^-25 (or exactly it): 0
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    return static_cast<uint16_t>(sign | shift_right_rne(mantissa, shift));
  }
  // Normal: rebias the exponent (127 -> 15) and round the mantissa from 23 to 10 bits; a carry
  // out of the mantissa correctly bumps the exponent.
  const uint32_t rebased = magnitude - (112u << 23);
  return static_cast<uint16_t>(sign | shift_right_rne(rebased, 13));
}

float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // exact
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

float round_to(fsa::DType dtype, float value) {
  switch (dtype) {
    case fsa::DType::kFloat32:
      return value;
    case fsa::DType::kBFloat16:
      return bf16_bits_to_float(float_to_bf16_bits(value));
    case fsa::DType::kFloat16:
      return fp16_bits_to_float(float_to_fp16_bits(value));
    default:
      throw std::logic_error("round_to: not a floating tested dtype");
  }
}

double round_input(fsa::DType dtype, double value) {
  if (dtype == fsa::DType::kFloat64) return value;
  return round_to(dtype, static_cast<float>(value));
}

size_t element_size(fsa::DType dtype) {
  switch (dtype) {
    case fsa::DType::kFloat32:
      return 4;
    case fsa::DType::kFloat16:
    case fsa::DType::kBFloat16:
      return 2;
    case fsa::DType::kBool:
      return 1;
    case fsa::DType::kFloat64:
      return 8;
  }
  return 0;
}

std::string dtype_name(fsa::DType dtype) {
  switch (dtype) {
    case fsa::DType::kFloat32:
      return "fp32";
    case fsa::DType::kFloat16:
      return "fp16";
    case fsa::DType::kBFloat16:
      return "bf16";
    case fsa::DType::kBool:
      return "bool";
    case fsa::DType::kFloat64:
      return "fp64";
  }
  return "?";
}

}  // namespace fsa_test
