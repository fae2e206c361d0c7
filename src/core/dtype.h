#pragma once
// Element conversions between storage dtypes and fp32, written out so the core depends on no
// half-precision library. fp16 and bf16 round to nearest even, like the hardware converters.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fsa/tensor.h"

namespace fsa::detail {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal: value = man * 2^-24.
    const float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Below the smallest normal (2^-14): a multiple of 2^-24 (a subnormal, or 2^-14 itself after
    // rounding up), rounded to nearest even in the default floating-point rounding mode.
    const float scaled = bits_to_float(abs) * 16777216.0f;  // exact: times 2^24
    const float rounded = std::nearbyint(scaled);           // ties to even (default mode)
    return uint16_t(sign | uint16_t(rounded));
  }
  uint32_t v = abs - 0x38000000u;       // rebias exponent 127 -> 15 (in place, shifted by 13)
  v += 0xfffu + ((v >> 13) & 1u);       // round to nearest even on the 13 dropped bits
  return uint16_t(sign | uint16_t(v >> 13));
}

// Reads n consecutive elements of a float-like dtype into fp32. (n = 0 returns before memcpy,
// whose pointers must not be null even for no bytes: an empty row's buffer may have none.)
inline void load_floats(const void* src, DType dtype, int64_t n, float* dst) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, size_t(n) * sizeof(float));
      break;
    case DType::kBFloat16: {
      const auto* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i]);
      break;
    }
    case DType::kFloat16: {
      const auto* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(p[i]);
      break;
    }
    case DType::kFloat64: {
      const auto* p = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = float(p[i]);
      break;
    }
    case DType::kBool: {
      const auto* p = static_cast<const uint8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = p[i] ? 1.0f : 0.0f;
      break;
    }
  }
}

// Reads one element at a (possibly non-unit) position of a float-like dtype.
inline float load_float(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kFloat64: return float(static_cast<const double*>(base)[offset]);
    case DType::kBool: return static_cast<const uint8_t*>(base)[offset] ? 1.0f : 0.0f;
  }
  return 0.0f;
}

// Writes n consecutive fp32 values into a float dtype, rounding to nearest even (n = 0: nothing,
// as load_floats).
inline void store_floats(const float* src, int64_t n, DType dtype, void* dst) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, size_t(n) * sizeof(float));
      break;
    case DType::kBFloat16: {
      auto* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(src[i]);
      break;
    }
    case DType::kFloat16: {
      auto* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(src[i]);
      break;
    }
    case DType::kFloat64: {
      auto* p = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = double(src[i]);
      break;
    }
    case DType::kBool: {
      auto* p = static_cast<uint8_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = src[i] != 0.0f;
      break;
    }
  }
}

inline void store_float(float value, DType dtype, void* base, int64_t offset) {
  store_floats(&value, 1, dtype,
               static_cast<char*>(base) + offset * int64_t(dtype_size(dtype)));
}

template <typename T = void>
inline const T* element_ptr(const void* base, DType dtype, int64_t offset) {
  return reinterpret_cast<const T*>(static_cast<const char*>(base) +
                                    offset * int64_t(dtype_size(dtype)));
}
template <typename T = void>
inline T* element_ptr(void* base, DType dtype, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset * int64_t(dtype_size(dtype)));
}

// Accumulation-type versions of the loads and stores: T = float for fp32 / bf16 / fp16 data, and
// T = double for fp64 data (which is read and written without passing through fp32).
template <typename T>
inline void load_values(const void* src, DType dtype, int64_t n, T* dst) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<T, float>) {
    load_floats(src, dtype, n, dst);
  } else if (dtype == DType::kFloat64) {
    std::memcpy(dst, src, size_t(n) * sizeof(double));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = T(load_float(src, dtype, i));
  }
}

template <typename T>
inline T load_value(const void* base, DType dtype, int64_t offset) {
  if (dtype == DType::kFloat64) return T(static_cast<const double*>(base)[offset]);
  return T(load_float(base, dtype, offset));
}

template <typename T>
inline void store_values(const T* src, int64_t n, DType dtype, void* dst) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<T, float>) {
    store_floats(src, n, dtype, dst);
  } else if (dtype == DType::kFloat64) {
    std::memcpy(dst, src, size_t(n) * sizeof(double));
  } else {
    for (int64_t i = 0; i < n; ++i) store_float(float(src[i]), dtype, dst, i);
  }
}

template <typename T>
inline void store_value(T value, DType dtype, void* base, int64_t offset) {
  store_values(&value, 1, dtype, static_cast<char*>(base) + offset * int64_t(dtype_size(dtype)));
}

}  // namespace fsa::detail
