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
  // Per-row top-k over compacted keys: (batch | 1, heads, key_last_stride(slots)), the last row
  // that keeps slot s (-1: none). The rows that keep a key are an interval — from the first that sees it to
  // key_last — because a row's top-k threshold only tightens down the rows (core/compaction.h),
  // so (i, s) is kept iff s < at(i) and i <= key_last[s]. Null on every other path.
  const int32_t* key_last = nullptr;
  int64_t key_stride_b = 0;
  int64_t key_stride_h = 0;
  // With key_last: the first row that sees slot s (row_end passes s there), same layout. The
  // dK/dV pass, whose rows are keys, bounds each key's queries by [key_first, key_last].
  const int32_t* key_first = nullptr;
  // Query heads per head of the array. 32-bit: the kernels divide by it per entry, and a head
  // index fits 32 bits (the CUDA grids allow 65535 heads).
  int32_t head_group = 1;

  FSA_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t i) const {
    return b * stride_b + int64_t(int32_t(h) / head_group) * stride_h + i;
  }
  FSA_HOST_DEVICE int64_t at(int64_t b, int64_t h, int64_t i) const {
    return data[offset(b, h, i)];
  }
  // key_last of (b, query head h) from slot 0 (key_last must be set).
  FSA_HOST_DEVICE const int32_t* key_last_row(int64_t b, int64_t h) const {
    return key_last + b * key_stride_b + int64_t(int32_t(h) / head_group) * key_stride_h;
  }
  FSA_HOST_DEVICE const int32_t* key_first_row(int64_t b, int64_t h) const {
    return key_first + b * key_stride_b + int64_t(int32_t(h) / head_group) * key_stride_h;
  }
};

}  // namespace fsa::detail
