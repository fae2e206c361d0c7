#pragma once
// Stable sorts of several lists at once, for planning (per-row top-k ranks, the dK/dV groups,
// interval masks). Each item's key carries its list's index above the bits it is sorted by, so one
// device-wide radix sort (cub's onesweep, every SM) orders the items by list, then key, then input
// position, and list l keeps the positions it had. cub's segmented sort gave each list one CTA:
// the sorts of one to eight lists of 16K-32K keys ran on one to eight SMs, 0.04-0.13 ms each
// (H200, docs/perf.md).

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "core/host_device.h"  // bits_below
#include "cuda/check.h"
#include "cuda/memory_pool.h"
#include "cuda/stream_buffer.h"

namespace fsa::detail::cuda {

// Stable ascending sort of n (key, value) pairs by key bits [begin_bit, end_bit) (the bits below
// begin_bit must not change the order: equal in every key, or a function of the bits above). Its
// scratch comes from the stream's pool and lives in `temp` until the caller's scope ends.
template <class Key>
void sort_pairs(const Key* keys_in, Key* keys_out, const int32_t* values_in, int32_t* values_out,
                int64_t n, int begin_bit, int end_bit, StreamBuffer& temp, cudaStream_t stream) {
  size_t bytes = 0;
  FSA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, values_in,
                                                 values_out, int(n), begin_bit, end_bit, stream));
  // Never a null scratch pointer: cub would take the second call for a size query and not sort.
  bytes = bytes > 0 ? bytes : 1;
  FSA_CUDA_CHECK(scratch_malloc(&temp.ptr, bytes, stream));
  FSA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.ptr, bytes, keys_in, keys_out, values_in,
                                                 values_out, int(n), begin_bit, end_bit, stream));
}

}  // namespace fsa::detail::cuda
