#pragma once
// Per-row top-k without a mask tensor (PlanOptions::topk): every row keeps only the `topk` largest
// entries of a query-invariant bias among the keys it may see (the mask and causality), exactly
// what create_mask keeps when given that mask — ties to the lower key index, never an entry equal
// to the fill — represented by one threshold per row instead of an Sq x Sk mask:
//
//   keep (i, j)  iff  allowed(i, j)  and  bias_j != fill  and
//                     (key(bias_j) > key_i  or  (key(bias_j) == key_i and j <= last_i))
//
// key() is the order-preserving integer of the value as fp32 (NaN highest, as torch.topk ranks
// it); (key_i, last_i) is the row's k-th kept entry, or (0, INT32_MAX) when the row has at most
// topk candidates. The kernels read the bias anyway, so the test costs a compare per entry and no
// memory traffic. The thresholds are planned once per bias (the plan holds them) from O(B * Hx *
// Sq) memory.

#include <cstdint>
#include <cstring>

#include "core/host_device.h"

namespace fsa::detail {

// A float's bits remapped so that unsigned order is the float order; every NaN ranks highest.
FSA_HOST_DEVICE inline uint32_t order_key(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  const uint32_t flip = uint32_t(int32_t(u) >> 31) | 0x80000000u;  // negative: every bit
  return (u & 0x7fffffffu) > 0x7f800000u ? 0xffffffffu : u ^ flip;
}

// The per-row thresholds as the kernels read them (layout (batch | 1, heads, Sq)).
struct RowTopK {
  const uint32_t* key = nullptr;  // null: no per-row top-k
  const int32_t* last = nullptr;
  int64_t stride_b = 0;  // 0 when every batch shares the thresholds
  int64_t stride_h = 0;
  int64_t head_group = 1;  // query heads per head of the thresholds
  uint32_t fill_key = 0;   // the fill's key, and -0.0's or +0.0's for a zero fill (else the same)
  uint32_t fill_key_alt = 0;

  FSA_HOST_DEVICE int64_t at(int64_t b, int64_t h, int64_t i) const {
    return b * stride_b + (h / head_group) * stride_h + i;
  }
  // Whether a row with threshold (threshold, last_kept) keeps key j whose value's order key is k
  // (the forward reads each row's threshold once per tile and the keys' order keys once).
  FSA_HOST_DEVICE bool keeps_key(uint32_t k, int64_t j, uint32_t threshold,
                                 int32_t last_kept) const {
    return k != fill_key && k != fill_key_alt &&
           (k > threshold || (k == threshold && j <= last_kept));
  }
  // Whether row `at` (from at()) keeps key j whose bias value is `value`: keeps_key, reading the
  // row's last kept index only on a tie (as an argument it was always loaded, which cost the sm80
  // forward 28 more bytes of spills).
  FSA_HOST_DEVICE bool keeps(float value, int64_t j, int64_t at) const {
    const uint32_t k = order_key(value);
    return k != fill_key && k != fill_key_alt && (k > key[at] || (k == key[at] && j <= last[at]));
  }
};

}  // namespace fsa::detail
