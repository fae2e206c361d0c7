// The tests' own fp32 <-> bf16 / fp16 conversions: every other test relies on them.

#include "test_dtypes.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "harness.h"

namespace fsa_test {
namespace {

TEST(TestDTypes, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16_bits(-2.0f), 0xc000);
  EXPECT_EQ(float_to_bf16_bits(-0.0f), 0x8000);
  // bf16 ulp at 1 is 2^-7. 1 + 2^-8 is a tie between 1 (even) and 1 + 2^-7: goes to 1.
  EXPECT_EQ(float_to_bf16_bits(1.0f + 0x1.0p-8f), 0x3f80);
  // 1 + 3 * 2^-8 is a tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even): goes up.
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * 0x1.0p-8f), 0x3f82);
  // Just above a tie rounds up.
  EXPECT_EQ(float_to_bf16_bits(std::nextafter(1.0f + 0x1.0p-8f, 2.0f)), 0x3f81);
  EXPECT_EQ(float_to_bf16_bits(std::numeric_limits<float>::max()), 0x7f80);  // -> inf
  EXPECT_EQ(float_to_bf16_bits(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::nanf("")))));
  EXPECT_EQ(bf16_bits_to_float(0x3f80), 1.0f);
}

TEST(TestDTypes, Fp16RoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(float_to_fp16_bits(1.0f), 0x3c00);
  EXPECT_EQ(float_to_fp16_bits(-2.0f), 0xc000);
  EXPECT_EQ(float_to_fp16_bits(65504.0f), 0x7bff);    // largest finite
  EXPECT_EQ(float_to_fp16_bits(65519.0f), 0x7bff);    // below the tie
  EXPECT_EQ(float_to_fp16_bits(65520.0f), 0x7c00);    // tie with odd 65504: rounds to inf
  EXPECT_EQ(float_to_fp16_bits(0x1.0p-14f), 0x0400);  // smallest normal
  EXPECT_EQ(float_to_fp16_bits(0x1.0p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_fp16_bits(0x1.0p-25f), 0x0000);  // tie between 0 (even) and 2^-24
  EXPECT_EQ(float_to_fp16_bits(0x1.8p-25f), 0x0001);  // above the tie
  EXPECT_EQ(float_to_fp16_bits(0x1.8p-24f), 0x0002);  // tie between 1 and 2 (even) subnormal units
  EXPECT_EQ(float_to_fp16_bits(1.0f + 0x1.0p-11f), 0x3c00);      // tie to even
  EXPECT_EQ(float_to_fp16_bits(1.0f + 3 * 0x1.0p-11f), 0x3c02);  // tie to even, upwards
  EXPECT_EQ(float_to_fp16_bits(0x1.ffep-15f), 0x0400);  // subnormal rounding carries into normal
  EXPECT_TRUE(std::isnan(fp16_bits_to_float(float_to_fp16_bits(std::nanf("")))));
  EXPECT_EQ(fp16_bits_to_float(0x0001), 0x1.0p-24f);
  EXPECT_EQ(fp16_bits_to_float(0x7c00), std::numeric_limits<float>::infinity());
}

TEST(TestDTypes, EveryBf16AndFp16ValueRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto b = static_cast<uint16_t>(bits);
    const float as_bf16 = bf16_bits_to_float(b);
    if (!std::isnan(as_bf16)) {
      ASSERT_EQ(float_to_bf16_bits(as_bf16), b) << std::hex << bits;
    }
    const float as_fp16 = fp16_bits_to_float(b);
    if (!std::isnan(as_fp16)) {
      ASSERT_EQ(float_to_fp16_bits(as_fp16), b) << std::hex << bits;
    }
  }
}

// For random floats, the result is a nearest representable value, and ties go to even bits.
TEST(TestDTypes, RoundingPicksTheNearestNeighbour) {
  Rng rng(7);
  for (int n = 0; n < 200000; ++n) {
    const float x = static_cast<float>(
        std::ldexp(2.0 * rng.uniform() - 1.0, static_cast<int>(rng.next() % 44) - 28));
    for (const fsa::DType dtype : {fsa::DType::kBFloat16, fsa::DType::kFloat16}) {
      const bool bf16 = dtype == fsa::DType::kBFloat16;
      const uint16_t bits = bf16 ? float_to_bf16_bits(x) : float_to_fp16_bits(x);
      const auto value = [&](uint16_t b) {
        return static_cast<double>(bf16 ? bf16_bits_to_float(b) : fp16_bits_to_float(b));
      };
      const double got = std::abs(value(bits) - x);
      // Neighbours in magnitude (same sign): bits +- 1 within the finite range.
      for (const int step : {-1, 1}) {
        const uint16_t magnitude = bits & 0x7fff;
        if ((step < 0 && magnitude == 0) || (magnitude + step) >= (bf16 ? 0x7f80 : 0x7c00))
          continue;
        const auto neighbour = static_cast<uint16_t>(bits + step);
        const double other = std::abs(value(neighbour) - x);
        ASSERT_LE(got, other) << x;
        if (got == other) {
          ASSERT_EQ(bits & 1, 0) << "tie not to even for " << x;
        }
      }
    }
  }
}

}  // namespace
}  // namespace fsa_test
