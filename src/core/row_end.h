#pragma once
// The per-row bound of compacted keys (core/compaction.h), shared by the CPU backend and the CUDA
// kernels: row i of (b, query head h) sees keys [0, at(b, h, i)) of the problem's key axis, which
// then holds the kept keys gathered into slots; the bound replaces the mask and causality.

#include <cstdint>

#include "core/host_device.h"

namespace fsa::detail {

struct RowEnd {
  const int32_t* data = nullptr;  // (batch | 1, heads, Sq); null on every other path
  int64_t stride_b = 0;           // 0 when every batch shares the bounds
  int64_t stride_h = 0;
  // Query heads per head of the array. 32-bit: the kernels divide by it per entry, and a head
  // index fits 32 bits (the CUDA grids allow 65535 heads).
  int32_t head_group = 1;

  FSA_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t i) const {
    return b * stride_b + int64_t(int32_t(h) / head_group) * stride_h + i;
  }
  FSA_HOST_DEVICE int64_t at(int64_t b, int64_t h, int64_t i) const {
    return data[offset(b, h, i)];
  }
};

}  // namespace fsa::detail
